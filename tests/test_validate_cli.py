"""The validation commands' exit codes: 0 within tolerance, 1 not, 2 on bad input (one line, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

KERNELS = '''
import numpy as np
from tinyserve.ops import reference as ref
from tinyserve.testing import current_layer

def add_ok(a, b):
    return ref.add(a, b)

def add_bug_in_layer_2(a, b):
    y = ref.add(a, b)
    return y + np.float32(1e-3) * np.abs(y).max() if current_layer() == 2 else y

def linear_raises(x, w, bias=None):
    raise RuntimeError("not implemented yet")

not_a_function = 3
'''


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernels")
    (d / "my_kernels.py").write_text(textwrap.dedent(KERNELS))
    return d


def run(*args, pythonpath=None, code=None):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tinyserve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_validate_exit_0_json(stories_dir):
    pytest.importorskip("transformers")
    r = run("validate", "--model", stories_dir, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["passed"] is True and rep["first_failure"] is None
    assert len(rep["stages"]) == 2 * 5 + 2 and rep["logits"]["top1"] == 1.0


def test_validate_kernel_exit_1_names_the_layer(stories_dir, kernels):
    r = run("validate", "--model", stories_dir, "--kernel", "my_kernels:add_bug_in_layer_2", "--op", "add",
            pythonpath=kernels)
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("FAIL: first divergence at layer 2 attention")
    r = run("validate", "--model", stories_dir, "--kernel", "my_kernels:add_ok", "--op", "add", "--json",
            pythonpath=kernels)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["kernel"]["passed"] and rep["logits"]["kl_mean"] == 0.0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--kernel", "my_kernels:linear_raises", "--op", "linear"], ["kernel for linear raised", "not implemented"]),
        (["--kernel", "my_kernels.linear_raises", "--op", "linear"], ["package.module:function"]),
        (["--kernel", "my_kernels:nope", "--op", "add"], ["no attribute nope"]),
        (["--kernel", "my_kernels:not_a_function", "--op", "add"], ["not callable"]),
        (["--kernel", "no_such_pkg.mod:f", "--op", "add"], ["cannot import"]),
        (["--kernel", "my_kernels:add_ok", "--op", "matmul"], ["unknown op 'matmul'"]),
        (["--kernel", "my_kernels:add_ok"], ["--op"]),
    ],
)
def test_validate_kernel_bad_inputs(stories_dir, kernels, args, words):
    assert_user_error(run("validate", "--model", stories_dir, *args, pythonpath=kernels), *words)


def test_validate_missing_model(tmp_path):
    assert_user_error(run("validate", "--model", tmp_path / "nope"), "not found")


def test_validate_without_transformers(stories_dir):
    code = ("import sys; sys.modules['transformers'] = None; from tinyserve.cli import main; "
            f"sys.exit(main(['validate', '--model', {str(stories_dir)!r}]))")
    assert_user_error(run(code=code), "transformers", "not installed")


def test_dump_compare_cli(stories_dir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        r = run("dump", "--model", stories_dir, "--prompt", "Once upon a time", "--out", p)
        assert r.returncode == 0, r.stderr
    r = run("compare", a, b)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("PASS"), r.stdout + r.stderr
    assert_user_error(run("compare", a, tmp_path / "missing.safetensors"), "not found")
    assert_user_error(run("dump", "--model", stories_dir, "--prompt", "x", "--out", tmp_path / "no" / "x.st"),
                      "does not exist")


def test_compare_dumps_of_different_models(stories_dir, tmp_path):
    import json as js
    import shutil

    other = tmp_path / "other"
    shutil.copytree(stories_dir, other)
    cfg = js.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6  # loads fine, but: is it the same model? only the shapes are compared
    (other / "config.json").write_text(js.dumps(cfg))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    from tinyserve import validate as v

    v.dump(stories_dir, "Once upon a time", a)
    d = v.read_dump(a)
    from safetensors.numpy import save_file

    cfg2 = dict(d.config, hidden_size=128)
    save_file({"token_ids": d.token_ids}, str(b), metadata={"format": "tinyserve-activations", "format_version": "1",
                                                            "config": js.dumps(cfg2)})
    assert_user_error(run("compare", a, b), "tensor")  # its tensors are missing
    tensors = {k: x.astype("float32") for k, x in d.acts.items()}
    tensors["token_ids"] = d.token_ids
    save_file(tensors, str(b), metadata={"format": "tinyserve-activations", "format_version": "1",
                                         "config": js.dumps(dict(d.config, num_attention_heads=4))})
    assert_user_error(run("compare", a, b), "different models", "num_attention_heads")
