"""Bad requests and sampling values: one TinyserveError line (exit status 2 in the CLI), never a traceback or
nonsense; and sampling that stays sound where float32 overflows (tiny temperatures, extreme penalties)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from tiny_models import cli_error

import tinyserve
from tinyserve import bench, cli
from tinyserve.errors import TinyserveError
from tinyserve.sampling import Sampler, SamplingParams, apply_repetition_penalty, probabilities, process_logits


@pytest.fixture(scope="module")
def llm(stories_dir):
    return tinyserve.load(stories_dir, backend="numpy")


def gen_error(capsys, model, *extra) -> str:
    return cli_error(capsys, "generate", "--model", model, "--backend", "numpy", "--max-new-tokens", "3", *extra)


def jsonl(tmp_path, text: str):
    p = tmp_path / "prompts.jsonl"
    p.write_text(text + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------- prompt files (CLI)


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"prompt": "a", "top_k": ' + "9" * 5000 + "}", ["prompts.jsonl:1", "malformed JSON"]),
        ('{"prompt": "a", "stop": ' + "[" * 100_000 + "}", ["prompts.jsonl:1", "malformed JSON"]),
        ('{"prompt": "Once", "stop": 5}', ["stop", "int"]),
        ('{"prompt": "Once", "stop": [1, 2]}', ["stop", "int"]),
        ('{"prompt": "Once", "stop": [["x"]]}', ["stop", "list"]),
        ('{"prompt": "Once", "stop": {"a": 1}}', ["stop", "dict"]),
        ('{"prompt": "a\\ud800b"}', ["surrogate"]),
    ],
    ids=["long-number", "deep-nesting", "stop-int", "stop-list-of-int", "stop-nested", "stop-dict", "surrogate"],
)
def test_bad_prompt_file_lines(capsys, stories_dir, tmp_path, line, words):
    msg = gen_error(capsys, stories_dir, "--prompt-file", jsonl(tmp_path, line))
    for w in words:
        assert w.lower() in msg.lower(), msg


# ----------------------------------------------------------------------------------- non-finite logits


@pytest.mark.filterwarnings("error")  # the numpy backend's overflow warnings would be more lines
def test_weights_that_overflow_give_one_line(capsys, stories_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(stories_dir, d)
    weights = load_file(str(d / "model.safetensors"))
    weights["model.norm.weight"] = np.full_like(weights["model.norm.weight"], 1e38)  # finite, but logits are not
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    for temperature in ("0", "0.8"):
        msg = gen_error(capsys, d, "--prompt", "Once", "--temperature", temperature)
        assert "non-finite logits" in msg and "weights" in msg, msg


def test_nan_logits_in_generate_raise_a_tinyserve_error(llm, monkeypatch):
    real = llm.forward
    monkeypatch.setattr(llm, "forward", lambda *a, **k: np.full_like(real(*a, **k), np.nan))
    with pytest.raises(TinyserveError, match="non-finite logits"):
        llm.generate("Once", max_new_tokens=2)


# ------------------------------------------------------------------------------------ sampling overflow

X = np.array([1.0, 3.0, 2.5, -5.0, 0.5, -np.inf], dtype=np.float32)
CTX = [0, 2, 3]


def reference_probabilities(x, penalty, temperature, ctx=CTX):
    """Steps 1-2 and the softmax in float64 (room for every value the tests use)."""
    y = x.astype(np.float64)
    for i in set(ctx):
        y[i] = y[i] * penalty if y[i] < 0 else y[i] / penalty
    with np.errstate(over="ignore"):
        e = np.exp((y - y.max()) / temperature)
    return e / e.sum()


@pytest.mark.filterwarnings("error")  # no RuntimeWarning either
@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-45, 1e-50, 1e-300])
def test_tiny_temperature_picks_the_argmax(temperature):
    rng = np.random.default_rng(0)
    for seed in range(20):
        x = (rng.standard_normal(100) * 3).astype(np.float32)
        params = SamplingParams(temperature=temperature, seed=seed)
        p = probabilities(x, params)
        assert p[np.argmax(x)] == 1.0
        assert Sampler(params)(x) == np.argmax(x)


@pytest.mark.filterwarnings("error")
def test_logits_that_overflow_float32_after_the_temperature():
    x = np.array([3e38, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=0.5)
    np.testing.assert_array_equal(probabilities(x, params), [1.0, 0.0])
    assert Sampler(params)(x) == 0


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("penalty", [1e-40, 1e-300, 1e38, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5, 1e-40])
def test_extreme_repetition_penalties(penalty, temperature):
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=0)
    ref = reference_probabilities(X, penalty, temperature or 1.0)
    if temperature == 0:
        assert Sampler(params)(X, CTX) == np.argmax(ref)
        assert np.argmax(process_logits(X, params, CTX)) == np.argmax(ref)
    else:
        np.testing.assert_allclose(probabilities(X, params, CTX), ref, rtol=0, atol=1e-6)
        assert ref[Sampler(params)(X, CTX)] > 0


def test_a_penalty_beyond_float64_is_one_line():
    x = np.array([3e38, 1.0], dtype=np.float32)
    with pytest.raises(TinyserveError, match="repetition_penalty"):
        process_logits(x, SamplingParams(temperature=1.0, repetition_penalty=1e-300), [0])


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 1.5, 1e-30])
@pytest.mark.parametrize("penalty", [0.8, 1.0, 1.3])
def test_ordinary_values_keep_torchs_float32_numbers(temperature, penalty):
    """Where float32 does not overflow, steps 1-2 are float32 as torch computes them, unshifted."""
    rng = np.random.default_rng([7, int(penalty * 10)])
    x = (rng.standard_normal(1000) * 4).astype(np.float32)
    ctx = rng.integers(0, 1000, 300).tolist()
    expected = apply_repetition_penalty(x, ctx, penalty)
    if temperature != 1.0:
        expected = expected / np.float32(temperature)
    np.testing.assert_array_equal(process_logits(x, SamplingParams(temperature=temperature,
                                                                   repetition_penalty=penalty), ctx), expected)


@pytest.mark.filterwarnings("error")
def test_tiny_temperature_in_the_cli_is_greedy(capsys, stories_dir):
    common = ["generate", "--model", stories_dir, "--backend", "numpy", "--prompt", "Once", "--max-new-tokens", "5",
              "--json"]
    assert cli.main([str(a) for a in common + ["--temperature", "0"]]) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    for t in ("1e-40", "1e-50"):
        assert cli.main([str(a) for a in common + ["--temperature", t, "--seed", "1"]]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == greedy


# ------------------------------------------------------------------------------------------------- API


BAD_GENERATE_ARGS = [
    (dict(prompts=None), ["prompts"]),
    (dict(prompts=5), ["prompts"]),
    (dict(prompts=b"Once"), ["prompts", "bytes"]),
    (dict(prompts=[[1, 2.5]]), ["integer token ids"]),
    (dict(prompts=[[True, 2]]), ["integer token ids"]),
    (dict(prompts="a\ud800b"), ["surrogate"]),
    (dict(stop=5), ["stop"]),
    (dict(stop=[5]), ["stop"]),
    (dict(stop=b"x"), ["stop"]),
    (dict(context=True), ["context"]),
    (dict(max_batch=True), ["max_batch"]),
    (dict(max_new_tokens=True), ["max_new_tokens"]),
    (dict(on_event=5), ["on_event"]),
]


@pytest.mark.parametrize("kwargs, words", BAD_GENERATE_ARGS, ids=[repr(k) for k, _ in BAD_GENERATE_ARGS])
def test_bad_generate_arguments(llm, kwargs, words):
    kwargs = {"prompts": "Once", "max_new_tokens": 2, **kwargs}
    with pytest.raises(TinyserveError) as info:
        llm.generate(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_numpy_integers_are_accepted_where_ints_are(llm):
    plain = llm.generate("Once", max_new_tokens=3, context=64, max_batch=2)[0].token_ids
    ids = [np.int64(t) for t in llm.tokenizer.encode("Once")]
    numpy = llm.generate(ids, max_new_tokens=np.int64(3), context=np.int32(64), max_batch=np.int64(2))[0].token_ids
    assert numpy == plain


@pytest.mark.parametrize("ids", [["a"], [1.7, 2], [2**63], [2**64], [True], [[1], [2, 3]], [-1]],
                         ids=["str", "float", "2**63", "2**64", "bool", "ragged", "negative"])
def test_bad_token_ids_for_logits(llm, ids):
    with pytest.raises(TinyserveError, match="token ids must be integers"):
        llm.logits(ids)


@pytest.mark.parametrize("requests", [5, [5], ["Once"]], ids=["int", "list-of-int", "list-of-str"])
def test_stream_takes_requests(llm, requests):
    with pytest.raises(TinyserveError, match="requests"):
        list(llm.stream(requests))


# ----------------------------------------------------------------------------------------------- minor


def test_huge_max_batch_prints_only_the_error(capsys, stories_dir):
    msg = gen_error(capsys, stories_dir, "--prompt", "Once", "--max-batch", "100000000000")
    assert "memory" in msg


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    def no_run(**kw):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_bench", no_run)
    msg = cli_error(capsys, "bench", "--shape", "stories260K", "--backend", "numpy", "--plot", tmp_path / "p.png")
    assert "matplotlib" in msg
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("where,words", [("missing/p.png", ("does not exist",)), ("", ("extension", ".png")),
                                         ("p", ("extension",)), ("p.jpg", ("extension",)), ("d.png", ("directory",))])
def test_bench_plot_path_is_checked_before_the_benchmark(capsys, tmp_path, monkeypatch, where, words):
    """A --plot path that names no picture format, or cannot be written, fails at once (not after the runs,
    and not as matplotlib's DIR.png next to a folder DIR)."""
    pytest.importorskip("matplotlib")
    (tmp_path / "d.png").mkdir()

    def no_run(**kw):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_bench", no_run)
    cli_error(capsys, "bench", "--shape", "stories260K", "--backend", "numpy", "--plot", f"{tmp_path}/{where}",
              words=words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png"]
    assert not tmp_path.with_suffix(".png").exists()
