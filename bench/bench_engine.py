"""pytest-benchmark suite of whole decode steps (random weights, small shapes):

    pytest bench/bench_engine.py --benchmark-columns=median,ops

Each test is one decode step (batch 1 or 8) of the stories15M shape on the cpu backend, per format, and
records the weight bytes one step reads in extra_info, so bytes / median time gives the GB/s reached.
`tinyserve bench` is the full measurement (bandwidth floor, prefill, batches, larger shapes).
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve.bench import copy_slot, load_for_bench, weight_bytes_per_step

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step(benchmark, quant, batch):
    _, llm = load_for_bench(None, "stories15M", "cpu", quant)
    cache = llm.new_cache(batch, 64)
    prompt = np.arange(3, 35)
    llm.forward(prompt, np.arange(32), np.zeros(32, np.int64), cache, rows=[31])
    for s in range(1, batch):  # every sequence holds the same prompt
        copy_slot(cache, 0, s)
    tokens, pos, slots = np.full(batch, 7), np.full(batch, 32), np.arange(batch)
    benchmark.extra_info["weight_bytes_per_step"] = weight_bytes_per_step(llm.weights)
    benchmark(lambda: llm.forward(tokens, pos, slots, cache, phase="decode"))


@pytest.mark.parametrize("timer", [False, True])
def test_timer_overhead(benchmark, timer):
    from tinyserve.timer import Timer

    _, llm = load_for_bench(None, "stories15M", "cpu", "int8")
    llm.timer = Timer() if timer else None
    cache = llm.new_cache(1, 64)
    llm.forward([1], [0], [0], cache)
    benchmark(lambda: llm.forward([7], [1], [0], cache, phase="decode"))
