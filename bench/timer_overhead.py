"""Cost of the instrumented timer: decode tokens/s with the timer on vs off, measured in one run.

    python bench/timer_overhead.py [--shape stories110M] [--quant int8] [--tokens 200] [--rounds 8]
                                   [--batch 1] [--kv-dtype float32] [--activations float32]

--batch B decodes B sequences together (each step one token of each, through the matrix-matrix kernels, as
in #4's 16-sequence workload): the same op calls a step as batch 1, in a longer step.

Four settings take turns step by step on the same model and cache, in cycles of four consecutive decode
steps (the order rotates from round to round):

- off: no timer, the engine calls the backend directly (what the timer is compared with);
- forward: every op through a proxy that only forwards the call (the cost of any per-op wrapper in Python);
- clock: a proxy that reads the clock before and after each call and adds up the seconds (the floor of
  timing each op from Python, whatever the timer then does with the times);
- on: the instrumented timer (timer.TimedOps), one Timer for the whole run as in a real one, so its first
  step of each kind (recorded in full, see TimedOps) is counted once, and its folds are counted where they
  happen.

Each setting's cost is the median, over cycles, of its step's time divided by the off step's time in the
same cycle: neighbouring steps see the same machine, so the drift of a shared machine cancels out (means of
whole rounds swung by 2-3% from run to run here; the paired medians by about half a point). The means of
all steps are printed too. Target: on < 2% slower than off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tinyserve.bench import load_for_bench
from tinyserve.ops import OP_NAMES
from tinyserve.timer import Timer


class Forwarding:
    """An ops proxy whose functions only call the backend's (what wrapping each op costs by itself)."""

    def __init__(self, ops):
        self._ops = ops
        for name in OP_NAMES:
            setattr(self, name, self._wrap(getattr(ops, name)))

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _wrap(self, fn):
        def call(*args):
            return fn(*args)

        return call


class ClockOnly(Forwarding):
    """The floor: an ops proxy that reads the clock around each op call and adds up the seconds."""

    def __init__(self, ops):
        self.seconds = [0.0]
        super().__init__(ops)

    def _wrap(self, fn):
        clock, total = time.perf_counter, self.seconds

        def call(*args):
            t0 = clock()
            out = fn(*args)
            total[0] += clock() - t0
            return out

        return call


SETTINGS = ("off", "forward", "clock", "on")


def decode_round(llm, timer, tokens: int, first: int, prompt: int = 32, batch: int = 1) -> list[dict]:
    """Decode `tokens` steps of `batch` sequences, the settings taking turns (starting with SETTINGS[first]):
    one {setting: seconds of its step} per complete cycle."""
    cache = llm.new_cache(batch, prompt + tokens + 1)
    ids = np.arange(3, 3 + prompt) % llm.config.vocab_size
    real = llm.ops
    proxies = {"off": real, "forward": Forwarding(real), "clock": ClockOnly(real), "on": real}
    order = SETTINGS[first:] + SETTINGS[:first]
    llm.timer = None
    for s in range(batch):  # every sequence holds the same prompt
        logits = llm.forward(ids, np.arange(prompt), np.full(prompt, s, np.int64), cache, rows=[prompt - 1])
    tok = np.full(batch, int(np.argmax(logits[0])), np.int64)
    slots = np.arange(batch)
    cycles, cycle = [], {}
    try:
        for t in range(tokens):
            setting = order[t % len(order)]
            llm.timer = timer if setting == "on" else None
            llm.ops = proxies[setting]
            t0 = time.perf_counter()
            logits = llm.forward(tok, np.full(batch, prompt + t), slots, cache, phase="decode")
            tok = np.argmax(logits, axis=1)
            cycle[setting] = time.perf_counter() - t0
            if len(cycle) == len(order):
                cycles.append(cycle)
                cycle = {}
    finally:
        llm.timer, llm.ops = None, real
    return cycles


def _per_call(f, n: int = 20000) -> float:
    f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="stories110M")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--tokens", type=int, default=200, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--activations", default="float32", choices=["float32", "int8"],
                    help="the cpu backend's int8-activation option for quantized layers")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    from tinyserve.ops import cpu

    cpu.set_activations(args.activations)  # before loading: int8 activations repack the weights at load
    name, llm = load_for_bench(None, args.shape, args.backend, args.quant, kv_dtype=args.kv_dtype)
    decode_round(llm, Timer(), 8, 0, batch=args.batch)  # warm caches and pages
    timer = Timer()  # one timer for the whole run, as in a real one
    cycles = []
    for r in range(args.rounds):
        cycles += decode_round(llm, timer, args.tokens, r % len(SETTINGS), batch=args.batch)
    t0 = time.perf_counter()
    timer.flush()  # what the timer still holds is part of its cost: added to the last cycle's step
    cycles[-1]["on"] += time.perf_counter() - t0

    paired = {s: 100 * (statistics.median(c[s] / c["off"] for c in cycles) - 1) for s in SETTINGS[1:]}
    mean = {s: statistics.mean(c[s] for c in cycles) for s in SETTINGS}
    # the timer's fast closure measured directly: one tiny op called bare and through it
    from tinyserve.timer import TimedOps

    x = np.ones((1, 64), np.float32)
    fast = TimedOps(llm.ops, Timer(), {})._fast["add"]
    bare = _per_call(lambda: llm.ops.add(x, x))
    timed = _per_call(lambda: fast(x, x))
    steps = timer.report().as_dict()["ops"]
    calls = sum(v["calls"] for v in steps.values()) / timer.phase_calls["decode"]
    print(f"timer cost per op call in a loop: {1e6 * (timed - bare):.2f} us (a tiny add: {1e6 * bare:.2f} us bare, "
          f"{1e6 * timed:.2f} us timed); {calls:.0f} op calls per step")
    setting = f"{name} {args.backend} {args.quant}" + (" a8" if args.activations == "int8" else "") + (
        f" {args.kv_dtype} cache" if args.kv_dtype != "float32" else "")
    print(f"{setting}, batch {args.batch}: decode {args.batch / mean['off']:.1f} tok/s with the timer off, "
          f"{args.batch / mean['on']:.1f} on (means of {len(cycles)} cycles of {len(SETTINGS)} steps, {args.rounds} rounds); "
          f"per step, median of each cycle's ratio to its off step: "
          + ", ".join(f"{s} {paired[s]:+.2f}%" for s in SETTINGS[1:])
          + f"; the means: on {100 * (mean['on'] / mean['off'] - 1):+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
