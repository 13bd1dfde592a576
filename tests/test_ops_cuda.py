"""The CUDA backend (tinyserve/ops/cuda.py) against the reference ops, on a machine without a GPU.

Numba's CUDA simulator runs the kernels in Python threads; it must be switched on (NUMBA_ENABLE_CUDASIM=1)
before numba is first imported, and other test modules import numba in this same pytest process. So the
simulator checks run in a child process: this file, executed as a script with the variable set
(`python tests/test_ops_cuda.py ops` or `... generate DIR`), prints its results as JSON, and the tests
below start it once per session and assert on what it printed. Run by hand:

    NUMBA_ENABLE_CUDASIM=1 python tests/test_ops_cuda.py ops

The simulator costs milliseconds per thread and per barrier, so every shape here is tiny; cuda.py shrinks
its launch configurations on the simulator (4-lane "warps", small tiles, at most 3 blocks) so that the
multi-block, multi-chunk and grid-stride paths still run.

The simulator runs kernels as Python, so it cannot catch what Numba's CUDA compiler rejects: a third worker
(`python tests/test_ops_cuda.py ptx`, simulator off) compiles every kernel variant to PTX for sm_90, which
needs NVRTC and libNVVM but no GPU (skipped where they are missing). Tests that need a real GPU are marked
`gpu`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


# ================================================================================ the simulator worker
def _stats(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if not np.isfinite(got).all():
        return float("inf"), float("inf")
    den = float(np.sum(want**2))
    nmse = float(np.sum((got - want) ** 2)) / den if den else float(np.sum((got - want) ** 2))
    mx = float(np.max(np.abs(want))) if want.size else 0.0
    max_rel = float(np.max(np.abs(got - want))) / mx if mx else float(np.max(np.abs(got - want), initial=0.0))
    return nmse, max_rel


def _worker_ops() -> list[dict]:
    """Every CUDA op against the reference on tiny odd shapes (runs with the simulator on)."""
    from tinyserve.ops import cuda as C
    from tinyserve.ops import reference as ref
    from tinyserve.quant import quantize
    from tinyserve.tolerances import op_limits

    assert C.SIMULATOR, "the worker must run with NUMBA_ENABLE_CUDASIM=1"
    rng = np.random.default_rng(1234)
    out = []

    def f32(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def check(case, op, got, want, fmt="float32"):
        nmse, max_rel = _stats(got, want)
        lim = op_limits(op, fmt)
        out.append(dict(case=case, op=op, fmt=fmt, nmse=nmse, max_rel=max_rel,
                        ok=bool(nmse <= lim["nmse"] and max_rel <= lim["max_rel"])))

    up, down = C.upload, C.download

    # take_rows: repeated and out-of-order ids; 35 elements over 24 threads (grid-stride)
    x = f32(13, 7)
    idx = np.array([3, 0, 12, 3, 7], np.int64)
    check("take_rows 13x7[5]", "take_rows", down(C.take_rows(up(x), up(idx))), ref.take_rows(x, idx))

    a, b = f32(5, 11), f32(5, 11)
    check("add 5x11", "add", down(C.add(up(a), up(b))), ref.add(a, b))
    g = f32(5, 11, scale=3.0)
    g[0, :3] = [-100.0, 100.0, 0.0]  # exp overflow: silu(-100) is -0
    check("swiglu 5x11", "swiglu", down(C.swiglu(up(g), up(b))), ref.swiglu(g, b))

    # rmsnorm: odd row length, more rows than blocks
    x, w = f32(5, 37), f32(37)
    check("rmsnorm 5x37", "rmsnorm", down(C.rmsnorm(up(x), up(w), 1e-5)), ref.rmsnorm(x, w, 1e-5))
    br = f32(5, 37)
    s, h = C.add_rmsnorm(up(x), up(br), up(w), 1e-5)
    rs, rh = ref.add_rmsnorm(x, br, w, 1e-5)
    check("add_rmsnorm 5x37 sum", "add", down(s), rs)
    check("add_rmsnorm 5x37 norm", "add_rmsnorm", down(h), rh)

    # rope: positions up to 1000 (float32 angles), head dim 10
    x = f32(3, 2, 10)
    pos = np.array([0, 5, 1000], np.int64)
    inv = (1.0 / (10000.0 ** (np.arange(0, 10, 2, dtype=np.float32) / 10))).astype(np.float32)
    check("rope 3x2x10", "rope", down(C.rope(up(x), up(pos), up(inv))), ref.rope(x, pos, inv))

    # kv_write into a device cache, compared with the reference writing into a host cache
    S, KVH, T, hd = 2, 2, 9, 4
    kc, vc = C.zeros((S, KVH, T, hd)), C.zeros((S, KVH, T, hd))
    hk, hv = np.zeros((S, KVH, T, hd), np.float32), np.zeros((S, KVH, T, hd), np.float32)
    k, v = f32(3, KVH, hd), f32(3, KVH, hd)
    slots, pos = np.array([1, 0, 1], np.int64), np.array([0, 4, 8], np.int64)
    C.kv_write(kc, vc, up(k), up(v), up(slots), up(pos))
    ref.kv_write(hk, hv, k, v, slots, pos)
    check("kv_write", "kv_write", np.stack([down(kc), down(vc)]), np.stack([hk, hv]))
    # rope_kv_write: rope(q) returned, rope(k) and v written (2 query heads per KV head, head dim 4)
    q2, inv2 = f32(3, 2 * KVH, hd), inv[:hd // 2].copy()
    got_q = down(C.rope_kv_write(up(q2), up(k), up(v), kc, vc, up(slots), up(pos), up(inv2)))
    want_q = ref.rope_kv_write(q2, k, v, hk, hv, slots, pos, inv2)
    check("rope_kv_write", "rope_kv_write", np.concatenate([got_q.ravel(), down(kc).ravel(), down(vc).ravel()]),
          np.concatenate([want_q.ravel(), hk.ravel(), hv.ravel()]))
    check("zeros", "add", down(C.zeros((3, 5))), np.zeros((3, 5), np.float32))

    # attention: a prefill of 6 tokens (several key chunks), and a mixed step (a prompt continuing in slot 1
    # and a decoding token at position 9 in slot 0), with and without a sliding window; 2 query heads per KV head
    H, KVH, hd, T = 4, 2, 8, 12
    kc, vc = f32(2, KVH, T, hd), f32(2, KVH, T, hd)
    dkc, dvc = up(kc), up(vc)
    for case, slots, pos, window in [
        ("attention prefill 6", [0] * 6, [0, 1, 2, 3, 4, 5], 0),
        ("attention mixed", [1, 1, 0], [3, 4, 9], 0),
        ("attention window 3", [1, 1, 0], [3, 4, 9], 3),
    ]:
        slots, pos = np.array(slots, np.int64), np.array(pos, np.int64)
        q = f32(len(slots), H, hd)
        got = down(C.attention(up(q), dkc, dvc, up(slots), up(pos), window))
        check(case, "attention", got, ref.attention(q, kc, vc, slots, pos, window))

    # linear, float32: GEMV for N = 1, 2, 3 (token tiles 1, 2, 4), GEMV passes over 4 + 2 rows for N = 6, and
    # the tiled GEMM for N = 17;
    # K = 150 is two chunks of the GEMV's shared x buffer; 37 rows are more row blocks than blocks (so a block
    # reuses its staged x) and not a multiple of any tile
    M, K = 37, 150
    w, bias = f32(M, K), f32(M)
    dw = up(w)
    for n in (1, 2, 3, 6, 17):
        x = f32(n, K)
        check(f"linear f32 N={n}", "linear", down(C.linear(up(x), dw)), ref.linear(x, w))
    x = f32(2, K)
    check("linear f32 bias", "linear", down(C.linear(up(x), dw, up(bias))), ref.linear(x, w, bias))

    # linear, quantized: int8, int4, int4 with zero points; K = 100 pads the last group
    for bits, gs, zp, K, ns in [(8, 32, False, 100, (1, 3, 6)), (4, 32, False, 100, (1, 2, 3, 6)),
                                (4, 64, True, 100, (1, 6, 17)), (4, 32, False, 160, (1,)), (8, 32, False, 200, (1,))]:
        qt = quantize(f32(M, K), bits, gs, zp)
        dq = up(qt)
        fmt = f"int{bits}"
        for n in ns:
            x = f32(n, K)
            check(f"linear {qt.format} g{gs} K={K} N={n}", "linear", down(C.linear(up(x), dq)), ref.linear(x, qt), fmt)

    # warm-up (a no-op on the simulator) runs every kernel once on tiny arrays: run its body here
    class _W:  # a stand-in for model.Weights holding one quantized matrix
        layers = []
        lm_head = up(quantize(f32(8, 64), 4, 32, True))

    C._warm(_W)
    out.append(dict(case="warm-up runs", op="add", fmt="float32", nmse=0.0, max_rel=0.0, ok=True))

    # and the project's own randomized cases (tinyserve.testing.check_op: odd sizes, every weight format);
    # attention's cases are the simulator's most expensive, so fewer of them
    from tinyserve.ops import OP_NAMES
    from tinyserve.testing import check_op

    for name in OP_NAMES:
        rep = check_op(name, getattr(C, name), cases=3 if name == "attention" else 12, ops=C)
        for c in rep.cases:
            out.append(dict(case=f"check_op {name} {c.case} {c.note}".strip(), op=name, fmt=c.format,
                            nmse=float(c.nmse), max_rel=float(c.max_rel), ok=bool(c.passed)))
    return out


def _worker_generate(model_dir: str) -> dict:
    """Greedy generation of 4 tokens of stories260K on the simulator and on the NumPy backend.

    The prompt "Once" is 2 tokens with BOS: one prefill step of N = 2, then three decode steps of N = 1 (the
    simulator's cost grows with tokens x weights, so this is as short as a real generation gets).
    """
    import tinyserve
    from tinyserve.ops import cuda as C

    res = {}
    for backend in ("numpy", "cuda"):
        llm = tinyserve.load(model_dir, backend=backend)
        out = llm.generate("Once", max_new_tokens=4, temperature=0.0, context=8)[0]
        res[backend] = out.token_ids
        res[backend + "_text"] = out.text
    # decode steps: the first of one token runs plainly, the second records the step (on the simulator:
    # keeps its input buffers, and replays by running it on them), the third replays
    res["recorded_sizes"] = sorted(llm.last_generator.cache.step_graphs.steps)
    # tinyserve bench on the cuda backend: its bandwidth comes from the GPU's read kernel, not the CPU's
    from tinyserve.bench import run_bench

    res["bench"] = run_bench(shape="stories260K", backends=("cuda",), quants=("none",), batches=(1,),
                             prompt_tokens=2, gen_tokens=3, repetitions=1, progress=False)

    def fail(*args):
        raise RuntimeError("no graphs here")

    C._RecordedStep = fail  # a recording that fails switches graphs off and steps run plainly
    res["cuda_after_failure"] = llm.generate("Once", max_new_tokens=4, temperature=0.0, context=8)[0].token_ids
    res["graphs_after_failure"] = C.GRAPHS
    return res


def kernel_signatures(C):
    """(name, python function, numba signature) of every kernel variant cuda.py can launch on a GPU."""
    from numba import types as nt

    def arr(dt, nd):
        return nt.Array(dt, nd, "C")

    f1, f2, f3, f4 = (arr(nt.float32, d) for d in (1, 2, 3, 4))
    i1, u2, b2, i64, f32 = arr(nt.int64, 1), arr(nt.uint32, 2), arr(nt.uint8, 2), nt.int64, nt.float32
    sigs = [
        ("fill", C._fill_kernel, (f1, f32)),
        ("take_rows", C._take_rows_kernel, (f2, i1, f2)),
        ("add", C._add_kernel, (f1, f1, f1)),
        ("swiglu", C._swiglu_kernel, (f1, f1, f1)),
        ("add_bias", C._add_bias_kernel, (f2, f1)),
        ("columns", C._columns_kernel, (f2, i64, f2)),
        ("rope", C._rope_kernel, (f3, i1, f1, f3)),
        ("kv_write", C._kv_write_kernel, (f4, f4, f3, f3, i1, i1)),
        ("rmsnorm", C._rmsnorm_kernel, (f2, f1, f32, f2)),
        ("add_rmsnorm", C._add_rmsnorm_kernel, (f2, f2, f1, f32, f2, f2)),
        ("attention", C._attention_kernel, (f3, f4, f4, i1, i1, i64, f32, i64, f3)),
        ("read", C._read_kernel, (f1, f1)),
    ]
    for nt_, (r, u) in C.GEMV_SHAPE.items():
        sigs.append((f"gemv_f32_nt{nt_}", C._gemv_f32(nt_, r, u), (f2, f2, f2, i64, i64)))
        for bits, z in ((8, False), (4, False), (4, True)):
            sigs.append((f"gemv_int{bits}{'z' * z}_nt{nt_}", C._gemv_q(bits, nt_, r, z, u),
                         (f2, u2, f2, b2, f2, i64, i64, i64, i64)))
    for bits, z in ((32, False), (8, False), (4, False), (4, True)):
        w = f2 if bits == 32 else u2
        sigs.append((f"gemm_{bits}{'z' * z}", C._gemm(bits, z), (f2, w, f2, b2, f2, i64, i64, i64, i64)))
    return [(name, getattr(k, "py_func", k), sig) for name, k, sig in sigs]


def _worker_ptx() -> dict:
    """Compile every kernel for a real GPU (sm_90) without one: catches what the simulator cannot (typing
    errors, unsupported Python in a kernel). Needs NVRTC and libNVVM (CUDA toolkit libraries), not a GPU."""
    from types import SimpleNamespace

    from numba import cuda
    from numba.cuda import dispatcher

    cuda.is_available = lambda: True  # cuda.py checks for a GPU at import; compiling needs none
    # device functions compile for the current device's compute capability: pretend it is an H100/H200's
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    from tinyserve.ops import cuda as C

    assert not C.SIMULATOR
    out = {}
    for name, fn, sig in kernel_signatures(C):
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        out[name] = dict(lines=ptx.count("\n"), local=ptx.count(".local"))
    return out


def _can_compile_ptx() -> bool:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = ("from numba import cuda, float32\n"
            "def k(a):\n    a[0] = float32(1)\n"
            "cuda.compile_ptx(k, (float32[:],), cc=(9, 0))\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


if __name__ == "__main__":
    what = sys.argv[1]
    sys.path.insert(0, str(REPO))
    if what == "ptx":
        print("RESULT " + json.dumps(_worker_ptx()))
        sys.exit(0)
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "set NUMBA_ENABLE_CUDASIM=1"
    sys.setswitchinterval(1e-4)  # the simulator's barrier hand-offs between Python threads go faster
    import warnings

    warnings.filterwarnings("ignore", "overflow", RuntimeWarning)  # the simulator's exp(100) in float32: inf, as on a GPU
    result = _worker_ops() if what == "ops" else _worker_generate(sys.argv[2])
    print("RESULT " + json.dumps(result))
    sys.exit(0)


# ====================================================================================== the tests
import pytest  # noqa: E402


def _run_worker(*args, timeout=300, sim=True):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    if not sim:
        env.pop("NUMBA_ENABLE_CUDASIM")
    p = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=str(REPO))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        pytest.fail(f"simulator worker {args} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def sim_ops():
    return _run_worker("ops")


def test_every_cuda_op_matches_the_reference(sim_ops):
    bad = [r for r in sim_ops if not r["ok"]]
    assert not bad, "\n".join(f"{r['case']}: nmse {r['nmse']:.3g} max_rel {r['max_rel']:.3g}" for r in bad)
    ops = {r["op"] for r in sim_ops}
    from tinyserve.ops import OP_NAMES

    assert ops == set(OP_NAMES), f"ops not checked: {set(OP_NAMES) - ops}"
    assert {"float32", "int8", "int4"} <= {r["fmt"] for r in sim_ops if r["op"] == "linear"}


def test_cuda_backend_defines_every_name():
    """Without importing it (no GPU here): the module's source defines every op and array function."""
    import ast

    from tinyserve.ops import ARRAY_NAMES, OP_NAMES

    tree = ast.parse((REPO / "tinyserve" / "ops" / "cuda.py").read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(OP_NAMES) | set(ARRAY_NAMES) <= defined


def test_greedy_generation_on_the_simulator_matches_numpy(stories_dir):
    res = _run_worker("generate", str(stories_dir))
    assert res["cuda"] == res["numpy"] and len(res["numpy"]) == 4
    assert res["recorded_sizes"] == [1]  # decode steps of one token went through StepGraphs
    assert res["cuda_after_failure"] == res["numpy"] and res["graphs_after_failure"] is False
    bench = res["bench"]
    assert list(bench["bandwidth_by_backend"]) == ["cuda"] and min(bench["bandwidth_by_backend"]["cuda"]) > 0
    (r,) = bench["results"]
    assert r["backend"] == "cuda" and r["decode_tok_s"] > 0 and r["bandwidth_gb_s"] == max(bench["bandwidth_gb_s"])
    assert res["cuda_text"] == " upon a time,"  # stories260K's expected greedy text begins so


def test_no_gpu_is_one_clear_line(stories_dir):
    """Without a GPU and without the simulator, --backend cuda fails with exit 2 and one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(REPO)
    code = "from numba import cuda; import sys; sys.exit(3 if cuda.is_available() else 0)"
    if subprocess.run([sys.executable, "-c", code], env=env).returncode == 3:
        pytest.skip("this machine has a GPU")
    p = subprocess.run([sys.executable, "-m", "tinyserve", "generate", "--model", str(stories_dir), "--backend",
                        "cuda", "--prompt", "x", "--max-new-tokens", "1"], capture_output=True, text=True, env=env,
                       cwd=str(REPO))
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU found" in err[0] and "NUMBA_ENABLE_CUDASIM=1" in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_every_kernel_compiles_for_a_gpu():
    """Every kernel variant compiles to PTX for sm_90 (skipped where the CUDA compiler libraries are missing)."""
    if not _can_compile_ptx():
        pytest.skip("numba cannot compile PTX here (no NVRTC / libNVVM)")
    res = _run_worker("ptx", sim=False)
    assert len(res) >= 9 + 4 * len((1, 2, 4)) + 4
    # register-resident accumulators: no local-memory arrays in the GEMV and GEMM kernels
    assert all(v["local"] == 0 for k, v in res.items() if k.startswith(("gemv", "gemm"))), res


@pytest.mark.gpu
def test_ops_on_a_real_gpu():
    """On a GPU machine: every op on real sizes (bench/gpu_check.py --only ops does the same, with timings)."""
    pytest.importorskip("numba.cuda")
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--only", "ops"],
                       capture_output=True, text=True, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
