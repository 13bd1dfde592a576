"""tinyserve perplexity: the reference figure of stories260K, and the KL-divergence mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import SHARED

TEXT = SHARED / "corpora" / "tinystories_val.txt"


def run(*args):
    # One BLAS thread: on a small shared machine, OpenBLAS's threads spinning against other processes made
    # this ~10x slower; the figures do not depend on it.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tinyserve", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def base_run(stories_dir, tmp_path_factory):
    """The first 200 paragraphs, float32, with the logits saved (reused as the KL base below)."""
    out = tmp_path_factory.mktemp("ppl") / "base.safetensors"
    r = run("perplexity", "--model", stories_dir, "--text", TEXT, "--paragraphs", 200, "--save-logits", out, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), out


def test_stories260k_reference_figure(base_run):
    """/work/shared/models/stories260K/README.md: 19,380 predicted tokens, mean NLL 1.4388, perplexity 4.216."""
    res, _ = base_run
    assert res["paragraphs"] == 200 and res["context"] == 512
    assert res["tokens"] == 19380
    assert round(res["mean_nll"], 3) == round(1.4388, 3)
    assert abs(res["mean_nll"] - 1.4388) < 5e-5
    assert round(res["perplexity"], 3) == 4.216


def test_saved_logits_file(base_run):
    from safetensors import safe_open

    _, path = base_run
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        assert meta["format"] == "tinyserve-logits" and meta["format_version"] == "1"
        assert f.get_slice("logits").get_shape() == [19380, 512]
        assert f.get_tensor("targets").shape == (19380,) and f.get_tensor("paragraph_offsets").shape == (201,)
        assert f.get_tensor("paragraph_offsets")[-1] == 19380


def test_kl_of_a_quantized_run(base_run, stories_dir):
    pytest.importorskip("tinyserve.quant")
    _, path = base_run
    r = run("perplexity", "--model", stories_dir, "--text", TEXT, "--paragraphs", 200, "--kl-base", path,
            "--quant", "int8", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    res = json.loads(r.stdout)
    kl = res["kl"]
    assert res["tokens"] == 19380 and abs(kl["base_mean_nll"] - 1.4388) < 5e-5
    # measured: KL mean 5.3e-4, 99th percentile 3.4e-3, max 2.7e-2, top-1 0.988
    assert 0 < kl["kl_mean"] < 5e-3 and kl["kl_median"] <= kl["kl_p99"] <= kl["kl_max"] and kl["top1"] > 0.95


def test_library_call(stories_dir, tmp_path):
    import tinyserve
    from tinyserve.validate import perplexity

    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.\n\n\n  \nThe cat was happy.\n")
    llm = tinyserve.load(stories_dir)
    done = []
    res = perplexity(llm, text, progress=lambda d, t: done.append((d, t)))
    assert res.paragraphs == 2 and done == [(1, 2), (2, 2)]
    ids = [llm.tokenizer.encode(p) for p in ("Once upon a time there was a cat.", "The cat was happy.")]
    assert res.tokens == sum(len(i) - 1 for i in ids)
    nll = 0.0
    for i in ids:  # by hand
        lg = llm.logits(i).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        nll -= (lg[np.arange(len(i) - 1), i[1:]] - lse[:-1]).sum()
    assert abs(res.mean_nll - nll / res.tokens) < 1e-9
    short = perplexity(llm, text, context=4)
    assert short.tokens == 6 and short.context == 4
    # KL mode against itself: zero
    perplexity(llm, text, save_logits=tmp_path / "base.safetensors")
    again = perplexity(llm, text, kl_base=tmp_path / "base.safetensors")
    kl = again.kl
    assert kl["kl_mean"] == 0.0 and kl["kl_max"] == 0.0 and kl["top1"] == 1.0 and kl["ppl_ratio"] == 1.0
    assert "KL mean" in again.table()


def test_chunked_teacher_forcing(stories_dir, tmp_path):
    """LLM.logits in steps of k tokens over one cache equals one prefill up to float32 rounding (other step
    sizes take other kernels, so the sums are ordered differently: the tolerance of the decode-vs-prefill test
    in test_transformers_agreement); chunk=1 is the decode path. perplexity(chunk=...) records it."""
    import tinyserve
    from tinyserve.errors import TinyserveError
    from tinyserve.validate import perplexity

    llm = tinyserve.load(stories_dir, backend="cpu")
    ids = llm.tokenizer.encode("Once upon a time there was a little dog named Max. He liked to run in the park.")
    full = llm.logits(ids)
    for k in (1, 3, 7, len(ids) + 5):
        np.testing.assert_allclose(llm.logits(ids, chunk=k), full, rtol=0, atol=1e-5 * np.abs(full).max())
    for bad in (0, -1, True, 2.0):
        with pytest.raises(TinyserveError):
            llm.logits(ids, chunk=bad)
    with pytest.raises(TinyserveError):
        llm.logits(ids, chunk=2, tap=lambda *a: None)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe cat was happy.\n")
    one, steps = perplexity(llm, text), perplexity(llm, text, chunk=1)
    assert one.chunk is None and steps.chunk == 1 and "in steps of 1 token" in steps.table()
    assert abs(one.mean_nll - steps.mean_nll) < 1e-5


def test_int8_activations_in_decode_steps(base_run, stories_dir):
    """The int8-activation option rounds x in decode steps: with --chunk 1 its KL from float32 is measured (the
    int8 rows of docs/quality.md: KL mean 9.4e-4 at group 32 against 4.0e-4 with float activations)."""
    _, path = base_run
    args = ["perplexity", "--model", stories_dir, "--text", TEXT, "--paragraphs", 200, "--backend", "cpu",
            "--quant", "int8", "--group-size", 32, "--chunk", 1, "--kl-base", path, "--json"]
    a8 = json.loads(run(*args, "--activations", "int8").stdout)
    f32 = json.loads(run(*args).stdout)
    assert a8["activations"] == "int8" and f32["activations"] == "float32" and a8["chunk"] == 1
    assert 0 < f32["kl"]["kl_mean"] < a8["kl"]["kl_mean"] < 5e-3 and a8["kl"]["top1"] > 0.95


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--text", "/nonexistent/t.txt"], ["not found"]),
        (["--context", "1"], ["--context"]),
        (["--context", "100000"], ["--context", "positions"]),
        (["--paragraphs", "0"], ["--paragraphs"]),
        (["--chunk", "0"], ["--chunk"]),
        (["--activations", "int8", "--backend", "numpy"], ["--activations", "cpu backend"]),
        (["--kl-base", "/nonexistent/base.safetensors"], ["kl-base", "not found"]),
    ],
)
def test_bad_inputs(stories_dir, extra, words):
    args = ["perplexity", "--model", stories_dir, "--text", TEXT, "--paragraphs", "2"]
    r = run(*args, *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr


def test_kl_base_of_other_text(base_run, stories_dir):
    _, path = base_run
    r = run("perplexity", "--model", stories_dir, "--text", TEXT, "--paragraphs", 5, "--kl-base", path)
    assert r.returncode == 2 and "other tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1
