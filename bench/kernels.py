"""CPU kernel speeds, as fractions of the memory bandwidth measured in the same run.

    python bench/kernels.py            # everything (~2-4 minutes on 2 cores)
    python bench/kernels.py --quick    # smaller repetition counts, skips the 128256-row head
    python bench/kernels.py --activations int8   # also the int8-activation option (cpu.ACTIVATIONS) in 2.

What it measures:

1. read bandwidth: a parallel sum over a 512 MiB float32 array (Numba, all threads), median of several
   passes, before and after everything else; the kernels are compared with the mean of the two;
2. decode GEMV (one row of x) on the Llama-3.2-1B weight shapes, float32 / int8 / int4 (group 128): bytes
   the kernel reads (weights + scales) / time, as a fraction of that bandwidth. Each call reads a different
   copy of the weights (enough copies to exceed 256 MiB) so that nothing is served from cache;
3. prefill GEMM (512 rows of x): GFLOP/s (2 * rows * out * in / time) of each format, and of NumPy's
   float32 BLAS (OpenBLAS) for scale;
4. few rows (1 to 64): matrix-vector kernel (register tiles from 4 rows) vs tiled panel kernel, which
   justifies ops/cpu.py's GEMM_MIN_ROWS_Q8 / GEMM_MIN_ROWS_Q4;
5. compute speed: the GEMV kernels on one thread with a 256 x 2048 weight that stays in cache, i.e. how
   fast each kernel can consume weights when memory is not the limit (steadier on a shared machine);
   always with both activation modes of the quantized kernels ("int8 a8": x quantized to int8, the
   cpu.ACTIVATIONS = "int8" option; "a8 packed": the same with the weights packed as a model loaded with that
   option holds them, cpu.PackedWeights, on AVX-512 VNNI CPUs).

Times are medians. On a machine shared with other work the absolute numbers drift a lot; the ratios of
one run are what to compare (docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from tinyserve.bench import read_kernel  # noqa: E402
from tinyserve.ops import cpu  # noqa: E402
from tinyserve.quant import QuantizedTensor  # noqa: E402

GEMV_SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048)]  # (out, in) of Llama-3.2-1B
GEMM_SHAPES = [(2048, 2048), (8192, 2048)]
FORMATS = ("float32", "int8", "int4")
A8_FORMATS = ("int8 a8", "int4 a8")  # the same weights, activations quantized to int8 (cpu.ACTIVATIONS = "int8")
if cpu.PACK:  # ... and packed as cpu.upload packs them for that option (cpu.PackedWeights): what a model runs
    A8_FORMATS += ("int8 a8 packed", "int4 a8 packed")
GROUP = 128


_parallel_sum = read_kernel()  # the read pass `tinyserve bench` measures bandwidth with


def bandwidth(nbytes=512 * 2**20, reps=9) -> tuple[float, float]:
    """Read bandwidth in GB/s: (median, best) of `reps` parallel sums over an array of `nbytes`."""
    a = np.ones(nbytes // 4, np.float32)
    _parallel_sum(a, 64)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        _parallel_sum(a, 64)
        ts.append(time.perf_counter() - t)
    return a.nbytes / float(np.median(ts)) / 1e9, a.nbytes / min(ts) / 1e9


def linear_as(fmt):
    """cpu.linear run with the activation mode a format name asks for ("... a8": int8 activations)."""
    mode = "int8" if " a8" in fmt else "float32"

    def run(x, w):
        saved, cpu.ACTIVATIONS = cpu.ACTIVATIONS, mode
        try:
            return cpu.linear(x, w)
        finally:
            cpu.ACTIVATIONS = saved

    return run


def make_weight(fmt, out, k, rng):
    """Random weights of a format, built directly (quantizing 128256 x 2048 in NumPy would take a while)."""
    packed = fmt.endswith(" packed")
    fmt = fmt.removesuffix(" packed").removesuffix(" a8")
    if fmt == "float32":
        return rng.standard_normal((out, k), dtype=np.float32) * np.float32(0.02)
    ng = k // GROUP
    scales = np.full((out, ng), 0.01, np.float32)
    if fmt == "int8":
        w = QuantizedTensor(8, GROUP, (out, k), rng.integers(-127, 128, (out, k), dtype=np.int8), scales)
    else:
        w = QuantizedTensor(4, GROUP, (out, k), rng.integers(0, 256, (out, k // 2), dtype=np.uint8), scales)
    return cpu.PackedWeights(w) if packed else w


def nbytes(w) -> int:
    return int(w.nbytes)


def time_calls(fn, args_list, reps) -> float:
    """Median seconds of fn(*args) cycling through args_list (after one untimed call)."""
    fn(*args_list[0])
    ts = []
    for i in range(reps):
        a = args_list[i % len(args_list)]
        t = time.perf_counter()
        fn(*a)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_gemv(shapes, reps, bw, rng, min_total=256 * 2**20, formats=FORMATS):
    rows = []
    for out, k in shapes:
        for fmt in formats:
            w0 = make_weight(fmt, out, k, rng)
            copies = [w0] + [make_weight(fmt, out, k, rng) for _ in range(max(0, -(-min_total // nbytes(w0)) - 1))]
            x = rng.standard_normal((1, k), dtype=np.float32)
            t = time_calls(linear_as(fmt), [(x, w) for w in copies], reps)
            gbs = nbytes(w0) / t / 1e9
            rows.append((f"{out}x{k}", fmt, nbytes(w0) / 2**20, t * 1e3, gbs, gbs / bw))
            del copies, w0
    return rows


def bench_gemm(shapes, n, reps, rng):
    rows = []
    for out, k in shapes:
        x = rng.standard_normal((n, k), dtype=np.float32)
        flops = 2 * n * out * k
        for fmt in FORMATS:
            w = make_weight(fmt, out, k, rng)
            t = time_calls(cpu.linear, [(x, w)], reps)
            rows.append((f"{out}x{k}", fmt + (" (Numba tiled)" if fmt == "float32" else ""), flops / t / 1e9))
            if fmt == "float32":
                t = time_calls(np.matmul, [(x, w.T)], reps)
                rows.append((f"{out}x{k}", "float32 (NumPy BLAS, for scale)", flops / t / 1e9))
    return rows


def bench_few_rows(rng, reps, out=2048, k=2048):
    """Milliseconds of the matrix-vector and the tiled kernel for a few rows of x (weights in cache)."""
    rows = []
    for fmt in ("int8", "int4"):
        w = make_weight(fmt, out, k, rng)
        for n in (1, 2, 4, 8, 16, 32, 64):
            x = rng.standard_normal((n, k), dtype=np.float32)
            y = np.empty((n, out), np.float32)
            if fmt == "int8":
                tv = time_calls(cpu._gemv_q8, [(x, cpu._weight(w.data), cpu._weight(w.scales), y, cpu.PREFETCH_Q8)], reps)
                tg = time_calls(cpu._gemm_quant, [(x, cpu._weight(w.data), cpu._weight(w.scales), cpu._NO_ZEROS, False, 8, y, 64)], reps)
            else:
                tv = time_calls(cpu._gemv_q4, [(x, cpu._weight(w.data), cpu._weight(w.scales), cpu._NO_ZEROS, False, y, cpu.PREFETCH_Q4, cpu.Q4_DIGITS)], reps)
                tg = time_calls(cpu._gemm_quant, [(x, cpu._weight(w.data), cpu._weight(w.scales), cpu._NO_ZEROS, False, 4, y, 64)], reps)
            rows.append((fmt, n, tv * 1e3, tg * 1e3))
    return rows


def bench_in_cache(rng, reps, out=256, k=2048):
    """GB/s of weight bytes and G weights/s of the 1-row GEMV on one thread, weights in L2."""
    rows = []
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        for fmt in FORMATS + A8_FORMATS:
            w = make_weight(fmt, out, k, rng)
            x = rng.standard_normal((1, k), dtype=np.float32)
            lin = linear_as(fmt)
            lin(x, w)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                lin(x, w)
                ts.append(time.perf_counter() - t)
            t = min(ts)  # the compute ceiling: the least disturbed run
            rows.append((fmt, nbytes(w) / t / 1e9, out * k / t / 1e9))
    finally:
        numba.set_num_threads(before)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; skip the 128256-row head")
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    ap.add_argument("--activations", choices=("float32", "int8"), default="float32",
                    help="int8: also measure the decode GEMV with int8 activations (cpu.ACTIVATIONS)")
    args = ap.parse_args(argv)
    formats = FORMATS + (A8_FORMATS if args.activations == "int8" else ())
    if args.threads:
        numba.set_num_threads(args.threads)
    reps = 5 if args.quick else 15
    rng = np.random.default_rng(0)
    shapes = GEMV_SHAPES[:-1] if args.quick else GEMV_SHAPES

    print(f"# bench/kernels.py  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus, numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}")
    t0 = time.perf_counter()
    print(f"warmup (compile or load cache): {cpu.warmup():.2f} s")
    _parallel_sum(np.ones(1024, np.float32), 64)

    bw0, best0 = bandwidth()
    print(f"read bandwidth before: {bw0:.1f} GB/s (median; best pass {best0:.1f})")
    gemv = bench_gemv(shapes, reps, bw0, rng, formats=formats)
    gemm = bench_gemm(GEMM_SHAPES, 512, max(3, reps // 3), rng)
    few = bench_few_rows(rng, reps * 4)
    cache = bench_in_cache(rng, reps * 40)
    bw1, best1 = bandwidth()
    bw = (bw0 + bw1) / 2
    print(f"read bandwidth after:  {bw1:.1f} GB/s (median; best pass {best1:.1f}); the mean of the medians, "
          f"{bw:.1f} GB/s, is used below\n")

    print("## decode GEMV, 1 row (weights read from memory, group 128)\n")
    print("| shape (out x in) | format | MiB read | ms | GB/s | fraction of bandwidth |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, fmt, mib, ms, gbs, _ in gemv:
        print(f"| {shape} | {fmt} | {mib:.1f} | {ms:.3f} | {gbs:.1f} | {gbs / bw:.0%} |")
    for fmt in formats:
        fr = [g / bw for _, f, _, _, g, _ in gemv if f == fmt]
        print(f"\n{fmt}: mean fraction of bandwidth {np.mean(fr):.0%} (min {min(fr):.0%}, max {max(fr):.0%})", end="")
    print("\n\n## prefill GEMM, 512 rows\n")
    print("| shape (out x in) | format | GFLOP/s |")
    print("|---|---|---:|")
    for shape, fmt, gf in gemm:
        print(f"| {shape} | {fmt} | {gf:.1f} |")
    print("\n## few rows, 2048x2048 (weights in cache): matrix-vector vs tiled kernel, ms\n")
    print("| format | rows | GEMV ms | tiled ms |")
    print("|---|---:|---:|---:|")
    for fmt, n, tv, tg in few:
        print(f"| {fmt} | {n} | {tv:.3f} | {tg:.3f} |")
    print("\n## compute speed: 1-row GEMV, 256x2048 weights in cache, 1 thread (best of many)\n")
    print("| format | GB/s of weights | G weights/s |")
    print("|---|---:|---:|")
    for fmt, gbs, gw in cache:
        print(f"| {fmt} | {gbs:.1f} | {gw:.1f} |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
