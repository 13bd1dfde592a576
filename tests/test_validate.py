"""tinyserve validate: agreement with transformers per layer, and naming the layer where a bug sits.

In-process calls (fast); the CLI's exit codes are tested in test_validate_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import real_config, shrink, write_model  # noqa: E402
from tinyserve import validate as v  # noqa: E402
from tinyserve.ops import reference as ref  # noqa: E402
from tinyserve.testing import SwappedOps, current_layer  # noqa: E402

# A few small configs covering every supported architecture and the numerics that differ between them.
CASES = {
    "llama-gqa": ("meta-llama__Llama-3.1-8B", {}),
    "llama3.1-rope-scaling": (
        "meta-llama__Llama-3.1-8B",
        {"rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 16, "rope_type": "llama3"}},
    ),
    "qwen2-bias": ("Qwen__Qwen2.5-7B-Instruct", {}),
    "mistral-window": ("mistralai__Mistral-7B-Instruct-v0.1", {"sliding_window": 8}),
}
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories_dir):
    built = {}

    def get(name):
        if name not in built:
            base, over = CASES[name]
            built[name] = write_model(tmp_path_factory.mktemp(name), shrink(real_config(base), **over), stories_dir)
        return built[name]

    return get


def perturb_at(op_name, layer, size=1e-3):
    """A kernel for op_name equal to the reference except inside one decoder layer (current_layer())."""
    base = getattr(ref, op_name)

    def kernel(*args):
        y = base(*args)
        if current_layer() == layer:
            y = y + np.float32(size) * np.abs(y).max()
        return y

    return kernel


@pytest.mark.parametrize("name", list(CASES))
def test_validate_passes_on_every_architecture(models, name):
    rep = v.validate(models(name), prompt=PROMPT * (2 if "rope" in name else 1))
    assert rep.passed, rep.table()
    assert rep.first_failure is None
    L = 2
    assert [s.where for s in rep.stages] == ["embedding"] + [
        f"layer {i} {w}" for i in range(L) for w in ("attention", "MLP")] + ["final norm"]
    assert rep.stages[0].nmse == 0.0  # the embedding lookup is a copy
    assert all(s.nmse < 1e-10 for s in rep.stages)  # measured ~1e-12 (docs/tolerances.md)
    assert rep.logits["top1"] == 1.0 and rep.logits["kl_mean"] < 1e-10
    d = rep.to_dict()
    assert d["passed"] is True and len(d["stages"]) == 2 * L + 2


def test_validate_float64_reference(models):
    rep = v.validate(models("qwen2-bias"), prompt=PROMPT, dtype="float64")
    assert rep.passed, rep.table()
    assert "float64" in rep.meta["reference"]


@pytest.mark.parametrize("op_name, layer, stage", [("add", 1, "attn"), ("swiglu", 0, "mlp"), ("rope", 1, "attn"),
                                                    ("rope_kv_write", 0, "attn")])
def test_validate_names_the_layer_of_a_bug(models, op_name, layer, stage):
    """A bug in one layer's op: validate fails and names that layer and block, not an earlier or later one."""
    import tinyserve

    llm = tinyserve.load(models("llama-gqa"))
    ops = SwappedOps(llm.ops, **{op_name: perturb_at(op_name, layer)})
    rep = v.validate(None, prompt=PROMPT, ops=ops, llm=llm)
    assert not rep.passed
    ff = rep.first_failure
    assert (ff["layer"], ff["stage"]) == (layer, stage), rep.table()
    assert f"layer {layer}" in rep.table().splitlines()[-1]
    assert current_layer() is None  # reset after the forward


def test_validate_quantized_like_with_like(models):
    """--quant int8: the reference holds the same dequantized weights, so the float32 limits apply, and the
    quantization error against the float model is reported against the int8 budget."""
    rep = v.validate(models("qwen2-bias"), prompt=PROMPT, quant="int8", group_size=32)
    assert rep.passed, rep.table()
    assert all(s.nmse < 1e-10 for s in rep.stages)
    q = rep.quant_error
    assert q is not None and q.fmt == "int8" and q.model_passed
    assert 1e-6 < q.logits["nmse"] < 5e-3  # a real quantization error, within budget
    assert "int8 g32" in rep.meta["quant"] and "dequantized" in rep.meta["reference"]


def test_validate_quantized_kernel_bug_is_not_hidden_by_quantization_error(models):
    """An int4 linear that reads the last value of each group with the next group's scale: a small error next to
    int4's own, but like-for-like validation sees it in the first layer that uses it."""
    pytest.importorskip("tinyserve.quant")
    import tinyserve
    from tinyserve import quant

    def buggy_linear(x, w, bias=None):
        if isinstance(w, np.ndarray):
            return ref.linear(x, w, bias)
        vals = quant.integer_values(w).astype(np.float32)  # (out, Kp)
        g = np.minimum((np.arange(vals.shape[1]) + 1) // w.group_size, w.n_groups - 1)  # off by one
        return ref.linear(x, (vals * w.scales[:, g])[:, : w.shape[1]], bias)

    llm = tinyserve.load(models("llama-gqa"), quant="int4", group_size=32)
    rep = v.validate(None, prompt=PROMPT, llm=llm, group_size=32, ops=SwappedOps(llm.ops, linear=buggy_linear))
    assert not rep.passed
    assert (rep.first_failure["layer"], rep.first_failure["stage"]) == (0, "attn")
