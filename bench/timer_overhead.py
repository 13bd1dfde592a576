"""Cost of the instrumented timer: decode tokens/s with the timer on vs off, measured in one run.

    python bench/timer_overhead.py [--shape stories110M] [--quant int8] [--tokens 64] [--rounds 5]

The two settings alternate step by step (off, on, off, on, ...) on the same model and cache, so drift of a
shared machine hits both alike; the figure is the ratio of the mean step times. Target: < 2% difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tinyserve.bench import load_for_bench
from tinyserve.timer import Timer


def decode_steps(llm, timer, tokens: int, prompt: int = 32) -> tuple[list, list]:
    """Decode `tokens` steps of one sequence, the timer on for every other step: (seconds of the steps
    with the timer off, seconds with it on). Alternating step by step puts both settings at the same
    moments and context lengths, so the drift of a shared machine cancels out."""
    cache = llm.new_cache(1, prompt + tokens + 1)
    ids = np.arange(3, 3 + prompt) % llm.config.vocab_size
    llm.timer = None
    logits = llm.forward(ids, np.arange(prompt), np.zeros(prompt, np.int64), cache, rows=[prompt - 1])
    tok = np.array([int(np.argmax(logits[0]))])
    off, on = [], []
    for t in range(tokens):
        llm.timer = timer if t % 2 else None
        t0 = time.perf_counter()
        logits = llm.forward(tok, [prompt + t], [0], cache, phase="decode")
        tok = np.array([int(np.argmax(logits[0]))])
        (on if t % 2 else off).append(time.perf_counter() - t0)
    llm.timer = None
    t0 = time.perf_counter()
    timer.flush()  # what the timer still holds is part of its cost
    on[-1] += time.perf_counter() - t0
    return off, on


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
    decode_steps(llm, Timer(), 4)  # warm caches and pages
    off, on = [], []
    for _ in range(args.rounds):
        a, b = decode_steps(llm, Timer(), args.tokens)
        off += a
        on += b
    # tokens/s from the mean step time of each setting (the mean, not the median: it includes the steps
    # after which the timer folds its log into tallies)
    a, b = 1 / statistics.mean(off), 1 / statistics.mean(on)
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
    print(f"{name} {args.backend} {args.quant}: decode {a:.1f} tok/s with the timer off, {b:.1f} on "
          f"(mean step of {args.rounds} rounds of {args.tokens} tokens, on and off alternating step by step): "
          f"{100 * (a - b) / a:+.2f}% slower on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
