"""Golden activation dumps: the file format of docs/validation.md, and compare's per-layer report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tinyserve
from tinyserve import validate as v
from tinyserve.errors import TinyserveError
from tinyserve.ops import reference as ref
from tinyserve.testing import SwappedOps, current_layer

PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def llm(stories_dir):
    return tinyserve.load(stories_dir, backend="numpy")


def test_dump_format(llm, tmp_path):
    """Names, shapes, dtypes and metadata exactly as docs/validation.md says; readable by `safetensors`."""
    from safetensors import safe_open

    path = v.dump(None, PROMPT, tmp_path / "a.safetensors", llm=llm)
    cfg = llm.config
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    ids = llm.tokenizer.encode(PROMPT)
    T = len(ids)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = {"token_ids", "embed", "norm", "logits"} | {
        f"layers.{i}.{s}" for i in range(L) for s in ("input", "after_attn", "after_mlp")}
    assert set(tensors) == expected
    assert tensors["token_ids"].dtype == np.int64 and tensors["token_ids"].tolist() == ids
    for k, a in tensors.items():
        if k != "token_ids":
            assert a.dtype == np.float32 and a.shape == ((T, V) if k == "logits" else (T, D)), k
    assert set(meta) == {"format", "format_version", "config", "producer", "tinyserve_version", "backend", "dtype",
                         "quant", "prompt", "num_layers"}
    assert meta["format"] == "tinyserve-activations" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["num_hidden_layers"] == L
    assert (meta["backend"], meta["dtype"], meta["quant"], meta["prompt"]) == ("numpy", "float32", "none", PROMPT)
    # the stages chain: a layer's input is the previous layer's output; the logits are what logits() gives
    np.testing.assert_array_equal(tensors["layers.0.input"], tensors["embed"])
    for i in range(1, L):
        np.testing.assert_array_equal(tensors[f"layers.{i}.input"], tensors[f"layers.{i - 1}.after_mlp"])
    np.testing.assert_array_equal(tensors["logits"], llm.logits(ids))


def test_compare_identical_runs_is_zero(llm, tmp_path):
    a = v.dump(None, PROMPT, tmp_path / "a.safetensors", llm=llm)
    b = v.dump(None, PROMPT, tmp_path / "b.safetensors", llm=llm)
    rep = v.compare_dumps(a, b)
    assert rep.passed and rep.first_failure is None
    assert all(s.nmse == 0.0 and s.max_abs == 0.0 for s in rep.stages)
    f = rep.logits
    assert (f["max_abs"], f["nmse"], f["kl_mean"], f["kl_max"], f["top1"]) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_compare_reports_the_perturbed_layer_first(llm, tmp_path):
    def swiglu_bug(g, u):  # only inside layer 3's MLP
        y = ref.swiglu(g, u)
        return y * np.float32(1.01) if current_layer() == 3 else y

    a = v.dump(None, PROMPT, tmp_path / "a.safetensors", llm=llm)
    b = v.dump(None, PROMPT, tmp_path / "b.safetensors", llm=llm, ops=SwappedOps(llm.ops, swiglu=swiglu_bug))
    rep = v.compare_dumps(a, b)
    assert not rep.passed
    assert (rep.first_failure["layer"], rep.first_failure["stage"]) == (3, "mlp")
    by_where = {s.where: s for s in rep.stages}
    assert by_where["layer 3 attention"].nmse == 0.0 and by_where["layer 3 MLP"].nmse > 1e-8
    assert "first divergence at layer 3 MLP" in rep.table()


def test_compare_transformers_dump_with_tinyserve_dump(llm, tmp_path):
    pytest.importorskip("transformers")
    a = v.dump(None, PROMPT, tmp_path / "hf.safetensors", llm=llm, engine="transformers", dtype="float64")
    b = v.dump(None, PROMPT, tmp_path / "ts.safetensors", llm=llm)
    rep = v.compare_dumps(a, b)
    assert rep.passed, rep.table()
    assert v.read_dump(a).acts["logits"].dtype == np.float64


def test_dump_from_another_engine(llm, tmp_path):
    """A file written by hand (as another engine would) with only the required tensors compares fine."""
    from safetensors.numpy import save_file

    a = v.dump(None, PROMPT, tmp_path / "a.safetensors", llm=llm)
    d = v.read_dump(a)
    required = {"token_ids": d.token_ids, "logits": d.acts["logits"].astype(np.float32)}
    for i in range(d.num_layers):
        for s in ("after_attn", "after_mlp"):
            required[f"layers.{i}.{s}"] = d.acts[f"layers.{i}.{s}"].astype(np.float32)
    meta = {"format": "tinyserve-activations", "format_version": "1", "config": json.dumps(d.config)}
    save_file(required, str(tmp_path / "other.safetensors"), metadata=meta)
    rep = v.compare_dumps(a, tmp_path / "other.safetensors")
    assert rep.passed and [s.stage for s in rep.stages][:2] == ["attn", "mlp"]


def test_compare_refuses_mismatched_dumps(llm, tmp_path):
    a = v.dump(None, PROMPT, tmp_path / "a.safetensors", llm=llm)
    b = v.dump(None, PROMPT + " More words.", tmp_path / "b.safetensors", llm=llm)
    with pytest.raises(TinyserveError, match="different token ids"):
        v.compare_dumps(a, b)
    with pytest.raises(TinyserveError, match="not found"):
        v.compare_dumps(a, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}   ")
    with pytest.raises(TinyserveError, match="not a tinyserve activation dump"):
        v.compare_dumps(a, tmp_path / "junk.safetensors")
