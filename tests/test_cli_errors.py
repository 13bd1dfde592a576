"""Every error a user can cause: one line on stderr, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tiny_models import STORIES


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinyserve", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(r, *words):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture()
def model_copy(stories_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def gen(d, *extra):
    return run("generate", "--model", d, "--backend", "numpy", "--max-new-tokens", "3", *extra)


def test_missing_model_dir(tmp_path):
    assert_user_error(gen(tmp_path / "nope"), "not found")


def test_config_not_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    assert_user_error(gen(model_copy), "config.json", "json")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"hidden_size": 0}, ["hidden_size"]),
        ({"num_attention_heads": -8}, ["num_attention_heads"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads"]),
        ({"vocab_size": 10**13, "hidden_size": 10**6, "head_dim": None}, ["memory"]),
        ({"architectures": ["GPT2LMHeadModel"]}, ["GPT2LMHeadModel", "not supported"]),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["yarn"]),
        ({"hidden_act": "gelu"}, ["gelu"]),
    ],
)
def test_bad_config_values(model_copy, changes, words):
    edit_config(model_copy, **changes)
    assert_user_error(gen(model_copy), *words)


def test_truncated_safetensors(model_copy):
    p = model_copy / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_user_error(gen(model_copy), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(model_copy):
    p = model_copy / "model.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage" + b"\x00" * 100)
    assert_user_error(gen(model_copy), "corrupt")


def test_missing_tensor(model_copy):
    from tinyserve.checkpoint import Checkpoint, save_safetensors

    ck = Checkpoint(model_copy)
    tensors = {n: ck.get(n).copy() for n in ck.names() if "layers.1.mlp.up_proj" not in n}
    del ck
    save_safetensors(tensors, model_copy / "model.safetensors")
    assert_user_error(gen(model_copy), "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_mismatch(model_copy):
    edit_config(model_copy, intermediate_size=100)
    assert_user_error(gen(model_copy), "shape")


def test_pickle_checkpoint_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    assert_user_error(gen(model_copy), "pickle")


def test_prompt_longer_than_context(stories_dir):
    assert_user_error(gen(stories_dir, "--prompt", "Once upon a time " * 200), "prompt", "context")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], ["temperature"]),
        (["--top-p", "0"], ["top_p"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--top-k", "-1"], ["top_k"]),
        (["--min-p", "2"], ["min_p"]),
        (["--repetition-penalty", "0"], ["repetition_penalty"]),
        (["--max-new-tokens", "-1"], ["max-new-tokens"]),
        (["--temperature", "abc"], ["temperature"]),
    ],
)
def test_bad_sampling_values(stories_dir, args, words):
    assert_user_error(gen(stories_dir, *args), *words)


def test_convert_bad_inputs_leave_nothing(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run("convert", "llama2c", tmp_path / "missing.bin", "--tokenizer",
                          STORIES / "tok512.model", "--out", out), "not found")
    truncated = tmp_path / "t.bin"
    truncated.write_bytes((STORIES / "stories260K.bin").read_bytes()[:5000])
    assert_user_error(run("convert", "llama2c", truncated, "--tokenizer", STORIES / "tok512.model", "--out", out),
                      "truncated")
    bad_tok = tmp_path / "tok.model"
    bad_tok.write_bytes(b"\x0a\x05hello-not-a-model")
    assert_user_error(run("convert", "llama2c", STORIES / "stories260K.bin", "--tokenizer", bad_tok, "--out", out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_int8_activations_only_on_the_cpu_backend(stories_dir):
    assert_user_error(gen(stories_dir, "--activations", "int8"), "--activations", "cpu backend")
    assert_user_error(gen(stories_dir, "--activations", "int4"), "--activations")


def test_unknown_backend(stories_dir):
    assert_user_error(run("generate", "--model", stories_dir, "--backend", "tpu"), "backend")


@pytest.mark.parametrize("depth", ["-1", "9"])
def test_bench_decode_depth_out_of_range(depth):
    r = run("bench", "--shape", "stories260K", "--backend", "numpy", "--prompt-tokens", "8", "--decode-depth", depth)
    assert_user_error(r, "--decode-depth", "--prompt-tokens")


def test_bench_plot_with_the_cuda_backend_is_refused_before_any_run(tmp_path):
    """The roofline plot draws the CPU's ceilings; with --backend cuda it is refused at once (no GPU needed)."""
    r = run("bench", "--shape", "stories260K", "--backend", "cuda", "--plot", tmp_path / "p.png")
    assert_user_error(r, "--plot", "CPU backend")
    assert not (tmp_path / "p.png").exists()
