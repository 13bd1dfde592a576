"""Sweep the matrix-vector kernels' software-prefetch distances on this machine.

    python bench/prefetch_sweep.py [--rows 16384] [--cols 2048] [--copies 12] [--rounds 5]

The distances in ops/cpu.py (PREFETCH_Q8, PREFETCH_Q4, PREFETCH_PK8, PREFETCH_PK4_ONE_ROW, PREFETCH_PK4_FAR)
were measured on one machine (PREFETCH_PK4_ONE_ROW is 0 on AMD Zen, where the far prefetch then has no
effect); they are runtime arguments of the kernels, so this script sets each module
constant in turn and times `cpu.linear` on one row of x over `copies` copies of a quantized matrix (enough
to exceed the last-level cache: every call reads from memory), the values of a knob taking turns within
each round. It prints GB/s of weights and scales read (median of the rounds, then every round) with the
current setting marked `*`. Compare values within one run: the machine's speed drifts between runs.
(PREFETCH_FAR, the float-activation kernels' second prefetch, is compiled into them and is not swept here.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinyserve.ops import cpu
from tinyserve.quant import quantize

# knob: (the kernel's weights, the constant, the values tried)
KNOBS = {
    "int8": ("int8", "PREFETCH_Q8", [0, 2048, 4096, 8192]),
    "int4": ("int4", "PREFETCH_Q4", [0, 1024, 2048, 4096]),
    "int8 a8 packed": ("int8a8", "PREFETCH_PK8", [0, 2048, 4096, 8192]),
    "int4 a8 packed": ("int4a8", "PREFETCH_PK4_ONE_ROW", [0, 1024, 2048, 4096]),  # one row of x
    "int4 a8 packed, far": ("int4a8", "PREFETCH_PK4_FAR", [0, 8192, 16384, 32768]),
}


def nbytes(w) -> int:
    return w.blocks.nbytes + w.scales.nbytes if isinstance(w, cpu.PackedWeights) else w.data.nbytes + w.scales.nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    x = rng.standard_normal((1, args.cols), dtype=np.float32)
    weights = {}  # the activation mode each set is used with, and its copies (placed as a model's weights)
    old_mode = cpu.ACTIVATIONS
    for bits in (8, 4):
        q = quantize(w, bits, 128)
        for mode, key in (("float32", f"int{bits}"), ("int8", f"int{bits}a8")):
            cpu.set_activations(mode)  # int8: packed at placement on AVX-512 VNNI CPUs (cpu.PackedWeights)
            weights[key] = (mode, [cpu.upload_weight(q) for _ in range(args.copies)])
    res: dict = {}
    try:
        for _ in range(args.rounds):
            for knob, (key, attr, values) in KNOBS.items():
                mode, ws = weights[key]
                cpu.set_activations(mode)
                current = getattr(cpu, attr)
                try:
                    for v in values:
                        setattr(cpu, attr, v)
                        cpu.linear(x, ws[0])
                        t0 = time.perf_counter()
                        for wi in ws:
                            cpu.linear(x, wi)
                        res.setdefault((knob, v), []).append(sum(map(nbytes, ws)) / (time.perf_counter() - t0) / 1e9)
                finally:
                    setattr(cpu, attr, current)
    finally:
        cpu.set_activations(old_mode)
    packed = isinstance(weights["int8a8"][1][0], cpu.PackedWeights)
    print(f"{args.rows} x {args.cols}, group 128, {args.copies} copies, {args.rounds} rounds"
          + ("" if packed else " (no AVX-512 VNNI here: the a8 rows use unpacked weights, not the knob swept)"))
    for (knob, v), gbs in res.items():
        mark = "*" if getattr(cpu, KNOBS[knob][1]) == v else " "
        print(f"{knob:22s} {KNOBS[knob][1]:20s} {v:6d} {mark} GB/s {np.median(gbs):5.1f}  "
              f"[{' '.join(f'{g:.1f}' for g in gbs)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
