"""pytest-benchmark suite of the CPU kernels (small shapes, a minute or so):

    pytest bench/bench_kernels.py --benchmark-columns=median,ops --benchmark-sort=name

Each test records the bytes it reads (or the FLOPs it does) in extra_info, so GB/s and GFLOP/s follow from
the saved JSON (--benchmark-json=out.json). `test_bandwidth` measures the read bandwidth of the same run:
compare the GEMV tests with it, not with another run's figures (the machine may be shared).
bench/kernels.py is the full measurement, with the Llama-3.2-1B shapes and fractions of bandwidth.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import _parallel_sum, make_weight  # noqa: E402

from tinyserve.ops import cpu  # noqa: E402

pytest.importorskip("pytest_benchmark")

FORMATS = ("float32", "int8", "int4")


@pytest.fixture(scope="module", autouse=True)
def _warm():
    cpu.warmup()


def test_bandwidth(benchmark):
    a = np.ones(64 * 2**20 // 4, np.float32)
    benchmark.extra_info["bytes"] = a.nbytes
    benchmark(_parallel_sum, a, 64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_2048x2048(benchmark, fmt):
    """Decode: one row of x. Eight copies of the weights (32-128 MiB) cycle, so they come from memory."""
    rng = np.random.default_rng(0)
    copies = [make_weight(fmt, 2048, 2048, rng) for _ in range(8)]
    x = rng.standard_normal((1, 2048), dtype=np.float32)
    benchmark.extra_info["bytes"] = int(copies[0].nbytes)
    it = iter(range(10**9))

    def step():
        return cpu.linear(x, copies[next(it) % len(copies)])

    benchmark(step)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_128x1024x1024(benchmark, fmt):
    """Prefill: 128 rows of x through a 1024 x 1024 weight."""
    rng = np.random.default_rng(0)
    w = make_weight(fmt, 1024, 1024, rng)
    x = rng.standard_normal((128, 1024), dtype=np.float32)
    benchmark.extra_info["flops"] = 2 * 128 * 1024 * 1024
    benchmark(cpu.linear, x, w)


def test_attention_decode(benchmark):
    """One token per sequence, 8 sequences at position 1000, 32 heads over 8 kv heads of 64."""
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((8, 8, 1024, 64), dtype=np.float32)
    vc = rng.standard_normal((8, 8, 1024, 64), dtype=np.float32)
    q = rng.standard_normal((8, 32, 64), dtype=np.float32)
    slots, pos = np.arange(8), np.full(8, 1000)
    benchmark.extra_info["bytes"] = 2 * 8 * 8 * 1001 * 64 * 4
    benchmark(cpu.attention, q, kc, vc, slots, pos, 0)


def test_rmsnorm_rope_swiglu(benchmark):
    """The small ops of one prefill step of 128 tokens (D = 2048, F = 8192)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 2048), dtype=np.float32)
    g = rng.standard_normal((128, 8192), dtype=np.float32)
    q = rng.standard_normal((128, 32, 64), dtype=np.float32)
    w, inv, pos = np.ones(2048, np.float32), np.ones(32, np.float32), np.arange(128)

    def step():
        cpu.rmsnorm(x, w, 1e-5)
        cpu.rope(q, pos, inv)
        cpu.swiglu(g, g)

    benchmark(step)
