#!/usr/bin/env python
"""One script for a GPU machine: are the CUDA kernels right, and how fast are they?

    python bench/gpu_check.py --out gpu_check.json            # on a CUDA machine (H100/H200 class), ~3-5 min
    python bench/gpu_check.py --dry-run --out /tmp/dry.json   # anywhere: Numba's simulator, tiny shapes

Sections (each runs in its own try/except: a failure is printed and recorded, the rest goes on):
  ops        every CUDA op against the NumPy reference on real sizes (Llama-3.2-1B shapes), errors vs the
             tolerances in tinyserve/tolerances.py
  engine     whole models through the engine on the GPU: logits of random Llama and Qwen2 configs (float32,
             int8, int4, int4 with zero points; prefill of two sequences, then batched decode steps) against
             the numpy backend; `validate --backend cuda` on the shipped model against transformers; greedy
             text of the shipped model and (--stories DIR) stories260K's 200 expected tokens, through the
             API and `python -m tinyserve generate --backend cuda`
  bandwidth  device-to-device copy of a 1 GiB buffer, timed with CUDA events: the bandwidth the GEMV
             figures are a fraction of (copy bandwidth = bytes read + bytes written, per second)
  launch     host-side cost of one op call (Python wrapper + allocation + launch), which bounds small models
  hostprof   where that host time goes: cProfile of repeated add and int4 linear calls, top functions
  gemv       linear() on the weight shapes of Llama-3.2-1B and -3.1-8B, float32 / int8 / int4 / int4-asym,
             at N = 1 (decode) and N = 16 (batch 16: four GEMV passes): weight GB/s and % of copy bandwidth
  sweep      the GEMV kernel shapes (rows per warp R, words per lane U, warps per block) for int8 and int4:
             which would be the better default on this GPU
  model      whole-model decode of Llama-3.2-1B shapes (random weights built in memory, tied embeddings) at
             batch 1 and 16, float32 / int8 / int4: ms per step, tokens/s, weight GB/s; prefill tokens/s;
             then Llama-3.1-8B shapes if time allows
  graphs     decode steps through the engine replayed as CUDA graphs (ops/cuda.py StepGraphs) against the
             same steps op by op: identical logits, ms per step of each, Llama-3.2-1B shapes, batch 1 and 16
  torch      the same decode with transformers' LlamaForCausalLM, bf16, eager attention, random weights
             (skipped without torch + CUDA)
A short table comes last; --out writes every figure as JSON. --only SECTION[,SECTION] runs some sections.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--out", help="write the results as JSON to this path")
ap.add_argument("--dry-run", action="store_true", help="Numba's CUDA simulator, tiny shapes (no GPU needed)")
ap.add_argument("--only", default="",
                help="comma-separated sections: ops,engine,bandwidth,launch,hostprof,gemv,sweep,model,graphs,torch")
ap.add_argument("--budget", type=float, default=270.0, help="seconds; optional parts are skipped past it")
ap.add_argument("--stories", help="stories260K converted to a Hugging Face directory (tinyserve convert llama2c); "
                "its greedy 200 tokens must equal expected_greedy200_ids.json beside it or in its parent")
args = ap.parse_args()
if args.dry_run:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

T0 = time.perf_counter()
RESULTS: dict = {"dry_run": args.dry_run, "sections": {}, "errors": {}}
SUMMARY: list[tuple[str, str]] = []  # (what, figure) rows of the final table
ONLY = {s for s in args.only.split(",") if s}


def elapsed() -> float:
    return time.perf_counter() - T0


def save() -> None:
    """Write what is known so far (after every section: a run cut short still leaves its figures)."""
    RESULTS["seconds"] = round(elapsed(), 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=float))


def finish(code: int = 0):
    save()
    print("\n" + "=" * 78)
    print(f"gpu_check summary ({RESULTS.get('device', '?')}; {elapsed():.0f} s)")
    for what, fig in SUMMARY:
        print(f"  {what:<48s} {fig}")
    if RESULTS["errors"]:
        print(f"  sections with errors: {', '.join(RESULTS['errors'])}")
    if args.out:
        print(f"  results written to {args.out}")
    sys.exit(code)


try:
    from tinyserve.ops import cuda as C
    from tinyserve.ops import reference as ref
except Exception as e:  # noqa: BLE001  (no GPU, no numba-cuda: say so and stop)
    RESULTS["errors"]["import"] = str(e)
    print(f"cannot use the CUDA backend: {e}")
    finish(1)

from numba import cuda  # noqa: E402

from tinyserve.config import config_from_dict, rope_inv_freq  # noqa: E402
from tinyserve.kv_cache import KVCache  # noqa: E402
from tinyserve.model import LayerWeights, Weights, forward, linear_shapes, upload_weights  # noqa: E402
from tinyserve.quant import QuantizedTensor, quantize  # noqa: E402
from tinyserve.tolerances import model_limits, op_limits  # noqa: E402

SIM = C.SIMULATOR
try:
    dev = cuda.get_current_device()
    RESULTS["device"] = "simulator" if SIM else f"{dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, " \
        f"cc {dev.compute_capability}, {C._sm_count()} SMs"
except Exception as e:  # noqa: BLE001
    RESULTS["device"] = f"unknown ({e})"
print(f"device: {RESULTS['device']}")

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                  original_max_position_embeddings=8192, rope_type="llama3"),
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
LLAMA_8B = dict(LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                tie_word_embeddings=False)
TINY = dict(LLAMA_1B, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=64, max_position_embeddings=512, rope_scaling=None)

rng = np.random.default_rng(0)


def section(name):
    """Run fn as a section: timed, its result stored, any exception printed and recorded."""

    def deco(fn):
        if ONLY and name not in ONLY:
            return fn
        print(f"\n--- {name} " + "-" * (70 - len(name)))
        t = time.perf_counter()
        try:
            RESULTS["sections"][name] = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[{name}] FAILED: {type(e).__name__}: {e}")
        print(f"[{name}] {time.perf_counter() - t:.1f} s")
        save()
        return fn

    return deco


def f32(*shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32, copy=False)


def random_qt(shape, bits, group=128, zero_point=False) -> QuantizedTensor:
    """A random quantized tensor built directly (no quantize(): fast for billion-value matrices)."""
    out, k = shape
    ng = -(-k // group)
    kp = ng * group
    data = rng.integers(0, 256, size=(out, kp if bits == 8 else kp // 2), dtype=np.uint8)
    if bits == 8:
        data = data.view(np.int8)
    scales = rng.uniform(0.001, 0.003, size=(out, ng)).astype(np.float32)
    zeros = rng.integers(0, 16, size=(out, ng), dtype=np.uint8) if zero_point else None
    return QuantizedTensor(bits, group, (out, k), data, scales, zeros)


def gpu_time(fn, min_seconds=0.05, max_reps=200) -> float:
    """Seconds per call of fn() (which launches GPU work), measured with CUDA events after a warm-up."""
    if SIM:  # the simulator has no timing events, and every call is slow: one call, timed on the host
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    fn()
    cuda.synchronize()
    t = time.perf_counter()
    fn()
    cuda.synchronize()
    one = max(time.perf_counter() - t, 1e-6)
    reps = int(max(3, min(max_reps, min_seconds / one)))
    e0, e1 = cuda.event(), cuda.event()
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    e1.synchronize()
    return cuda.event_elapsed_time(e0, e1) / 1000.0 / reps


def errors(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = float(np.sum(want**2)) or 1.0
    mx = float(np.max(np.abs(want))) or 1.0
    return float(np.sum((got - want) ** 2)) / den, float(np.max(np.abs(got - want))) / mx


# ============================================================================================ ops
@section("ops")
def check_ops():
    D, F, H, KVH, hd, T = (32, 48, 4, 2, 16, 9) if SIM else (2048, 8192, 32, 8, 64, 257)  # hd: as the configs
    up, down = C.upload, C.download
    rows = []

    def check(case, op, got, want, fmt="float32"):
        nmse, max_rel = errors(got, want)
        lim = op_limits(op, fmt)
        ok = nmse <= lim["nmse"] and max_rel <= lim["max_rel"]
        rows.append(dict(case=case, op=op, fmt=fmt, nmse=nmse, max_rel=max_rel, ok=ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {case:<40s} nmse {nmse:9.2e}  max_rel {max_rel:9.2e}")

    x = f32(7, D)
    idx = np.array([3, 0, 6, 3], np.int64)
    check("take_rows", "take_rows", down(C.take_rows(up(x), up(idx))), ref.take_rows(x, idx))
    a, b = f32(8 if SIM else 64, F), f32(8 if SIM else 64, F)
    check("add", "add", down(C.add(up(a), up(b))), ref.add(a, b))
    check("swiglu", "swiglu", down(C.swiglu(up(a), up(b))), ref.swiglu(a, b))
    x, w = f32(8 if SIM else 64, D), f32(D)
    check("rmsnorm", "rmsnorm", down(C.rmsnorm(up(x), up(w), 1e-5)), ref.rmsnorm(x, w, 1e-5))
    br = f32(*x.shape)
    got, want = C.add_rmsnorm(up(x), up(br), up(w), 1e-5), ref.add_rmsnorm(x, br, w, 1e-5)
    check("add_rmsnorm", "add_rmsnorm", np.stack([down(g) for g in got]), np.stack(want))
    cfg = config_from_dict(TINY if SIM else LLAMA_1B)
    inv = rope_inv_freq(cfg)
    q = f32(8 if SIM else 64, H, hd)
    pos = np.arange(q.shape[0], dtype=np.int64) * 37
    check("rope", "rope", down(C.rope(up(q), up(pos), up(inv))), ref.rope(q, pos, inv))
    kc, vc = f32(3, KVH, T, hd), f32(3, KVH, T, hd)
    dk, dv = up(kc), up(vc)
    hk, hv = kc.copy(), vc.copy()
    k, v = f32(4, KVH, hd), f32(4, KVH, hd)
    sl, ps = np.array([0, 2, 2, 1], np.int64), np.array([T - 1, 0, 1, 5], np.int64)
    C.kv_write(dk, dv, up(k), up(v), up(sl), up(ps))
    ref.kv_write(hk, hv, k, v, sl, ps)
    check("kv_write", "kv_write", np.stack([down(dk), down(dv)]), np.stack([hk, hv]))
    q4 = f32(4, H, hd)
    got = down(C.rope_kv_write(up(q4), up(k), up(v), dk, dv, up(sl), up(ps), up(inv)))
    want = ref.rope_kv_write(q4, k, v, hk, hv, sl, ps, inv)
    check("rope_kv_write", "rope_kv_write", np.concatenate([got.ravel(), down(dk).ravel(), down(dv).ravel()]),
          np.concatenate([want.ravel(), hk.ravel(), hv.ravel()]))
    for case, sl, ps, win in [("attention decode x3", [0, 1, 2], [T - 1, T // 2, 3], 0),
                              ("attention prefill", [1] * min(T, 64), list(range(min(T, 64))), 0),  # noqa: E501
                              ("attention window", [0, 1, 2], [T - 1, T // 2, 3], 5)]:
        sl, ps = np.array(sl, np.int64), np.array(ps, np.int64)
        q = f32(len(sl), H, hd)
        check(case, "attention", down(C.attention(up(q), dk, dv, up(sl), up(ps), win)),
              ref.attention(q, hk, hv, sl, ps, win))
    M, K = (20, 96) if SIM else (2048, D)
    wf = f32(M, K, scale=0.05)
    for fmt, w in [("float32", wf), ("int8", quantize(wf, 8, 128 if not SIM else 32)),
                   ("int4", quantize(wf, 4, 128 if not SIM else 32)), ("int4", quantize(wf, 4, 64, True))]:
        dw = up(w)
        label = fmt if isinstance(w, np.ndarray) else w.format
        for n in ((1, 5) if SIM else (1, 2, 4, 16, 64)):
            x = f32(n, K)
            check(f"linear {label} {M}x{K} N={n}", "linear", down(C.linear(up(x), dw)), ref.linear(x, w), fmt)
    bad = [r["case"] for r in rows if not r["ok"]]
    SUMMARY.append(("ops vs reference", f"{len(rows) - len(bad)}/{len(rows)} within tolerance"
                    + (f" (FAILED: {', '.join(bad)})" if bad else "")))
    return rows


# ========================================================================================= engine
MID_LLAMA = dict(LLAMA_1B, hidden_size=512, intermediate_size=1376, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=1, head_dim=64, vocab_size=3001, max_position_embeddings=2048)
MID_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=384, intermediate_size=1024,
                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, vocab_size=2000,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def engine_pair(cd, quant, bias=False):
    """The numpy and cuda LLMs of one random config, the same host weights."""
    from tinyserve.bench import random_weights
    from tinyserve.engine import LLM

    cfg = config_from_dict(cd)
    transform = None
    if quant:
        bits, group, zp = quant

        def transform(w):
            return quantize(w, bits, group, zp)

    w = random_weights(cfg, seed=1, transform=transform)
    if bias:  # Qwen2: q, k and v have biases (stacked with their matrices on load)
        shapes = linear_shapes(cfg)
        for layer in w.layers:
            for n in ("q", "k", "v"):
                setattr(layer, f"{n}_bias", f32(shapes[f"{n}_proj"][0], scale=0.1))
    label = "none" if not quant else f"int{quant[0]}"
    return cfg, LLM.from_weights(cfg, w, backend="numpy", quant=label), LLM.from_weights(cfg, w, backend="cuda",
                                                                                          quant=label)


def engine_logits(cfg, llm, lens=(23, 17), steps=4):
    """Logits of a two-sequence prefill (every row) and `steps` batched decode steps, fixed tokens."""
    r = np.random.default_rng(5)
    cache = llm.new_cache(len(lens), sum(lens) + steps + 1)
    ids = np.concatenate([r.integers(3, cfg.vocab_size, n) for n in lens])
    pos = np.concatenate([np.arange(n) for n in lens])
    slots = np.concatenate([np.full(n, i) for i, n in enumerate(lens)])
    out = [llm.forward(ids, pos, slots, cache)]
    for t in range(steps):
        tok = r.integers(3, cfg.vocab_size, len(lens))
        out.append(llm.forward(tok, np.array(lens) + t, np.arange(len(lens)), cache, phase="decode"))
    return np.concatenate(out)


@section("engine")
def check_engine():
    import subprocess

    import tinyserve
    from tinyserve.tolerances import passes
    from tinyserve.validate import logits_figures

    lim = model_limits("float32")  # the same dequantized weights on both backends: float32 limits for all
    rows = []

    def verdict(case, ok, detail):
        rows.append(dict(case=case, ok=bool(ok), **detail))
        print(f"  {'ok  ' if ok else 'FAIL'} {case:<46s} " + "  ".join(
            f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in detail.items()))

    cases = [("llama 512 GQA 8", MID_LLAMA, None, False), ("llama 512 int8 g128", MID_LLAMA, (8, 128, False), False),
             ("llama 512 int4 g128", MID_LLAMA, (4, 128, False), False),
             ("llama 512 int4 g64 zero point", MID_LLAMA, (4, 64, True), False),
             ("qwen2 384 biases", MID_QWEN, None, True), ("qwen2 384 int4 g32 biases", MID_QWEN, (4, 32, False), True)]
    if SIM:
        cases = [(c, dict(cd, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                          head_dim=16, vocab_size=70), (q[0], 32, q[2]) if q else None, b) for c, cd, q, b in cases[::3]]
    for case, cd, quant, bias in cases:
        cfg, ref_llm, gpu_llm = engine_pair(cd, quant, bias)
        lens, steps = ((5, 3), 2) if SIM else ((23, 17), 4)
        fig = logits_figures(engine_logits(cfg, gpu_llm, lens, steps), engine_logits(cfg, ref_llm, lens, steps))
        ok = all(passes(m, fig[m], lim[f"logits_{m}"]) for m in ("nmse", "max_rel", "kl_mean", "kl_max", "top1"))
        verdict(f"logits {case}", ok, {m: fig[m] for m in ("nmse", "max_rel", "kl_max", "top1", "positions")})
        del ref_llm, gpu_llm

    shipped = REPO / "weights" / "tinystories"
    prompts = ["Once", "The", "Lily"] if SIM else ["Once upon a time", "The little dog",
                                                  "Lily and Tom went to the park. They"]
    n_new = 2 if SIM else 60
    want = tinyserve.load(shipped, backend="numpy").generate(prompts, max_new_tokens=n_new, temperature=0.0)
    gpu = tinyserve.load(shipped, backend="cuda")
    t = time.perf_counter()
    got = gpu.generate(prompts, max_new_tokens=n_new, temperature=0.0, max_batch=2)  # continuous batching
    secs = time.perf_counter() - t
    verdict("shipped model greedy, 3 prompts, max_batch 2", [g.token_ids for g in got] == [w.token_ids for w in want],
            dict(tokens=sum(len(g.token_ids) for g in got), tok_s=sum(len(g.token_ids) for g in got) / secs))
    t = time.perf_counter()
    one = gpu.generate(prompts[0], max_new_tokens=n_new, temperature=0.0)[0]
    secs = time.perf_counter() - t
    verdict("shipped model greedy, batch 1", one.token_ids == want[0].token_ids,
            dict(tok_s=len(one.token_ids) / secs))
    if not SIM:
        cmd = [sys.executable, "-m", "tinyserve", "generate", "--backend", "cuda", "--prompt", prompts[0],
               "--max-new-tokens", str(n_new), "--temperature", "0", "--json", "--profile"]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        try:
            obj = json.loads(p.stdout)
            same = obj["token_ids"] == want[0].token_ids
            phases = {k: v["seconds"] for k, v in obj["profile"]["phases"].items()}
        except (ValueError, KeyError, TypeError):
            obj, same, phases = {}, False, {}
            print(f"  CLI exit {p.returncode}; stderr: {p.stderr[-2000:]}")
        verdict("CLI generate --backend cuda --profile", p.returncode == 0 and same,
                dict(exit=p.returncode, wall_s=wall, **{f"{k}_s": float(v) for k, v in phases.items()}))
        RESULTS["cli_profile"] = obj["profile"] if same else p.stderr[-4000:]
    if args.stories:
        sdir = Path(args.stories)
        ids_file = next((f for f in (sdir / "expected_greedy200_ids.json", sdir.parent / "expected_greedy200_ids.json")
                         if f.is_file()), None)
        llm = tinyserve.load(sdir, backend="cuda")
        n = 200 if not SIM else 3
        t = time.perf_counter()
        out = llm.generate("", max_new_tokens=n, temperature=0.0)[0]
        secs = time.perf_counter() - t
        expected = json.loads(ids_file.read_text())[:n] if ids_file else \
            tinyserve.load(sdir, backend="numpy").generate("", max_new_tokens=n, temperature=0.0)[0].token_ids
        verdict(f"stories260K greedy {n} tokens (expected ids)", out.token_ids == expected,
                dict(tok_s=n / secs, compile_s=llm.compile_seconds))
    if not SIM:
        try:
            from tinyserve.validate import validate

            for quant in (None, "int4"):
                rep = validate(shipped, backend="cuda", quant=quant)
                d = rep.to_dict()
                verdict(f"validate --backend cuda vs transformers, {quant or 'float32'}", rep.passed,
                        {k: v for k, v in (d.get("logits") or {}).items() if isinstance(v, float)})
        except Exception as e:  # noqa: BLE001  (transformers missing, or another version's internals)
            traceback.print_exc()
            verdict("validate --backend cuda vs transformers", False, dict(error=f"{type(e).__name__}: {e}"))
    bad = [r["case"] for r in rows if not r["ok"]]
    SUMMARY.append(("engine on the GPU vs numpy / transformers", f"{len(rows) - len(bad)}/{len(rows)} agree"
                    + (f" (FAILED: {', '.join(bad)})" if bad else "")))
    return rows


# ====================================================================================== bandwidth
COPY_BW = None


@section("bandwidth")
def check_bandwidth():
    global COPY_BW
    nbytes = (1 << 20) if SIM else (1 << 30)
    src = C.zeros((nbytes // 4,))
    dst = cuda.device_array(nbytes // 4, np.float32)
    t = gpu_time(lambda: dst.copy_to_device(src), min_seconds=0.2)
    COPY_BW = 2 * nbytes / t
    print(f"  device-to-device copy of {nbytes / 2**30:.3g} GiB: {t * 1e3:.3f} ms -> {COPY_BW / 1e9:.0f} GB/s "
          "(read + write)")
    SUMMARY.append(("copy bandwidth (read+write)", f"{COPY_BW / 1e9:.0f} GB/s"))
    return dict(bytes=nbytes, seconds=t, bandwidth=COPY_BW)


def frac(bw):
    return f"{100 * bw / COPY_BW:.0f}%" if COPY_BW else "n/a"


# ========================================================================================= launch
@section("launch")
def check_launch():
    a = C.zeros((16,))
    C.add(a, a)
    cuda.synchronize()
    reps = 20 if SIM else 2000
    t = time.perf_counter()
    for _ in range(reps):
        C.add(a, a)
    host = (time.perf_counter() - t) / reps
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        cuda.device_array(16, np.float32)
    alloc = (time.perf_counter() - t) / reps
    print(f"  one tiny op (wrapper + allocation + launch): {host * 1e6:.1f} us on the host; "
          f"device_array alone {alloc * 1e6:.1f} us")
    SUMMARY.append(("host cost of one op call", f"{host * 1e6:.1f} us"))
    return dict(op_call_us=host * 1e6, alloc_us=alloc * 1e6)


@section("hostprof")
def check_hostprof():
    """Where the host time of an op call goes: cProfile over repeated calls, the top functions by own time."""
    import cProfile
    import io
    import pstats

    a = C.zeros((16,))
    K = 64 if SIM else 2048
    x = C.upload(f32(1, K))
    w = C.upload(random_qt((40 if SIM else 2048, K), 4, 32 if SIM else 128))
    C.add(a, a)
    C.linear(x, w)
    cuda.synchronize()
    reps = 10 if SIM else 300
    out = {}
    for name, fn in (("add", lambda: C.add(a, a)), ("linear int4 N=1", lambda: C.linear(x, w))):
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for _ in range(reps):
            fn()
        prof.disable()
        per_call = (time.perf_counter() - t) / reps
        cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        text = buf.getvalue()
        print(f"  {name}: {per_call * 1e6:.1f} us per call under the profiler\n" +
              "\n".join("    " + line for line in text.splitlines()[6:32]))
        out[name] = dict(us_per_call_profiled=per_call * 1e6, stats=text)
    return out


# =========================================================================================== gemv
def weight_bytes(w) -> int:
    return int(w.nbytes)


def formats(shape):
    """(label, host weight) for every format, built fast (random)."""
    g = 32 if SIM else 128
    return [("float32", f32(*shape, scale=0.02)), ("int8", random_qt(shape, 8, g)), ("int4", random_qt(shape, 4, g)),
            ("int4-asym", random_qt(shape, 4, g, True))]


@section("gemv")
def check_gemv():
    shapes = {"tiny 40x64": (40, 64)} if SIM else {
        "1B q/o 2048x2048": (2048, 2048), "1B k/v 512x2048": (512, 2048), "1B gate/up 8192x2048": (8192, 2048),
        "1B down 2048x8192": (2048, 8192), "1B lm_head 128256x2048": (128256, 2048),
        "8B gate/up 14336x4096": (14336, 4096), "8B down 4096x14336": (4096, 14336)}
    out = []
    for sname, shape in shapes.items():
        for fmt, hw in formats(shape):
            w = C.upload(hw)
            for n in ((1, 5) if SIM else (1, 16)):
                x = C.upload(f32(n, shape[1]))
                t = gpu_time(lambda x=x, w=w: C.linear(x, w))
                bw = weight_bytes(hw) / t
                out.append(dict(shape=sname, fmt=fmt, N=n, seconds=t, weight_GBps=bw / 1e9,
                                frac_copy=(bw / COPY_BW) if COPY_BW else None))
                print(f"  {sname:<24s} {fmt:<9s} N={n:<3d} {t * 1e6:9.1f} us  {bw / 1e9:7.0f} GB/s  {frac(bw)}")
            del w
    for fmt in ("float32", "int8", "int4"):
        best = [r for r in out if r["fmt"] == fmt and r["N"] == 1]
        if best:
            big = max(best, key=lambda r: r["seconds"])  # the largest matrix: launch overhead matters least
            SUMMARY.append((f"GEMV {fmt} N=1 ({big['shape']})",
                            f"{big['weight_GBps']:.0f} GB/s = {frac(big['weight_GBps'] * 1e9)} of copy"))
    return out


@section("sweep")
def check_sweep():
    shapes = {"tiny 40x64": (40, 64)} if SIM else {"1B lm_head 128256x2048": (128256, 2048),
                                                      "1B gate/up 8192x2048": (8192, 2048)}
    variants = [(2, 1), (4, 2)] if SIM else [(1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2)]
    teams_list = (2,) if SIM else (4, 8)
    out = []
    for sname, shape in shapes.items():
        for fmt, bits in (("int8", 8), ("int4", 4)):
            hw = random_qt(shape, bits, 32 if SIM else 128)
            w = C.upload(hw)
            x = C.upload(f32(1, shape[1]))
            y = cuda.device_array((1, shape[0]), np.float32)
            for R, U in variants:
                for teams in teams_list:
                    try:
                        t = gpu_time(lambda: C._gemv(x, w, y, R, U, teams))
                    except Exception as e:  # noqa: BLE001  (e.g. too many registers for the block)
                        print(f"  {sname} {fmt} R={R} U={U} teams={teams}: {type(e).__name__}: {e}")
                        continue
                    bw = weight_bytes(hw) / t
                    out.append(dict(shape=sname, fmt=fmt, R=R, U=U, teams=teams, seconds=t, weight_GBps=bw / 1e9))
                    print(f"  {sname:<24s} {fmt} R={R} U={U} teams={teams}: {bw / 1e9:7.0f} GB/s  {frac(bw)}")
            rows = [r for r in out if r["shape"] == sname and r["fmt"] == fmt]
            if rows:
                b = max(rows, key=lambda r: r["weight_GBps"])
                SUMMARY.append((f"best GEMV {fmt} {sname.split()[1]}: R={b['R']} U={b['U']} teams={b['teams']}",
                                f"{b['weight_GBps']:.0f} GB/s = {frac(b['weight_GBps'] * 1e9)} of copy "
                                f"(default R,U={C.GEMV_SHAPE[1]})"))
    return out


# ========================================================================================== model
def build_weights(cfg, fmt):
    """Random host Weights for cfg: one random matrix per distinct shape, shared by every layer (each layer
    still gets its own device copy when uploaded, so the bytes read per step are the real model's)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    g = 32 if SIM else 128
    mats = {}
    for name, shape in linear_shapes(cfg).items():
        if fmt == "float32":
            mats[name] = f32(*shape, scale=0.02)
        else:
            mats[name] = random_qt(shape, 8 if fmt == "int8" else 4, g)
    layers = [LayerWeights(input_layernorm=np.ones(D, np.float32), post_attention_layernorm=np.ones(D, np.float32),
                           **mats) for _ in range(cfg.num_hidden_layers)]
    embed = f32(V, D, scale=0.02)
    if fmt == "float32":
        lm_head = embed if cfg.tie_word_embeddings else f32(V, D, scale=0.02)
    else:
        lm_head = random_qt((V, D), 8 if fmt == "int8" else 4, g)
    w = Weights(embed_tokens=embed, layers=layers, norm=np.ones(D, np.float32), lm_head=lm_head,
                inv_freq=rope_inv_freq(cfg))
    build_weights.last_bytes = decode_bytes(w)
    return w


def decode_bytes(w) -> int:
    """Bytes of weights one decode step reads: every linear matrix and the output head (plus norms)."""
    total = weight_bytes(w.lm_head) + w.norm.nbytes
    for layer in w.layers:
        for v in vars(layer).values():
            if v is not None:
                total += weight_bytes(v)
    return total


def time_decode(cfg, host, batches, prompt, steps):
    ops = C
    wdev = upload_weights(host, ops)
    nbytes = decode_bytes(host)
    res = []
    for B in batches:
        cache = KVCache(cfg, B, prompt + steps + 1, ops)
        ids = np.tile(np.arange(prompt, dtype=np.int64) % cfg.vocab_size, B)
        pos = np.tile(np.arange(prompt, dtype=np.int64), B)
        slots = np.repeat(np.arange(B, dtype=np.int64), prompt)
        last = (np.arange(B, dtype=np.int64) + 1) * prompt - 1
        up = ops.upload
        cuda.synchronize()
        t = time.perf_counter()
        ops.download(forward(wdev, cfg, ops, up(ids), up(pos), up(slots), cache, rows=up(last)))
        t_prefill = time.perf_counter() - t
        step_slots = up(np.arange(B, dtype=np.int64))
        times = []
        for s in range(steps + 1):  # the first step is a warm-up
            tok = up(np.full(B, 7 + s, np.int64))
            p = up(np.full(B, prompt + s, np.int64))
            t = time.perf_counter()
            ops.download(forward(wdev, cfg, ops, tok, p, step_slots, cache))  # download syncs, as the engine does
            times.append(time.perf_counter() - t)
        step = float(np.median(times[1:]))
        r = dict(batch=B, prompt=prompt, prefill_s=t_prefill, prefill_tok_s=B * prompt / t_prefill,
                 step_s=step, tok_s=B / step, weight_bytes=nbytes, weight_GBps=nbytes / step / 1e9)
        res.append(r)
        print(f"  B={B:<3d} decode {step * 1e3:8.2f} ms/step  {B / step:8.1f} tok/s  weights {nbytes / step / 1e9:6.0f} GB/s "
              f"{frac(nbytes / step)}   prefill {B * prompt} tok in {t_prefill:.2f} s (first call: compiles)")
        del cache
    del wdev
    return res


MODEL_RESULTS = {}


@section("model")
def check_model():
    out = {}
    models = [("tiny", TINY)] if SIM else [("1B", LLAMA_1B), ("8B", LLAMA_8B)]
    batches = (1, 2) if SIM else (1, 16)
    prompt, steps = (3, 1) if SIM else (128, 16)
    for mname, cd in models:
        cfg = config_from_dict(cd)
        for fmt in ("float32", "int8", "int4"):
            if mname == "8B" and elapsed() > args.budget * 0.6:
                print(f"  skipping {mname} {fmt}: over {args.budget * 0.6:.0f} s of the time budget")
                continue
            print(f"  {mname} {fmt}:")
            host = build_weights(cfg, fmt)
            try:
                out[f"{mname} {fmt}"] = time_decode(cfg, host, batches, prompt, steps)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory for 8B float32)
                traceback.print_exc()
                out[f"{mname} {fmt}"] = f"{type(e).__name__}: {e}"
                continue
            finally:
                del host
            for r in out[f"{mname} {fmt}"]:
                SUMMARY.append((f"{mname} {fmt} decode B={r['batch']}",
                                f"{r['step_s'] * 1e3:.2f} ms/step, {r['tok_s']:.0f} tok/s, {frac(r['weight_GBps'] * 1e9)} of copy"))
    MODEL_RESULTS.update(out)
    return out


GRAPH_RESULTS = {}


@section("graphs")
def check_graphs():
    """Decode steps through the engine (LLM.forward), op by op and replayed as CUDA graphs: same logits, and
    the time per step of each, Llama-3.2-1B shapes, batch 1 and 16."""
    from tinyserve.engine import LLM

    cd = TINY if SIM else LLAMA_1B
    cfg = config_from_dict(cd)
    prompt, steps = (3, 3) if SIM else (64, 20)
    out = {}
    for fmt in ("float32", "int8", "int4"):
        host = build_weights(cfg, fmt)
        llm = LLM.from_weights(cfg, host, backend="cuda", quant=None if fmt == "float32" else fmt)
        del host
        rows = []
        for B in ((1, 2) if SIM else (1, 16)):
            cache = llm.new_cache(B, prompt + 2 * steps + 8)
            r = np.random.default_rng(B)
            ids = r.integers(3, cfg.vocab_size, B * prompt)
            llm.forward(ids, np.tile(np.arange(prompt), B), np.repeat(np.arange(B), prompt), cache)
            slots = np.arange(B)
            plain_t, graph_t, same = [], [], True
            for s in range(steps):
                tok = r.integers(3, cfg.vocab_size, B)
                pos = np.full(B, prompt + s)
                t = time.perf_counter()
                g = llm.forward(tok, pos, slots, cache, phase="decode")  # step 1 plain, 2 records, then replays
                graph_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                p = llm.forward(tok, pos, slots, cache, phase="prefill")  # the same step op by op (the same
                plain_t.append(time.perf_counter() - t)  # K and V written again at the same place)
                same = same and bool(np.array_equal(g, p))
            recorded = sorted(getattr(cache, "step_graphs").steps) if hasattr(cache, "step_graphs") else []
            tg, tp = float(np.median(graph_t[2:])), float(np.median(plain_t[2:]))
            nbytes = build_weights.last_bytes
            row = dict(batch=B, graph_step_s=tg, plain_step_s=tp, speedup=tp / tg, identical=same,
                       recorded=recorded, graphs_on=C.GRAPHS, tok_s=B / tg)
            if nbytes:
                row.update(weight_bytes=nbytes, weight_GBps=nbytes / tg / 1e9)
            rows.append(row)
            print(f"  1B {fmt:<8s} B={B:<3d} graph {tg * 1e3:8.3f} ms/step  op by op {tp * 1e3:8.3f} ms/step  "
                  f"x{tp / tg:5.1f}  {B / tg:9.1f} tok/s  " + (f"{frac(nbytes / tg)} of copy  " if nbytes else "")
                  + f"logits identical: {same}  recorded sizes {recorded}")
            SUMMARY.append((f"1B {fmt} decode B={B}, CUDA graph", f"{tg * 1e3:.3f} ms/step, {B / tg:.0f} tok/s "
                            f"(op by op {tp * 1e3:.2f} ms), identical: {same}"))
            del cache
        out[fmt] = rows
        del llm
    GRAPH_RESULTS.update(out)
    return out


# ========================================================================================== torch
@section("torch")
def check_torch():
    try:
        import warnings

        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values' deprecation notice
    except ImportError as e:
        print(f"  skipped: {e}")
        return "skipped: torch/transformers not importable"
    if not torch.cuda.is_available():
        print("  skipped: torch has no CUDA")
        return "skipped: torch without CUDA"
    out = {}
    prompt, steps = 128, 16
    for mname, cd in [("1B", LLAMA_1B)]:
        cfg = LlamaConfig(**{k: v for k, v in cd.items() if k not in ("architectures", "torch_dtype")},
                          attn_implementation="eager")
        torch.manual_seed(0)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            model = LlamaForCausalLM(cfg).eval()
            torch.set_default_dtype(torch.float32)
        res = []
        for B in (1, 16):
            with torch.no_grad():
                ids = torch.randint(0, cfg.vocab_size, (B, prompt), device="cuda")
                o = model(ids, use_cache=True)
                past = o.past_key_values
                nxt = o.logits[:, -1:].argmax(-1)
                times = []
                for _ in range(steps + 1):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    o = model(nxt, past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    nxt = o.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
            step = float(np.median(times[1:]))
            res.append(dict(batch=B, step_s=step, tok_s=B / step))
            print(f"  torch {mname} bf16 eager B={B}: {step * 1e3:.2f} ms/step, {B / step:.0f} tok/s")
            SUMMARY.append((f"torch {mname} bf16 eager decode B={B}", f"{step * 1e3:.2f} ms/step, {B / step:.0f} tok/s"))
            mine = [r for r in GRAPH_RESULTS.get("int4", []) if r["batch"] == B] if mname == "1B" else []
            if mine:
                SUMMARY.append((f"  -> tinyserve int4 (CUDA graph) vs torch bf16, {mname} B={B}",
                                f"{step / mine[0]['graph_step_s']:.2f}x (target >= 2x at B=1)"))
            ours = MODEL_RESULTS.get(f"{mname} int4")
            if isinstance(ours, list):
                mine = [r for r in ours if r["batch"] == B]
                if mine:
                    SUMMARY.append((f"  -> tinyserve int4 vs torch bf16, {mname} B={B}",
                                    f"{step / mine[0]['step_s']:.2f}x (target >= 2x at B=1)"))
        out[mname] = res
        del model
        torch.cuda.empty_cache()
    return out


finish(1 if RESULTS["errors"] else 0)
