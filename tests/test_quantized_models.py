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


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_int8_activations_with_packed_weights(stories_dir, monkeypatch, quant):
    """With the int8-activation option set when the model loads, the cpu backend holds its quantized matrices
    packed (cpu.PackedWeights, where the CPU has AVX-512 VNNI) and computes what the row-major kernels compute:
    the same exact integer group sums, scaled and added in another order."""
    from tinyserve.ops import cpu

    pack = cpu.PACK
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    packed = tinyserve.load(stories_dir, backend="cpu", quant=quant)
    monkeypatch.setattr(cpu, "PACK", False)
    rows = tinyserve.load(stories_dir, backend="cpu", quant=quant)
    assert isinstance(packed.weights.layers[0].o_proj, cpu.PackedWeights if pack else QuantizedTensor)
    assert isinstance(rows.weights.layers[0].o_proj, QuantizedTensor)
    ids = np.array([1, 403, 407, 261, 378, 432, 383, 286])
    out = []
    for llm in (packed, rows):  # prefill (8 rows: the few-row kernels), then 3 decode steps of 1 row
        cache = llm.new_cache(1, 16)
        logits = [llm.forward(ids, np.arange(8), np.zeros(8, np.int64), cache)]
        for t, tok in enumerate((261, 378, 432)):
            logits.append(llm.forward([tok], [8 + t], [0], cache, phase="decode"))
        out.append(np.concatenate(logits))
    # Not to 1e-6: a rounding difference in one layer can put a value of x on the neighbouring int8 step in the
    # next (measured: nmse 5e-15 int8, 2e-7 int4), still far below what the option itself changes (logits
    # against float activations: nmse ~2e-4 for both).
    nmse = ((out[0] - out[1]) ** 2).sum() / (out[1] ** 2).sum()
    assert nmse <= 1e-5, nmse
    np.testing.assert_array_equal(out[0].argmax(-1), out[1].argmax(-1))


def test_swapped_linear_gets_plain_tensors_of_packed_weights(stories_dir, monkeypatch):
    """validate --kernel's SwappedOps hands a replaced linear QuantizedTensors even where the cpu backend holds
    its matrices packed: the user's kernel sees the documented format, never a backend's own layout."""
    from tinyserve.ops import cpu
    from tinyserve.testing import SwappedOps

    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    llm = tinyserve.load(stories_dir, backend="cpu", quant="int8")
    seen = []

    def linear(x, w, bias=None):
        seen.append(type(w))
        return cpu.linear(x, w, bias)

    ids = [1, 403, 407, 261]
    want = llm.logits(ids)
    llm.ops = SwappedOps(llm.ops, linear=linear)
    got = llm.logits(ids)
    assert seen and all(t is QuantizedTensor for t in seen), set(seen)
    nmse = ((got - want) ** 2).sum() / (want ** 2).sum()
    assert nmse <= 1e-5, nmse  # packed and row-major kernels: the same sums (test above)
