"""Sweep the matrix-vector kernels' run-time settings on this machine, each against the read pass.

    python bench/prefetch_sweep.py [--rows 16384] [--cols 2048] [--copies 12] [--seconds 60]
                                   [--only int8,f32]

The settings in ops/cpu.py that one-row calls read at run time were measured on one or two machines: the
software-prefetch distances (PREFETCH_Q8 and, on AMD Zen, PREFETCH_Q8_LONG_ROWS; PREFETCH_Q4, PREFETCH_PK8,
PREFETCH_PK4_ONE_ROW, PREFETCH_PK4_FAR) and which float32 kernel takes one row (F32_ONE_ROW_MAX_IN: 0, the
blocks of 4 rows; a large value, a row at a time). This script sets each in turn and times `cpu.linear` on one
row of x over `copies` copies of a matrix (enough to exceed the last-level cache: every call reads from
memory), the settings of a knob taking turns within each round. Each round first reads the same copies'
values with the bandwidth pass's kernel (`bench.read_kernel`), and a setting's figure is its GB/s (weights
and scales) over that read's, per round: on a shared machine the read pass itself moves between ~33 and
~57 GB/s in periods of about a minute, so only a ratio to a read of the same seconds compares. It prints,
for each setting (the current one marked `*`), the median ratio over all rounds and over the slowest, middle
and fastest thirds of the rounds by the read's speed (the settings that keep up when memory is fast differ
from those that do when it is slow), and the median GB/s.
(PREFETCH_FAR, the float-activation kernels' second prefetch, is compiled into them and is not swept here.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinyserve.bench import read_kernel
from tinyserve.ops import cpu
from tinyserve.quant import quantize

# knob: (the weights it runs on, [(label, {module constant: value})])
KNOBS = {
    "f32": ("f32", [("4-row blocks", {"F32_ONE_ROW_MAX_IN": 0}), ("row at a time", {"F32_ONE_ROW_MAX_IN": 1 << 30})]),
    "int8": ("int8", [(f"{v // 1024} KiB", {"PREFETCH_Q8": v, "PREFETCH_Q8_LONG_ROWS": False})
                      for v in (0, 2048, 4096, 8192)]
             + [("a block (rows > 2048)", {"PREFETCH_Q8": 4096, "PREFETCH_Q8_LONG_ROWS": True})]),
    "int4": ("int4", [(f"{v // 1024} KiB", {"PREFETCH_Q4": v}) for v in (0, 1024, 2048, 4096)]),
    "int8 a8 packed": ("int8a8", [(f"{v // 1024} KiB", {"PREFETCH_PK8": v}) for v in (0, 2048, 4096, 8192)]),
    "int4 a8 packed": ("int4a8", [(f"{v // 1024} KiB", {"PREFETCH_PK4_ONE_ROW": v}) for v in (0, 1024, 2048, 4096)]),
    "int4 a8 packed far": ("int4a8", [(f"{v // 1024} KiB", {"PREFETCH_PK4_FAR": v}) for v in (0, 8192, 16384, 32768)]),
}


def nbytes(w) -> int:
    if isinstance(w, np.ndarray):
        return w.nbytes
    return w.blocks.nbytes + w.scales.nbytes if isinstance(w, cpu.PackedWeights) else w.data.nbytes + w.scales.nbytes


def values_as_float32(w) -> np.ndarray:
    """The weight's largest array (its values) as float32 words, for the read pass over the same memory."""
    a = w if isinstance(w, np.ndarray) else (w.blocks if isinstance(w, cpu.PackedWeights) else w.data)
    a = np.asarray(a).reshape(-1).view(np.uint8)
    return a[: a.size // 4 * 4].view(np.float32)


def is_current(setting: dict, cols: int) -> bool:
    """Whether a setting is what ops/cpu.py does now (for F32_ONE_ROW_MAX_IN: picks the same kernel at cols)."""
    if "F32_ONE_ROW_MAX_IN" in setting:
        return (cols <= setting["F32_ONE_ROW_MAX_IN"]) == (cpu._gemv_f32_for(1, cols) is cpu._gemv_f32_rows)
    return all(getattr(cpu, a) == v for a, v in setting.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=60, help="rounds until this many seconds have passed")
    ap.add_argument("--only", default=",".join(KNOBS), help=f"comma-separated knobs of: {', '.join(KNOBS)}")
    args = ap.parse_args()
    unknown = [k for k in args.only.split(",") if k not in KNOBS]
    if unknown:
        ap.error(f"--only: unknown knob(s) {', '.join(unknown)} (of: {', '.join(KNOBS)})")
    knobs = {k: KNOBS[k] for k in args.only.split(",")}
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    x = rng.standard_normal((1, args.cols), dtype=np.float32)
    keys = {key for key, _ in knobs.values()}
    weights = {}  # the activation mode each set is used with, and its copies (placed as a model's weights)
    old_mode = cpu.ACTIVATIONS
    if "f32" in keys:
        weights["f32"] = ("float32", [cpu.upload_weight(w) for _ in range(args.copies)])
    for bits in (8, 4):
        for mode, key in (("float32", f"int{bits}"), ("int8", f"int{bits}a8")):
            if key in keys:
                cpu.set_activations(mode)  # int8: packed at placement on AVX-512 VNNI CPUs (cpu.PackedWeights)
                q = quantize(w, bits, 128)
                weights[key] = (mode, [cpu.upload_weight(q) for _ in range(args.copies)])
    read = read_kernel()
    chunks = 16
    res: dict = {}  # (knob, label) -> [(GB/s, GB/s of the round's read)]
    end = time.time() + args.seconds
    try:
        while time.time() < end:
            for knob, (key, settings) in knobs.items():
                mode, ws = weights[key]
                cpu.set_activations(mode)
                flat = [values_as_float32(wi) for wi in ws]
                t0 = time.perf_counter()
                for a in flat:
                    read(a, chunks)
                read_gbs = sum(a.nbytes for a in flat) / (time.perf_counter() - t0) / 1e9
                for label, setting in settings:
                    current = {attr: getattr(cpu, attr) for attr in setting}
                    try:
                        for attr, v in setting.items():
                            setattr(cpu, attr, v)
                        cpu.linear(x, ws[0])
                        t0 = time.perf_counter()
                        for wi in ws:
                            cpu.linear(x, wi)
                        gbs = sum(map(nbytes, ws)) / (time.perf_counter() - t0) / 1e9
                    finally:
                        for attr, v in current.items():
                            setattr(cpu, attr, v)
                    res.setdefault((knob, label), []).append((gbs, read_gbs))
    finally:
        cpu.set_activations(old_mode)
    packed = "int8a8" not in weights or isinstance(weights["int8a8"][1][0], cpu.PackedWeights)
    print(f"{args.rows} x {args.cols}, group 128, {args.copies} copies, {args.seconds:.0f} s"
          + ("" if packed else " (no AVX-512 VNNI here: the a8 rows use unpacked weights, not the knob swept)"))
    print("ratio to the round's read pass: all rounds | slowest / middle / fastest third by the read's speed")
    for (knob, label), runs in res.items():
        gbs, rd = np.array(runs).T
        ratio, order = gbs / rd, np.argsort(rd)
        thirds = [np.median(ratio[part]) for part in np.array_split(order, 3) if part.size]
        mark = "*" if is_current(dict(KNOBS[knob][1])[label], args.cols) else " "
        print(f"{knob:20s} {label:22s} {mark} {np.median(ratio):.2f} | {' / '.join(f'{t:.2f}' for t in thirds)}   "
              f"{np.median(gbs):5.1f} GB/s (read {np.median(rd[order[:len(rd) // 3 or 1]]):.1f}-"
              f"{np.median(rd[order[-(len(rd) // 3 or 1):]]):.1f}), {len(runs)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
