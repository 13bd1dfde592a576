"""Continuous batching, the instrumented timer and `tinyserve bench`."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest

import tinyserve
from tinyserve.generate import Generator, Request
from tinyserve.sampling import SamplingParams
from tinyserve.timer import Timer

PROMPTS = ["Once upon a time", "The cat", "Lily wanted to go to the park with her mom and dad", "", "He"]


@pytest.fixture(scope="module")
def llm(stories_dir):
    return tinyserve.load(stories_dir, backend="numpy")


def alone(llm, prompt, **kw):
    return llm.generate(prompt, max_batch=1, **kw)[0]


def test_continuous_batching_equals_each_request_alone(llm):
    # 5 requests of mixed lengths, 2 slots, one request finishing early (max_new_tokens=3)
    lengths = [20, 3, 15, 25, 9]
    reqs = [llm.request(p, n, temperature=0.0, id=i) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    gen = Generator(llm, max_batch=2)
    for r in reqs:
        gen.add(r)
    max_running, admitted_order = 0, []
    while gen.waiting or gen.running:
        for ev in gen.step():
            if ev.finished:
                admitted_order.append(ev.request_id)
        max_running = max(max_running, len(gen.running))
    assert max_running == 2
    got = {r.request_id: r.token_ids for r in gen.results()}
    for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
        assert got[i] == alone(llm, p, max_new_tokens=n, temperature=0.0).token_ids, f"request {i}"
    # request 1 finished first and its slot went to request 2 without waiting for request 0
    assert admitted_order[0] == 1


def test_one_forward_per_step_for_all_running_sequences(llm):
    calls = []
    orig = llm.forward

    def spy(ids, *a, **k):
        calls.append(len(ids))
        return orig(ids, *a, **k)

    llm.forward = spy
    try:
        llm.generate(["Once", "The cat sat"], max_new_tokens=5, temperature=0.0, max_batch=2)
    finally:
        del llm.forward
    # step 1 prefills both prompts together; then one call per step decodes both sequences at once
    assert calls[0] == len(llm.encode_prompt("Once")) + len(llm.encode_prompt("The cat sat"))
    assert calls[1:] == [2] * 4


def test_per_request_seeds_reproduce(llm):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=40)
    reqs = lambda: [llm.request("Once", seed=s, id=i, **kw) for i, s in enumerate([1, 2, 1])]  # noqa: E731
    a = [r.token_ids for r in sorted(_run(llm, reqs(), 3), key=lambda r: r.request_id)]
    b = [r.token_ids for r in sorted(_run(llm, reqs(), 1), key=lambda r: r.request_id)]
    assert a == b  # same seeds, same tokens, batched or one at a time
    assert a[0] == a[2] and a[0] != a[1]


def _run(llm, reqs, max_batch):
    gen = Generator(llm, max_batch=max_batch)
    for r in reqs:
        gen.add(r)
    list(gen.run())
    return gen.results()


def test_stop_strings_and_eos_free_slots(llm):
    # EOS: pretend "." (its token id) is an end-of-sequence token
    dot = llm.tokenizer.encode(".", add_special_tokens=False)[-1]
    gen = Generator(llm, max_batch=1)
    eos_before = llm.tokenizer.eos_ids
    llm.tokenizer.eos_ids = frozenset({dot})
    try:
        gen.add(Request(llm.encode_prompt("Once upon a time"), SamplingParams(), 100, id="eos"))
        gen.add(Request(llm.encode_prompt("The cat"), SamplingParams(), 100, stop=("park",), id="stop"))
        gen.add(Request(llm.encode_prompt("He"), SamplingParams(), 4, id="len"))
        list(gen.run())
    finally:
        llm.tokenizer.eos_ids = eos_before
    res = {r.request_id: r for r in gen.results()}
    assert res["eos"].finish_reason == "eos" and res["eos"].token_ids[-1] == dot
    assert res["stop"].finish_reason in ("stop", "eos") and "park" not in res["stop"].text
    assert res["len"].finish_reason == "length" and len(res["len"].token_ids) == 4
    assert not gen.running and not gen.waiting  # every slot came back


def test_timer_counts_are_exact(stories_dir):
    timer = Timer()
    llm = tinyserve.load(stories_dir, backend="numpy", timer=timer)
    cfg = llm.config
    L = cfg.num_hidden_layers
    timer.per_step = {}
    llm.generate("Once upon a time", max_new_tokens=1, temperature=0.0)
    per = timer.per_step
    # one forward step: per layer 4 linears (q, k and v stacked; o; gate and up stacked; down), 1 rope of q
    # and k with their cache write (rope_kv_write), 1 attention, 1 swiglu, and 2 residual adds each with the
    # norm after it (add_rmsnorm: the MLP's norm, then the next layer's input norm or the final one); the first
    # layer's input norm alone
    assert per[("linear", "qkv")] == L and per[("linear", "attention")] == L and per[("linear", "mlp")] == 2 * L
    assert per[("linear", "logits")] == 1
    assert per[("rmsnorm", "qkv")] == 1 and ("rmsnorm", "mlp") not in per and ("rmsnorm", "logits") not in per
    assert per[("add_rmsnorm", "mlp")] == L and per[("add_rmsnorm", "qkv")] == L - 1
    assert per[("add_rmsnorm", "logits")] == 1
    assert per[("rope_kv_write", "qkv")] == L and per[("attention", "attention")] == L
    assert ("rope", "qkv") not in per and ("kv_write", "qkv") not in per
    assert per[("swiglu", "mlp")] == L and ("add", "residual") not in per
    assert per[("take_rows", "embedding")] == 1 and per[("take_rows", "logits")] == 1
    rep = timer.report().as_dict()
    # bytes of linear calls = the weights' own bytes + activations in and out
    w = llm.weights
    weight_bytes = sum(getattr(layer, n).nbytes for layer in w.layers
                       for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    weight_bytes += w.lm_head.nbytes
    n_prompt = len(llm.encode_prompt("Once upon a time"))
    D, F = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    act = n_prompt * 4 * L * ((D + q + 2 * kv) + (q + D) + (D + 2 * F) + (F + D)) + 1 * 4 * (D + cfg.vocab_size)
    assert rep["ops"]["linear"]["bytes"] == weight_bytes + act
    assert rep["ops"]["linear"]["calls"] == 4 * L + 1
    # rope_kv_write: q read and written, k and v read (float32) and written into the float32 cache
    assert rep["ops"]["rope_kv_write"]["bytes"] == n_prompt * L * (2 * 4 * q + 2 * (4 + 4) * kv)
    assert rep["phases"]["prefill"]["calls"] == 1 and "decode" not in rep["phases"]
    assert len(rep["requests"]) == 1 and rep["requests"][0]["generated_tokens"] == 1
    assert "op" in timer.report().table()


def test_timer_steps_after_the_first_count_like_it(stories_dir):
    """The first step of a signature records every call; later ones only a clock reading per call (timer.TimedOps).
    Their counts, bytes and FLOPs must be those the full records would give."""
    llm = tinyserve.load(stories_dir, backend="numpy")
    steps = 6

    def run(timer, fast: bool):
        llm.timer, llm._timed_ops = timer, None
        cache = llm.new_cache(2, 32)
        for t in range(steps):
            if not fast:
                llm._timed_ops = None  # a fresh proxy every step: every step is a first step, recorded in full
            # two sequences, one token each, at different positions: attention's cost differs per step
            llm.forward([5, 7], [t, 2 * t], [0, 1], cache, rows=[0, 1], phase="decode")
        llm.timer = None
        return timer.report().as_dict()

    full, fast = run(Timer(), False), run(Timer(), True)
    assert fast["ops"].keys() == full["ops"].keys() and fast["roles"].keys() == full["roles"].keys()
    for section in ("ops", "roles"):
        for k, v in full[section].items():
            assert (fast[section][k]["calls"], fast[section][k]["bytes"], fast[section][k]["flops"]) == \
                (v["calls"], v["bytes"], v["flops"]), (section, k)
    L = llm.config.num_hidden_layers
    assert fast["ops"]["linear"]["calls"] == steps * (4 * L + 1)
    # a step that fails half-way leaves no half-counted step behind
    timer = Timer()
    llm.timer, llm._timed_ops = timer, None
    cache = llm.new_cache(1, 8)
    for _ in range(2):
        llm.forward([5], [0], [0], cache, phase="decode")
    with pytest.raises(Exception):
        llm.forward([5], [99], [0], cache, phase="decode")  # a position outside the cache: kv_write raises
    llm.forward([5], [1], [0], cache, phase="decode")
    llm.timer = None
    assert timer.report().as_dict()["ops"]["linear"]["calls"] == 3 * (4 * L + 1)
    assert fast["ops"]["attention"]["calls"] == steps * L
    assert fast["ops"]["linear"]["seconds"] > 0

    # a call's time runs from the end of the call before it: the calls of a step add up to (most of) the step.
    # The steps take ~1 ms, so one pause of this shared machine between calls can break the lower bound of a
    # run: each mode gets up to three runs.
    def adds_up(rep):
        ops_seconds = sum(v["seconds"] for v in rep["ops"].values())
        phase_seconds = sum(v["seconds"] for v in rep["phases"].values())
        assert ops_seconds <= phase_seconds
        return 0.5 * phase_seconds < ops_seconds

    gc.disable()
    try:
        for rep, fast_mode in ((full, False), (fast, True)):
            assert adds_up(rep) or adds_up(run(Timer(), fast_mode)) or adds_up(run(Timer(), fast_mode))
    finally:
        gc.enable()


def test_bench_runs_on_a_tiny_shape():
    from tinyserve.bench import markdown_table, run_bench

    rep = run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1, 2), prompt_tokens=8,
                    gen_tokens=4, repetitions=1, progress=False)
    assert len(rep["results"]) == 2
    for r in rep["results"]:
        for key in ("shape", "backend", "quant", "batch", "prefill_tok_s", "decode_tok_s", "weight_bytes_per_token",
                    "bandwidth_gb_s", "floor_fraction"):
            assert key in r
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["bandwidth_gb_s"] > 0
    assert "| stories260K | numpy | none | 2 |" in markdown_table(rep)
    one, two = rep["results"]
    assert one["decode_vs_batch1"] == 1.0
    assert two["decode_vs_batch1"] == pytest.approx(two["decode_tok_s"] / one["decode_tok_s"], rel=1e-12)


def test_bench_holds_each_repetition_against_the_passes_around_it(monkeypatch):
    """Each repetition's decode steps are held against the better of the read passes right before and after
    them (not a pass minutes away); a configuration reports the mean of its repetitions' fractions and
    ceilings, and the report the run's first and last pass."""
    from tinyserve import bench

    passes = iter([10e9, 20e9, 40e9, 30e9, 50e9, 60e9])
    monkeypatch.setattr(bench, "bandwidth_meter", lambda backend: lambda: next(passes))
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1,),
                          prompt_tokens=8, gen_tokens=4, repetitions=3, progress=False)
    assert rep["bandwidth_gb_s"] == [10.0, 60.0] and rep["bandwidth_by_backend"] == {"numpy": [10.0, 60.0]}
    (r,) = rep["results"]
    assert r["bandwidth_by_repetition_gb_s"] == [20.0, 40.0, 60.0] and r["bandwidth_gb_s"] == pytest.approx(40.0)
    assert "| 40.0 |" in bench.markdown_table(rep)

    calls = iter([(100.0, 10.0, 20e9), (100.0, 30.0, 40e9)])  # (prefill, decode, ceiling) per repetition
    monkeypatch.setattr(bench, "measure_once", lambda llm, batch, p, g, c, bandwidth, depth: next(calls))
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1,),
                          prompt_tokens=8, gen_tokens=4, repetitions=2, progress=False)
    (r,) = rep["results"]
    step_bytes = r["weight_bytes_per_token"]
    want = ((step_bytes / 20e9) * 10.0 + (step_bytes / 40e9) * 30.0) / 2  # each against its own ceiling
    assert r["floor_fraction"] == pytest.approx(want, rel=1e-12) and r["decode_tok_s"] == 20.0
    assert r["decode_tok_s_by_repetition"] == [10.0, 30.0] and r["bandwidth_by_repetition_gb_s"] == [20.0, 40.0]


def test_bench_batches_take_turns_and_the_ratio_is_of_their_means(monkeypatch):
    """The batch sizes of a model alternate repetition by repetition (drift falls on all of them), and
    decode_vs_batch1 is the mean aggregate decode rate over batch 1's, from this run's measurements."""
    from tinyserve import bench

    order = []
    rates = {1: iter([(100.0, 10.0), (100.0, 30.0)]), 4: iter([(100.0, 50.0), (100.0, 70.0)])}

    def fake(llm, batch, prompt_tokens, gen_tokens, context, bandwidth, depth):
        order.append(batch)
        return (*next(rates[batch]), 1e9)

    monkeypatch.setattr(bench, "measure_once", fake)
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1, 4), prompt_tokens=8,
                          gen_tokens=4, repetitions=2, progress=False)
    assert order == [1, 4, 1, 4]
    one, four = rep["results"]
    assert (one["decode_tok_s"], four["decode_tok_s"]) == (20.0, 60.0)
    assert four["decode_vs_batch1"] == 3.0 and four["decode_tok_s_sd"] == 10.0
    assert "| 3.00x |" in bench.markdown_table(rep)
    rates = {4: iter([(100.0, 50.0)])}  # without batch 1 in the run there is nothing to compare with
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(4,), prompt_tokens=8,
                          gen_tokens=4, repetitions=1, progress=False)
    assert rep["results"][0]["decode_vs_batch1"] is None
    order.clear()  # a size given twice is measured once, in the order first given
    rates = {4: iter([(100.0, 40.0)]), 1: iter([(100.0, 10.0)])}
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(4, 1, 4),
                          prompt_tokens=8, gen_tokens=4, repetitions=1, progress=False)
    assert order == [4, 1] and [r["batch"] for r in rep["results"]] == [4, 1]
    assert rep["results"][0]["decode_vs_batch1"] == 4.0


def test_bench_decodes_from_the_depth_asked_for():
    """--decode-depth d: the decode steps run at positions d, d + 1, ... after the whole prompt's prefill (0: an
    empty context, as llama-bench's tg tests); the default is the prompt's length. The figure is named in the
    JSON (per configuration and for the run) and in the table's first line."""
    from tinyserve import bench

    name, llm = bench.load_for_bench(None, "stories260K", "numpy", "none")
    seen = []
    forward = llm.forward

    def spy(tokens, positions, slots, cache, **kw):
        if kw.get("phase") == "decode":
            seen.append(list(positions))
        return forward(tokens, positions, slots, cache, **kw)

    llm.forward = spy
    for depth, first in ((0, 0), (5, 5), (None, 8)):  # batch 2, 3 steps: both sequences at each position
        want = [[first + t, first + t] for t in range(3)]
        seen.clear()
        bench.measure_once(llm, 2, 8, 3, 12, depth=depth)
        assert seen == want
    with pytest.raises(bench.TinyserveError, match="depth 9"):
        bench.measure_once(llm, 1, 8, 3, 12, depth=9)
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1,), prompt_tokens=8,
                          gen_tokens=4, repetitions=1, progress=False, depth=0)
    assert rep["decode_depth"] == 0 and rep["results"][0]["decode_depth"] == 0
    assert "decode from position 0" in bench.markdown_table(rep).splitlines()[0]
    rep = bench.run_bench(shape="stories260K", backends=("numpy",), quants=("none",), batches=(1,), prompt_tokens=8,
                          gen_tokens=4, repetitions=1, progress=False)
    assert rep["decode_depth"] == 8 and rep["results"][0]["decode_depth"] == 8


def test_decoding_at_depth_d_after_a_longer_prompt_is_decoding_after_its_first_d_tokens():
    """Why --decode-depth may reuse the prefilled cache: a step at position d attends to rows 0..d only (the
    row it writes, d, replaces the prompt's), and rows 0..d-1 depend on the first d tokens only (causal).
    Tolerance: the two prefills run matrix products of 12 and of 5 rows, which NumPy's BLAS may block
    differently (float32 rounding, ~1e-6 relative)."""
    import numpy as np

    from tinyserve import bench

    _, llm = bench.load_for_bench(None, "stories260K", "numpy", "none")
    prompt = np.random.default_rng(1).integers(3, llm.config.vocab_size, 12)
    d, token = 5, np.array([7])
    logits = []
    for n in (12, d):
        cache = llm.new_cache(1, 16)
        llm.forward(prompt[:n], np.arange(n), np.zeros(n, np.int64), cache, rows=[n - 1])
        logits.append(llm.forward(token, np.array([d]), np.zeros(1, np.int64), cache))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_bench_cli_json():
    r = subprocess.run([sys.executable, "-m", "tinyserve", "bench", "--shape", "stories260K", "--backend", "numpy",
                        "--batch", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1", "--json"],
                       capture_output=True, text=True, check=True)
    rep = json.loads(r.stdout)
    assert rep["results"][0]["shape"] == "stories260K"


def test_bench_reports_the_activation_mode(capsys):
    """--activations int8 (the cpu backend's option) is named in the report: per configuration in --json (quantized
    layers only: float32 weights keep float activations), in the table's quant column and its first line. The
    mode is the command's alone: main() puts back the one it found."""
    from tinyserve import cli as tcli
    from tinyserve.ops import cpu

    before = cpu.ACTIVATIONS
    args = ["bench", "--shape", "stories260K", "--backend", "cpu", "--quant", "none,int8", "--activations", "int8",
            "--batch", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--repetitions", "1"]
    assert tcli.main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(r["quant"], r["activations"]) for r in rep["results"]] == [("none", "float32"), ("int8", "int8")]
    assert cpu.ACTIVATIONS == before
    assert tcli.main(args) == 0
    table = capsys.readouterr().out
    assert "int8 activations" in table.splitlines()[0] and "| stories260K | cpu | int8 a8 | 1 |" in table
    assert cpu.ACTIVATIONS == before


def bench_script(name, *args):
    """Run bench/<name> with args in a subprocess (the scripts are not a package)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / name
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True)


def test_step_linears_script_runs():
    """bench/step_linears.py (a step split into its products and the rest) on a tiny shape: figures present."""
    r = bench_script("step_linears.py", "--shape", "stories260K", "--quant", "int8", "--position", "8", "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "linears" in r.stdout and "the rest" in r.stdout and "replayed back to back" in r.stdout


@pytest.mark.parametrize("script, args, want", [
    ("ab_steps.py", ["--switch", "Q4_DIGITS", "--shape", "stories260K", "--quant", "int4", "--batch", "1",
                     "--position", "4", "--steps", "3"], "(cpu.Q4_DIGITS off = old, on = new)"),
    ("attention_ab.py", ["--shape", "stories260K", "--batch", "2", "--position", "20", "--layers", "4", "--rounds",
                         "1", "--variant", "ATTENTION_NEXT_TASKS=1"], "ATTENTION_NEXT_TASKS=1"),
])
def test_ab_scripts_run(script, args, want):
    """bench/ab_steps.py --switch and bench/attention_ab.py on a tiny shape: they run and print their ratios."""
    r = bench_script(script, *args)
    assert r.returncode == 0, r.stderr
    assert want in r.stdout and ("new / old" in r.stdout or "/ as in ops/cpu.py" in r.stdout)


def _fake_llama_cpp(tmp_path, tok_s):
    """Stand-ins for llama.cpp's llama-bench (reports tok_s for any model) and llama-quantize (copies the file)."""
    bench, quantize = tmp_path / "llama-bench", tmp_path / "llama-quantize"
    bench.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'version: fake'; exit 0; }\n"
                     f"echo '[{{\"avg_ts\": {tok_s}}}]'\n")
    quantize.write_text('#!/bin/sh\ncp "$2" "$3"\n')  # --pure IN OUT TYPE THREADS
    for f in (bench, quantize):
        f.chmod(0o755)
    return ["--llama-bench", str(bench), "--llama-quantize", str(quantize), "--dir", str(tmp_path / "models"),
            "--shape", "stories260K"]


def test_llamacpp_script_alternates_pairs_and_divides_tokens_per_second(tmp_path):
    """bench/llamacpp.py --alternate, with stand-ins for llama.cpp's binaries (1000 tok/s, whatever the file) on
    a tiny shape: the GGUF files written and "quantized", a summary row per format and activation mode, and a
    row per pair whose ratio is tinyserve's tokens/s over llama-bench's; then --rounds on the same files."""
    pytest.importorskip("gguf")
    r = bench_script("llamacpp.py", *_fake_llama_cpp(tmp_path, 1000.0), "--alternate", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(f.name for f in (tmp_path / "models").iterdir()) == [
        "stories260K-Q4_0.gguf", "stories260K-Q8_0.gguf", "stories260K-f32.gguf"]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    summary = [c for c in rows if len(c) == 9 and c[0].strip() != "format"]
    pairs = [c for c in rows if len(c) == 6 and c[0].strip() != "format"]
    assert [(c[0].strip(), c[1].strip()) for c in summary] == [
        ("f32", "float32"), ("Q8_0", "float32"), ("Q8_0", "int8"), ("Q4_0", "float32"), ("Q4_0", "int8")]
    assert len(pairs) == 10
    for c in pairs:
        assert float(c[2]) == 1000.0
        assert float(c[4]) == pytest.approx(float(c[3]) / 1000.0, abs=1e-3)
    r = bench_script("llamacpp.py", *_fake_llama_cpp(tmp_path, 1000.0), "--rounds", "1")  # the files reused
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| 1 |")]
    assert [c[1].strip() for c in rows] == ["f32", "Q8_0", "Q4_0"]
    assert all(float(c[2]) == 1000.0 and len(c) == 11 for c in rows)


def test_llamacpp_script_refuses_a_missing_binary(tmp_path):
    r = bench_script("llamacpp.py", "--llama-bench", str(tmp_path / "nothing"), "--llama-quantize",
                     str(tmp_path / "nothing"))
    assert r.returncode == 2 and "is not an executable file" in r.stderr


def test_llamacpp_script_says_in_one_line_that_llama_bench_failed(tmp_path):
    pytest.importorskip("gguf")
    args = _fake_llama_cpp(tmp_path, 1000.0)
    (tmp_path / "llama-bench").write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n"
                                          "echo 'error: failed to load model' >&2; exit 1\n")
    r = bench_script("llamacpp.py", *args, "--rounds", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "failed to load model" in r.stderr


def test_ab_steps_refuses_an_unknown_switch():
    r = bench_script("ab_steps.py", "--switch", "NO_SUCH_THING", "--shape", "stories260K")
    assert r.returncode == 2 and "no boolean 'NO_SUCH_THING'" in r.stderr


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tinyserve", *map(str, args)], capture_output=True, text=True)


def test_prompt_file_jsonl_in_input_order(stories_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Once upon a time", "max_new_tokens": 6}\n'
                 '{"prompt": "The cat", "max_new_tokens": 3, "temperature": 0.8, "seed": 3}\n'
                 'Lily went\n', encoding="utf-8")
    r = cli("generate", "--model", stories_dir, "--backend", "numpy", "--prompt-file", f, "--max-batch", "2",
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["id"] for o in objs] == [0, 1, 2]
    assert [o["generated_tokens"] for o in objs] == [6, 3, 5]


@pytest.mark.parametrize("content, word", [("\n\n", "no prompts"), ('{"prompt": "a"\n', "malformed"),
                                           ('{"text": "a"}\n', "prompt")])
def test_bad_prompt_files(stories_dir, tmp_path, content, word):
    f = tmp_path / "p.txt"
    f.write_text(content)
    r = cli("generate", "--model", stories_dir, "--backend", "numpy", "--prompt-file", f)
    assert r.returncode == 2 and "Traceback" not in r.stderr and word in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_generate_with_int8_activations(stories_dir):
    r = cli("generate", "--model", stories_dir, "--backend", "cpu", "--quant", "int8", "--activations", "int8",
            "--prompt", "Once upon a time", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generated_tokens"] == 12


def test_bad_max_batch(stories_dir):
    r = cli("generate", "--model", stories_dir, "--backend", "numpy", "--max-batch", "0")
    assert r.returncode == 2 and "max_batch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_profile_output(stories_dir):
    r = cli("generate", "--model", stories_dir, "--backend", "numpy", "--max-new-tokens", "5", "--profile")
    assert r.returncode == 0, r.stderr
    for word in ("prefill", "decode", "linear", "attention", "mlp", "sampling", "TTFT", "peak resident memory"):
        assert word in r.stdout


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("svg", b"<?xml")])
def test_bench_plot_writes_the_roofline(tmp_path, capsys, fmt, magic):
    """bench --plot: the roofline picture of the first configuration's ops, in the format its extension
    names, and nothing else left in the folder (it is written through a temporary file)."""
    pytest.importorskip("matplotlib")
    from tinyserve import cli

    out = tmp_path / f"roofline.{fmt}"
    assert cli.main(["bench", "--shape", "stories260K", "--backend", "numpy", "--prompt-tokens", "8",
                     "--gen-tokens", "4", "--repetitions", "1", "--plot", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["roofline_plot"] == str(out)
    assert out.read_bytes()[:len(magic)] == magic
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
