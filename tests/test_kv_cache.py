"""The KV cache's element type: float32 (default, the reference's numbers) or float16 (kv_dtype="float16")."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tinyserve
from tinyserve.config import config_from_dict
from tinyserve.errors import TinyserveError
from tinyserve.kv_cache import KVCache, cache_bytes, default_context
from tinyserve.ops import reference
from tinyserve.timer import op_cost
from tiny_models import STORIES

EXPECTED_IDS = json.loads((STORIES / "expected_greedy200_ids.json").read_text()) if STORIES.is_dir() else []


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_float16_cache_keeps_the_stories_text(stories_dir, backend):
    """stories260K's greedy 200 tokens, unchanged with keys and values rounded to float16 (measured)."""
    llm = tinyserve.load(stories_dir, backend=backend, kv_dtype="float16")
    out = llm.generate("", max_new_tokens=200, temperature=0.0)[0]
    assert out.token_ids == EXPECTED_IDS


def test_float16_cache_logits(stories_dir):
    """Teacher-forced logits over 150 tokens of real text.

    Against the float32 cache: each key and value moves by at most half a float16 step (2^-11 relative),
    which moves the logits by NMSE 1.3e-7 here; 1e-5 leaves room for wider and deeper models while a cache
    read at the wrong position or head moves them by far more (~1e-2). cpu against numpy, both float16: the
    two backends' float32 keys differ by rounding, and rounding both to float16 can put one on the neighbouring
    float16 value (measured 8.8e-9, where float32 caches agree to ~1e-13): bounded by 1e-6."""
    ids = EXPECTED_IDS[:150]
    f32 = tinyserve.load(stories_dir, backend="cpu").logits(ids)
    f16 = tinyserve.load(stories_dir, backend="cpu", kv_dtype="float16").logits(ids)
    ref16 = tinyserve.load(stories_dir, backend="numpy", kv_dtype="float16").logits(ids)
    assert nmse(f16, f32) <= 1e-5
    np.testing.assert_array_equal(f16.argmax(-1), f32.argmax(-1))
    assert nmse(f16, ref16) <= 1e-6


def test_cache_sizes():
    cfg = config_from_dict(dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                max_position_embeddings=1 << 20, rms_norm_eps=1e-5), where="test")
    c32 = KVCache(cfg, 2, 10, reference, "float32")
    c16 = KVCache(cfg, 2, 10, reference, "float16")
    assert c16.k[0].dtype == np.float16 and c16.v[2].shape == (2, 2, 10, 16)
    assert c32.nbytes == cache_bytes(cfg, 2, 10) == 2 * c16.nbytes == 2 * cache_bytes(cfg, 2, 10, "float16")
    budget = cache_bytes(cfg, 1, 1000)
    assert default_context(cfg, 1, budget)[0] == 1000
    assert default_context(cfg, 1, budget, "float16")[0] == 2000  # half the bytes: twice the positions
    with pytest.raises(ValueError):
        KVCache(cfg, 1, 4, reference, "bfloat16")


def test_kv_dtype_errors(stories_dir):
    with pytest.raises(TinyserveError, match="KV-cache dtype"):
        tinyserve.load(stories_dir, backend="numpy", kv_dtype="float8")
    with pytest.raises(TinyserveError, match="cuda backend keeps its KV cache in float32"):
        tinyserve.load(stories_dir, backend="cuda", kv_dtype="float16")  # refused before any GPU is looked for
    r = subprocess.run([sys.executable, "-m", "tinyserve", "generate", "--model", str(stories_dir), "--backend", "numpy",
                        "--kv-dtype", "int8"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "kv-dtype" in r.stderr


def test_timer_counts_the_cache_bytes():
    """kv_write reads float32 keys and values and writes them in the cache's type; attention reads the cache."""
    assert op_cost("kv_write", 4, (3, 2, 8)) == (2 * 8 * 48, 0)
    assert op_cost("kv_write", 2, (3, 2, 8)) == (2 * 6 * 48, 0)
    k16 = np.zeros((1, 2, 10, 8), np.float16)
    pos = np.array([4])
    b16, f16 = op_cost("attention", (k16, k16, np.array([0]), pos), (1, 4, 8))
    b32, f32 = op_cost("attention", (k16.astype(np.float32), k16, np.array([0]), pos), (1, 4, 8))
    assert f16 == f32 and b32 - b16 == 2 * 5 * 2 * 8 * 2  # keys and values: 5 positions x 2 heads x 8, 2 bytes less


def test_bench_reports_the_cache_type():
    from tinyserve import bench

    report = bench.run_bench(shape="stories260K", quants=("none",), batches=(2,), prompt_tokens=8, gen_tokens=4,
                             repetitions=1, progress=False, kv_dtype="float16")
    assert report["kv_dtype"] == "float16" and report["results"][0]["kv_dtype"] == "float16"
    assert report["results"][0]["decode_tok_s"] > 0
    assert "KV cache float16" in bench.markdown_table(report)


def test_batching_with_every_option_equals_each_request_alone(stories_dir, monkeypatch):
    """Continuous batching on the cpu backend with int8 weights, int8 activations (packed weights; AMX tiles
    from 8 rows where the CPU has them) and a float16 cache: each output row is computed the same way whatever
    the batch, so greedy tokens equal each request run alone."""
    from tinyserve.ops import cpu

    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    llm = tinyserve.load(stories_dir, backend="cpu", quant="int8", kv_dtype="float16")
    assert isinstance(llm.weights.layers[0].o_proj, cpu.PackedWeights) == cpu.PACK
    prompts = ["Once upon a time", "The cat", "Lily wanted to go to the park", "", "He", "One day", "Tom and Sam",
               "The sun was", "A little bird", "She"]
    lengths = [12, 3, 10, 14, 6, 9, 11, 4, 13, 8]
    reqs = [llm.request(p, n, temperature=0.0, id=i) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for _ in llm.stream(reqs, max_batch=9):  # 9 sequences decode together, a tenth waits for a free slot
        pass
    results = {r.request_id: r.token_ids for r in llm.last_generator.results()}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert results[i] == llm.generate(p, max_new_tokens=n, temperature=0.0, max_batch=1)[0].token_ids, i
