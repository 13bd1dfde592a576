"""Cost of the instrumented timer: decode tokens/s with the timer on vs off, measured in one run.

    python bench/timer_overhead.py [--shape stories110M] [--quant int8] [--tokens 64] [--rounds 5]

Three settings alternate step by step (off, floor, on, off, floor, on, ...) on the same model and cache, so
drift of a shared machine hits all alike; the figures are ratios of the mean step times. Target: on < 2%
slower than off. "floor" wraps every op in a proxy that does nothing but read the clock before and after the
call: what timing each op from Python costs at the least, whatever the timer then does with the times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tinyserve.bench import load_for_bench
from tinyserve.timer import Timer


class ClockOnly:
    """The floor: an ops proxy that reads the clock around each op call and adds up the seconds."""

    def __init__(self, ops):
        from tinyserve.ops import OP_NAMES

        self._ops, self.seconds = ops, [0.0]
        for name in OP_NAMES:
            setattr(self, name, self._clocked(getattr(ops, name)))

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _clocked(self, fn):
        clock, total = time.perf_counter, self.seconds

        def call(*args):
            t0 = clock()
            out = fn(*args)
            total[0] += clock() - t0
            return out

        return call


def decode_steps(llm, timer, tokens: int, prompt: int = 32) -> tuple[list, list, list]:
    """Decode `tokens` steps of one sequence, cycling through timer off, the clock-only floor and timer on:
    (seconds of the steps of each setting). Alternating step by step puts the settings at the same moments
    and context lengths, so the drift of a shared machine cancels out."""
    cache = llm.new_cache(1, prompt + tokens + 1)
    ids = np.arange(3, 3 + prompt) % llm.config.vocab_size
    llm.timer = None
    logits = llm.forward(ids, np.arange(prompt), np.zeros(prompt, np.int64), cache, rows=[prompt - 1])
    tok = np.array([int(np.argmax(logits[0]))])
    real, floor_ops = llm.ops, ClockOnly(llm.ops)
    times = ([], [], [])  # off, floor, on
    for t in range(tokens):
        setting = t % 3
        llm.timer = timer if setting == 2 else None
        llm.ops = floor_ops if setting == 1 else real
        t0 = time.perf_counter()
        logits = llm.forward(tok, [prompt + t], [0], cache, phase="decode")
        tok = np.array([int(np.argmax(logits[0]))])
        times[setting].append(time.perf_counter() - t0)
    llm.timer, llm.ops = None, real
    t0 = time.perf_counter()
    timer.flush()  # what the timer still holds is part of its cost
    times[2][-1] += time.perf_counter() - t0
    return times


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
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    name, llm = load_for_bench(None, args.shape, args.backend, args.quant)
    decode_steps(llm, Timer(), 6)  # warm caches and pages
    off, floor, on = [], [], []
    for _ in range(args.rounds):
        a, f, b = decode_steps(llm, Timer(), args.tokens)
        off += a
        floor += f
        on += b
    # tokens/s from the mean step time of each setting (the mean, not the median: it includes the steps
    # after which the timer folds its log into tallies)
    a, f, b = 1 / statistics.mean(off), 1 / statistics.mean(floor), 1 / statistics.mean(on)
    # the timer's own cost, measured directly: one tiny op called bare and through the timer's proxy (the
    # "fast" closure that every step after the first of its kind runs, see timer.TimedOps)
    from tinyserve.timer import TimedOps

    x = np.ones((1, 64), np.float32)
    proxy = TimedOps(llm.ops, Timer(), {})
    fast = proxy._fast["add"]
    bare = _per_call(lambda: llm.ops.add(x, x))
    timed = _per_call(lambda: fast(x, x))
    print(f"timer cost per op call: {1e6 * (timed - bare):.2f} us (a tiny add: {1e6 * bare:.2f} us bare, "
          f"{1e6 * timed:.2f} us timed)")
    print(f"{name} {args.backend} {args.quant}: decode {a:.1f} tok/s with the timer off, {b:.1f} on, {f:.1f} with "
          f"clock reads only (mean step of {args.rounds} rounds of {args.tokens} tokens, the three alternating "
          f"step by step): on is {100 * (a - b) / a:+.2f}% slower than off; the clock-only floor "
          f"{100 * (a - f) / a:+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
