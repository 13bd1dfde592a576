"""Quantized models: quantize while loading, `tinyserve quantize` checkpoints, and their quality."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tinyserve
from tinyserve.quant import QuantizedTensor


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyserve", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("bits, group, zp", [(8, 32, False), (4, 64, False), (4, 32, True)])
def test_quantized_checkpoint_equals_quantizing_at_load(stories_dir, tmp_path, bits, group, zp):
    out = tmp_path / "q"
    r = cli("quantize", "--model", stories_dir, "--bits", bits, "--group-size", group, *(["--zero-point"] if zp else []),
            "--out", out)
    assert r.returncode == 0, r.stderr
    written = tinyserve.load(out, backend="numpy")
    at_load = tinyserve.load(stories_dir, backend="numpy", quant=f"int{bits}", group_size=group, zero_point=zp)
    assert isinstance(written.weights.layers[0].o_proj, QuantizedTensor)
    assert isinstance(written.weights.lm_head, QuantizedTensor)  # the tied head is quantized too
    assert isinstance(written.weights.embed_tokens, np.ndarray)  # the embedding lookup stays float
    ids = [1, 403, 407, 261, 378, 432, 383, 286]
    np.testing.assert_array_equal(written.logits(ids), at_load.logits(ids))


def test_quantized_generation_stays_close(stories_dir):
    """int8 greedy text matches float for a good while; int4 stays English (see docs/quality.md)."""
    f = tinyserve.load(stories_dir, backend="numpy").generate("", max_new_tokens=60)[0]
    q8 = tinyserve.load(stories_dir, backend="numpy", quant="int8", group_size=32).generate("", max_new_tokens=60)[0]
    agree = next((i for i, (a, b) in enumerate(zip(f.token_ids, q8.token_ids)) if a != b), 60)
    assert agree >= 20
    q4 = tinyserve.load(stories_dir, backend="numpy", quant="int4", group_size=32).generate("", max_new_tokens=60)[0]
    assert q4.text.startswith("Once upon a time")


@pytest.mark.parametrize(
    "args, word",
    [
        (["--bits", "4", "--group-size", "48"], "group"),
        (["--bits", "3"], "bits"),
    ],
)
def test_quantize_bad_input(stories_dir, tmp_path, args, word):
    out = tmp_path / "q"
    r = cli("quantize", "--model", stories_dir, *args, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and word in r.stderr.lower()
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(p.name.startswith(".q") for p in tmp_path.iterdir())


def test_quantize_missing_model_and_already_quantized(stories_dir, tmp_path):
    r = cli("quantize", "--model", tmp_path / "nope", "--bits", "8", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not found" in r.stderr
    assert cli("quantize", "--model", stories_dir, "--bits", "8", "--out", tmp_path / "q8").returncode == 0
    r = cli("quantize", "--model", tmp_path / "q8", "--bits", "4", "--out", tmp_path / "q4")
    assert r.returncode == 2 and "already quantized" in r.stderr and not (tmp_path / "q4").exists()


def test_unknown_quant_at_load(stories_dir):
    r = cli("generate", "--model", stories_dir, "--backend", "numpy", "--quant", "int3")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
