"""Cost of the instrumented timer: decode tokens/s with the timer on vs off, measured in one run.

    python bench/timer_overhead.py [--shape stories110M] [--quant int8] [--tokens 64] [--rounds 5]

The two settings alternate round by round (off, on, off, on, ...) on the same model and cache, so drift
of a shared machine hits both alike; the figure is the ratio of the medians. Target: < 2% difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tinyserve.bench import load_for_bench
from tinyserve.timer import Timer


def decode_rate(llm, tokens: int, prompt: int = 32) -> float:
    cache = llm.new_cache(1, prompt + tokens + 1)
    ids = np.arange(3, 3 + prompt) % llm.config.vocab_size
    logits = llm.forward(ids, np.arange(prompt), np.zeros(prompt, np.int64), cache, rows=[prompt - 1])
    tok = np.array([int(np.argmax(logits[0]))])
    t0 = time.perf_counter()
    for t in range(tokens):
        logits = llm.forward(tok, [prompt + t], [0], cache, phase="decode")
        tok = np.array([int(np.argmax(logits[0]))])
    return tokens / (time.perf_counter() - t0)


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
    decode_rate(llm, 4)  # warm caches and pages
    off, on = [], []
    for _ in range(args.rounds):
        llm.timer, llm._timed_ops = None, None
        off.append(decode_rate(llm, args.tokens))
        llm.timer, llm._timed_ops = Timer(), None
        on.append(decode_rate(llm, args.tokens))
    llm.timer = None
    a, b = statistics.median(off), statistics.median(on)
    # the timer's own cost, measured directly: one tiny op called bare and through the timer's proxy
    from tinyserve.timer import TimedOps

    x = np.ones((1, 64), np.float32)
    proxy = TimedOps(llm.ops, Timer(), {})
    bare = _per_call(lambda: llm.ops.add(x, x))
    timed = _per_call(lambda: proxy.add(x, x))
    print(f"timer cost per op call: {1e6 * (timed - bare):.2f} us (a tiny add: {1e6 * bare:.2f} us bare, "
          f"{1e6 * timed:.2f} us timed)")
    print(f"{name} {args.backend} {args.quant}: decode {a:.1f} tok/s with the timer off, {b:.1f} on "
          f"(median of {args.rounds} alternating rounds of {args.tokens} tokens): {100 * (a - b) / a:+.2f}% slower on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
