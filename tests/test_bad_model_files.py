"""Broken model directories (config.json, tokenizer files, safetensors, shard index, quantized checkpoints) and
bad tinyserve.load() arguments: each is refused with one line naming the file and the problem (exit status 2
in the CLI), never a traceback and never accepted silently.

Every case starts from a valid tiny model (stories260K converted by tinyserve) and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from tiny_models import cli_error

import tinyserve
from tinyserve.checkpoint import Checkpoint, save_safetensors

NORM = "model.norm.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture()
def model(stories_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    return d


def generate(capsys, d, *extra, words=()):
    return cli_error(capsys, "generate", "--model", d, "--backend", "numpy", "--prompt", "hi",
                     "--max-new-tokens", "2", *extra, words=words)


def edit_json(path, **changes):
    d = json.loads(path.read_text()) if path.is_file() else {}
    d.update(changes)
    path.write_text(json.dumps(d))


def edit_header(path, change):
    """Rewrite a safetensors file's JSON header with change(header); the tensor bytes stay as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def replace_tensor(d, name, array):
    ck = Checkpoint(d)
    tensors = {n: np.array(ck.get(n)) for n in ck.names()}
    del ck
    tensors[name] = array
    save_safetensors(tensors, d / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------ JSON that json cannot read
BIG_NUMBER = '{"x": ' + "9" * 5000 + "}"  # ValueError: past Python's limit on the digits of an int
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError


@pytest.mark.parametrize("text", [BIG_NUMBER, DEEP], ids=["bigint", "deep"])
@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json", "generation_config.json",
                                  "model.safetensors.index.json", "model.safetensors"])
def test_json_that_does_not_parse(capsys, model, file, text):
    if file == "model.safetensors":
        (model / file).write_bytes(struct.pack("<Q", len(text)) + text.encode())
    else:
        (model / file).write_text(text)
    generate(capsys, model, words=[file])


def test_shard_index_not_utf8(capsys, model):
    (model / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    generate(capsys, model, words=["model.safetensors.index.json", "UTF-8"])


@pytest.mark.parametrize("weight_map", [{NORM: 5}, {NORM: None}])
def test_shard_index_values_must_be_file_names(capsys, model, weight_map):
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    generate(capsys, model, words=["model.safetensors.index.json", "weight_map"])


# ------------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize(
    "changes, words",
    [
        ({"architectures": None, "model_type": ["llama"]}, ["architecture"]),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": "x"},
         ["max_window_layers"]),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": 2,
          "num_hidden_layers": "5"}, ["num_hidden_layers"]),
        ({"rope_theta": float("inf")}, ["rope_theta"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, ["rope_scaling.factor"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 0.5}}, ["original_max_position_embeddings"]),
        ({"rope_parameters": [1, 2]}, ["rope_parameters"]),
        ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),
        ({"eos_token_id": "2"}, ["eos_token_id"]),
        ({"eos_token_id": [2, "x"]}, ["eos_token_id"]),
        ({"eos_token_id": [2, 10**30]}, ["eos_token_id"]),
        ({"bos_token_id": "1"}, ["bos_token_id"]),
    ],
)
def test_bad_config_values(capsys, model, changes, words):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (model / "config.json").write_text(json.dumps(cfg))  # inf and nan as JSON's Infinity / NaN
    generate(capsys, model, words=["config.json", *words])


# ------------------------------------------------------------------- tokenizer_config / generation_config
@pytest.mark.parametrize(
    "file, changes, words",
    [
        ("tokenizer_config.json", {"bos_token": 1}, ["bos_token"]),
        ("tokenizer_config.json", {"bos_token": ["<s>"]}, ["bos_token"]),
        ("tokenizer_config.json", {"eos_token": {"content": 5}}, ["eos_token"]),
        ("tokenizer_config.json", {"add_bos_token": "false"}, ["add_bos_token"]),
        ("generation_config.json", {"bos_token_id": "x"}, ["bos_token_id"]),
        ("generation_config.json", {"bos_token_id": -3}, ["bos_token_id"]),
        ("generation_config.json", {"eos_token_id": ["2"]}, ["eos_token_id"]),
        ("generation_config.json", {"do_sample": "false"}, ["do_sample"]),
    ],
)
def test_bad_tokenizer_settings(capsys, model, file, changes, words):
    edit_json(model / file, **changes)
    generate(capsys, model, words=[file, *words])


@pytest.mark.parametrize(
    "template, words",
    [
        (5, ["must be a string"]),
        ([{"name": "default", "template": 7}], ["must be a string"]),
        (["{{ messages }}"], ["must be a string"]),
        ("{{ 1 // 0 }}", ["ZeroDivisionError"]),
        ("{{ messages[0]['content'] + 1 }}", ["TypeError"]),
        ("{% for %}", ["TemplateSyntaxError"]),
    ],
)
def test_bad_chat_template(capsys, model, template, words):
    edit_json(model / "tokenizer_config.json", chat_template=template)
    generate(capsys, model, "--chat", words=["tokenizer_config.json", "chat_template", *words])


# ------------------------------------------------------------------------------------- safetensors header
def _norm(change):
    return lambda h: change(h[NORM])


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda h: h.update(__metadata__="abc"), ["__metadata__"]),
        (lambda h: h.update(__metadata__=5), ["__metadata__"]),
        (lambda h: h.update(__metadata__=["x"]), ["__metadata__"]),
        (lambda h: h.update(__metadata__={"tinyserve_quant": 5}), ["__metadata__"]),
        (_norm(lambda e: e.update(dtype=["F32"])), ["dtype"]),
        (_norm(lambda e: e.update(data_offsets=[str(o) for o in e["data_offsets"]])), ["data_offsets"]),
        (_norm(lambda e: e.update(data_offsets=[float(o) for o in e["data_offsets"]])), ["data_offsets"]),
        (_norm(lambda e: e.update(shape=[10**20])), ["shape"]),
        (_norm(lambda e: e.update(shape=[-1, -e["shape"][0]])), ["shape"]),  # the byte count matches
        (_norm(lambda e: e.update(shape=[2**32, 2**32], data_offsets=[0, 0])), ["shape"]),  # int64 wraps to 0
        (_norm(lambda e: e.update(shape=[float(e["shape"][0])])), ["shape"]),
    ],
)
def test_corrupt_safetensors_header(capsys, model, change, words):
    edit_header(model / "model.safetensors", change)
    generate(capsys, model, words=["model.safetensors", *words])


# --------------------------------------------------------------------------- non-float tensors, float slot
@pytest.mark.parametrize(
    "name, dtype",
    [
        (NORM, np.int32),
        (NORM, np.bool_),
        ("model.embed_tokens.weight", np.int32),
        ("model.layers.0.self_attn.q_proj.weight", np.int32),
        (DOWN, np.int8),  # the right shape, but int8 numbers are no float weights
    ],
)
def test_integer_tensor_where_a_float_belongs(capsys, model, name, dtype):
    replace_tensor(model, name, np.zeros(Checkpoint(model).shape(name), dtype))
    generate(capsys, model, words=[name, "expected F32"])


def test_quantize_refuses_an_integer_weight(capsys, model, tmp_path):
    replace_tensor(model, DOWN, np.zeros(Checkpoint(model).shape(DOWN), np.int32))
    cli_error(capsys, "quantize", "--model", model, "--bits", "8", "--out", tmp_path / "q", words=[DOWN, "I32"])
    assert not (tmp_path / "q").exists()


@pytest.fixture()
def quantized(stories_dir, tmp_path):
    from tinyserve.convert.quantize import quantize_checkpoint

    return quantize_checkpoint(stories_dir, tmp_path / "q", 8, 32)


def test_quantized_scales_must_be_float(capsys, quantized):
    edit_header(quantized / "model.safetensors", lambda h: h[DOWN + "_scale"].update(dtype="I32"))
    generate(capsys, quantized, words=[DOWN + "_scale", "I32"])


@pytest.mark.parametrize("label", ["int2 g32", "banana", ""])
def test_quantized_checkpoint_label(capsys, quantized, label):
    edit_header(quantized / "model.safetensors", lambda h: h["__metadata__"].update(tinyserve_quant=label))
    generate(capsys, quantized, words=["tinyserve_quant"])


# ----------------------------------------------------------------------------------- load() arguments
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"model_dir": 5}, ["model_dir"]),
        ({"backend": ["numpy"]}, ["backend"]),
        ({"quant": ["int8"]}, ["quant"]),
        ({"kv_dtype": ["float16"]}, ["kv_dtype"]),
        ({"quant": "int8", "group_size": 128.0}, ["group size"]),
        ({"quant": "int4", "zero_point": "no"}, ["zero_point"]),
    ],
)
def test_bad_load_arguments(stories_dir, kwargs, words):
    kwargs = {"model_dir": stories_dir, "backend": "numpy", **kwargs}
    with pytest.raises(tinyserve.TinyserveError) as e:
        tinyserve.load(**kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
