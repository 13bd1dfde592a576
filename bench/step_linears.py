"""How much of a decode step is its matrix products, and how much everything else?

    python bench/step_linears.py [--shape stories110M] [--quant int8] [--batch 1] [--kv-dtype float32]
                                 [--position 64] [--steps 60]

Decode steps of the model (random weights, `bench.load_for_bench`) alternate with a replay of the same
step's linear-layer calls alone, back to back (the arguments of one step recorded once). Every `linear`
call is timed in both, so it prints, as medians over the steps:

- step: the whole decode step; its linears: the time inside its `linear` calls; the rest: everything else
  (attention, the small ops, the Python of the forward pass);
- the same linears replayed back to back: if that is much less than "its linears", the other ops slow the
  products down (caches, threads); if it is about the same, the products are what they are and the rest is
  the other ops' own cost.

Options such as TINYSERVE_INT8_ACTIVATIONS apply (set them in the environment).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinyserve.bench import load_for_bench
from tinyserve.ops import cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="stories110M")
    p.add_argument("--quant", default="int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-dtype", default="float32")
    p.add_argument("--position", type=int, default=64, help="decode from this position (a prompt of this many tokens)")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    name, llm = load_for_bench(None, args.shape, "cpu", args.quant, kv_dtype=args.kv_dtype)
    pos, batch = args.position, args.batch
    cache = llm.new_cache(batch, pos + args.steps + 2)
    ids = np.arange(3, 3 + pos) % llm.config.vocab_size
    for s in range(batch):
        llm.forward(ids, np.arange(pos), np.full(pos, s, np.int64), cache, rows=[pos - 1])
    tokens, slots = np.full(batch, 5), np.arange(batch)

    real, calls, spent = cpu.linear, [], [0.0]

    def record(x, w, bias=None):
        calls.append((np.array(x, copy=True), w, bias))
        return real(x, w, bias)

    def timed(x, w, bias=None):
        t = time.perf_counter()
        y = real(x, w, bias)
        spent[0] += time.perf_counter() - t
        return y

    try:
        cpu.linear = record  # the model calls ops.linear through the backend module (this one)
        llm.forward(tokens, np.full(batch, pos), slots, cache, phase="decode")
        steps, linears, replays = [], [], []
        cpu.linear = timed
        for t in range(args.steps):
            spent[0] = 0.0
            t0 = time.perf_counter()
            llm.forward(tokens, np.full(batch, pos + 1 + t), slots, cache, phase="decode")
            steps.append(time.perf_counter() - t0)
            linears.append(spent[0])
            spent[0] = 0.0
            for x, w, bias in calls:
                timed(x, w, bias)
            replays.append(spent[0])
    finally:
        cpu.linear = real
    s, lin, rep = (1e3 * float(np.median(v)) for v in (steps, linears, replays))
    rest = 1e3 * float(np.median(np.array(steps) - np.array(linears)))
    print(f"{name} {args.quant} batch {batch} kv {args.kv_dtype} from position {pos}: step {s:.2f} ms, its "
          f"{len(calls)} linears {lin:.2f} ms, the rest {rest:.2f} ms ({rest / s:.0%}); the same linears replayed "
          f"back to back {rep:.2f} ms (medians of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
