"""Deterministic mode: on the Numba CPU backend the logits are the same bits whatever the number of threads.

The CPU kernels parallelize over independent outputs (weight rows, tokens, (token, KV head) pairs) and never
split a sum across threads, so the thread count cannot change a result. This runs the same computations in
two fresh processes, one thread and two threads (Numba, OpenMP and OpenBLAS alike), and compares the bytes.
docs/validation.md says which backends guarantee this.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAVE_CPU = importlib.util.find_spec("tinyserve.ops.cpu") is not None

WORKER = r"""
import hashlib, sys
import numpy as np
import tinyserve

llm = tinyserve.load(sys.argv[1], backend=sys.argv[2], quant=None if sys.argv[3] == "none" else sys.argv[3])
ids = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 512, 95)]
h = hashlib.sha256()
h.update(llm.logits(ids).tobytes())                          # a prefill of 96 tokens (matrix-matrix kernels)
cache = llm.new_cache(2, 128)
h.update(llm.forward(ids[:7] + ids[:5], list(range(7)) + list(range(5)), [0] * 7 + [1] * 5, cache).tobytes())
for t in range(7, 12):                                       # decode steps of two sequences (matrix-vector)
    h.update(llm.forward([ids[t], ids[t - 2]], [t, t - 2], [0, 1], cache).tobytes())
print(h.hexdigest())
"""


def logits_hash(model, backend, quant, threads):
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    r = subprocess.run([sys.executable, "-c", WORKER, str(model), backend, quant], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(not HAVE_CPU, reason="tinyserve/ops/cpu.py (the Numba backend) does not exist yet")
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_cpu_backend_logits_identical_with_1_and_2_threads(stories_dir, quant):
    if quant != "none" and importlib.util.find_spec("tinyserve.quant") is None:
        pytest.skip("tinyserve.quant does not exist yet")
    one = logits_hash(stories_dir, "cpu", quant, 1)
    two = logits_hash(stories_dir, "cpu", quant, 2)
    assert one == two
