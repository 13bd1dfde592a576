"""Check your own kernel against tinyserve's reference op, then swap it into the model.

    from tinyserve.testing import check_op
    report = check_op("linear", my_linear)          # randomized shapes, odd sizes, quantized weights too
    report.passed, report.cases[0].nmse             # one small result object per case
    print(report.table())

`check_op(name, fn)` calls `fn` with the same arguments as the reference op of that name
(tinyserve/ops/reference.py, the executable specification) on randomized cases and compares the outputs:
NMSE = sum((y - ref)^2) / sum(ref^2) and the largest absolute difference, against the op's tolerance in
tinyserve/tolerances.py. For ops that write in place (kv_write) the arrays written are compared (rope_kv_write:
its result and the caches it wrote).

To see what a kernel does to a whole model, `SwappedOps(base_ops, name=fn)` is an ops object whose
attribute `name` is your function and everything else the backend's; `tinyserve validate --kernel
pkg.mod:fn --op NAME` runs the model with it and without it and reports both the op-level and the
model-level errors. While such a forward runs, `current_layer()` says which decoder layer is computing,
so a debugging kernel can act on one layer only.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import TinyserveError
from .ops import OP_NAMES, Stacked, split_columns
from .ops import reference as ref
from .tolerances import op_limits

# ------------------------------------------------------------------------------------------ layer context
_state = threading.local()


def current_layer():
    """The decoder layer being computed by a forward pass run through `SwappedOps.tracking_tap`, else None.

    None also before the first layer (the embedding lookup) and after the last (final norm, output head).
    """
    return getattr(_state, "layer", None)


def _set_layer(layer) -> None:
    _state.layer = layer


class SwappedOps:
    """An ops object: the backend's ops, with some replaced by other functions.

        ops = SwappedOps(tinyserve.ops.get_ops("numpy"), linear=my_linear)
        llm.ops = ops                      # LLM.forward passes self.ops to model.forward

    A replaced linear is given plain matrices only: the model's stacked weights (ops.Stacked: q, k and v; gate
    and up) reach it as their stacked matrix, and its output is split here, as a backend's linear does; a
    matrix the cpu backend holds packed (cpu.PackedWeights, with its int8-activation option) reaches it as
    the QuantizedTensor it holds (unpacked on each call: a copy, slow but exact). A replaced rmsnorm or add
    also does the work of add_rmsnorm (the model's residual add and the norm after it, fused), unless
    add_rmsnorm is replaced too: add_rmsnorm is then add followed by rmsnorm, each the replaced one or the
    backend's, so a swapped-in norm sees every norm of the model. Likewise a replaced rope or kv_write does
    the work of rope_kv_write (rope of q and k, and the cache write), unless rope_kv_write is replaced too.
    """

    def __init__(self, base, **overrides):
        unknown = sorted(set(overrides) - set(OP_NAMES))
        if unknown:
            raise TinyserveError(f"unknown op name(s) {', '.join(unknown)} (ops are: {', '.join(OP_NAMES)})")
        if "linear" in overrides:
            overrides["linear"] = _unstacking(overrides["linear"], base)
        if ("rmsnorm" in overrides or "add" in overrides) and "add_rmsnorm" not in overrides:
            add, rmsnorm = overrides.get("add", base.add), overrides.get("rmsnorm", base.rmsnorm)

            def add_rmsnorm(x, branch, weight, eps):
                s = add(x, branch)
                return s, rmsnorm(s, weight, eps)

            overrides["add_rmsnorm"] = add_rmsnorm
        if ("rope" in overrides or "kv_write" in overrides) and "rope_kv_write" not in overrides:
            rope, kv_write = overrides.get("rope", base.rope), overrides.get("kv_write", base.kv_write)

            def rope_kv_write(q, k, v, k_cache, v_cache, slots, positions, inv_freq):
                kv_write(k_cache, v_cache, rope(k, positions, inv_freq), v, slots, positions)
                return rope(q, positions, inv_freq)

            overrides["rope_kv_write"] = rope_kv_write
        self._base = base
        self._overrides = dict(overrides)

    def __getattr__(self, name):
        overrides = self.__dict__.get("_overrides", {})
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)

    def tracking_tap(self, num_layers: int, tap=None):
        """A tap for model.forward that keeps current_layer() up to date (and forwards to `tap`)."""
        return layer_tracking_tap(num_layers, tap)


def _unstacking(linear, base):
    """linear(x, w, bias) that takes ops.Stacked weights too: the stacked matrix, then its columns split."""

    def plain(w):  # a backend's own host layout back to the QuantizedTensor it holds
        return w.unpack() if hasattr(w, "unpack") else w

    def call(x, w, bias=None):
        if isinstance(w, Stacked):
            y = linear(x, plain(w.weight), bias)
            return tuple(base.upload(p) for p in split_columns(base.download(y), w.parts))
        return linear(x, plain(w), bias)

    return call


def layer_tracking_tap(num_layers: int, tap=None):
    """tap(name, layer, array) for model.forward that sets current_layer() as the forward proceeds.

    model.forward taps "embed" before layer 0, "attn" i and "mlp" i inside layer i, then "norm" and "logits".
    Call `_set_layer(None)` (or use `layer_context`) when the forward is over.
    """

    def tracking(name, layer, array):
        if tap is not None:
            tap(name, layer, array)
        if name == "embed":
            _set_layer(0)
        elif name == "mlp":
            _set_layer(layer + 1 if layer + 1 < num_layers else None)
        elif name in ("norm", "logits"):
            _set_layer(None)

    return tracking


class layer_context:
    """with layer_context(): ...  -- current_layer() is None before and after (even on errors)."""

    def __enter__(self):
        _set_layer(None)
        return self

    def __exit__(self, *exc):
        _set_layer(None)
        return False


# ---------------------------------------------------------------------------------------- kernel specs
def load_kernel(spec: str):
    """'package.module:function' -> the function (one-line TinyserveError when it cannot be found)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise TinyserveError(f"--kernel must look like package.module:function, got {spec!r}")
    mod_name, fn_name = spec.split(":")
    ident = all(part.isidentifier() for part in mod_name.split(".")) and fn_name.isidentifier()
    if not mod_name or not ident:
        raise TinyserveError(f"--kernel must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise TinyserveError(f"--kernel {spec}: cannot import {mod_name} ({e})") from None
    except Exception as e:  # the user's module failed while being imported
        raise TinyserveError(f"--kernel {spec}: importing {mod_name} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise TinyserveError(f"--kernel {spec}: {mod_name} has no attribute {fn_name}")
    if not callable(fn):
        raise TinyserveError(f"--kernel {spec}: {mod_name}.{fn_name} is not callable")
    return fn


# -------------------------------------------------------------------------------------------- results
@dataclass
class CaseResult:
    """One randomized case of check_op."""

    op: str
    case: str  # what the inputs were, e.g. "N=3 K=129 M=65 bias int4/g32"
    format: str  # float32, float16, bfloat16 (weights' values), int8, int4 (quantized weights)
    nmse: float  # sum((y - ref)^2) / sum(ref^2)
    max_err: float  # max |y - ref|
    max_rel: float  # max |y - ref| / max |ref|
    limit_nmse: float
    limit_max_rel: float
    passed: bool
    note: str = ""  # why it failed, when it is not about the numbers (wrong shape, NaN)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OpCheck:
    """check_op's answer: one CaseResult per case and whether they all passed."""

    op: str
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def worst(self) -> CaseResult | None:
        return max(self.cases, key=lambda c: c.nmse / c.limit_nmse if c.limit_nmse else (np.inf if c.nmse else 0),
                   default=None)

    def __iter__(self):
        return iter(self.cases)

    def __len__(self):
        return len(self.cases)

    def to_dict(self) -> dict:
        from .validate import jsonable

        return jsonable({"op": self.op, "passed": self.passed, "cases": [c.to_dict() for c in self.cases]})

    def table(self) -> str:
        lines = [f"op {self.op}: {len(self.cases)} cases against ops/reference.py",
                 f"  {'case':<40} {'format':<9} {'NMSE':>9} {'max err':>9} {'max rel':>9}  limits (NMSE, rel)"]
        for c in self.cases:
            mark = "ok" if c.passed else "FAIL"
            lines.append(f"  {c.case:<40} {c.format:<9} {c.nmse:9.2e} {c.max_err:9.2e} {c.max_rel:9.2e}  "
                         f"{c.limit_nmse:.0e}, {c.limit_max_rel:.0e}  {mark}{'  ' + c.note if c.note else ''}")
        n_bad = sum(not c.passed for c in self.cases)
        lines.append(f"  {'PASS' if self.passed else f'FAIL ({n_bad} of {len(self.cases)} cases)'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- metrics
def errors(y, r) -> tuple[float, float, float]:
    """(nmse, max_err, max_rel) of y against the reference r, computed in float64."""
    y = np.asarray(y, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    diff = y - r
    # matching infinities / NaNs of the reference count as equal (swiglu of -inf, say)
    same = (y == r) | (np.isnan(y) & np.isnan(r))
    diff = np.where(same, 0.0, diff)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf"), float("inf")
    finite_r = np.where(np.isfinite(r), r, 0.0)
    num, den = float(np.sum(diff * diff)), float(np.sum(finite_r * finite_r))
    nmse = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    max_err = float(np.max(np.abs(diff))) if diff.size else 0.0
    scale = float(np.max(np.abs(finite_r))) if diff.size else 0.0
    max_rel = max_err / scale if scale > 0 else (0.0 if max_err == 0 else float("inf"))
    return nmse, max_err, max_rel


# --------------------------------------------------------------------------------------- case makers
# Each maker yields (description, format, args): args are the reference op's arguments. Sizes are small
# (the reference is NumPy) but odd, and cover N = 1 (decode) and N > 1 (prefill).
ODD = (1, 3, 5, 7, 17, 31, 33, 63, 65, 127, 129)


def _pick(rng, values):
    return values[int(rng.integers(len(values)))]


def _normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _as_format(w: np.ndarray, fmt: str) -> np.ndarray:
    """Weights whose values are those of a float16 / bfloat16 checkpoint (widened to float32, as loaded)."""
    if fmt == "float16":
        return w.astype(np.float16).astype(np.float32)
    if fmt == "bfloat16":
        bits = w.astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return bits.view(np.float32)
    return w


def _cases_take_rows(rng, n):
    for i in range(n):
        R, C = _pick(rng, (1, 7, 33, 512)), _pick(rng, ODD + (64, 96))
        N = _pick(rng, (1, 2, 5, 17))
        yield f"R={R} C={C} N={N}", "float32", (_normal(rng, (R, C)), rng.integers(0, R, N).astype(np.int64))


def _cases_rmsnorm(rng, n):
    for i in range(n):
        N, D = _pick(rng, (1, 2, 5, 17)), _pick(rng, ODD[2:] + (64, 256, 1000))
        scale = _pick(rng, (1e-3, 1.0, 30.0))
        eps = _pick(rng, (1e-5, 1e-6))
        x, w = _normal(rng, (N, D), scale), (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
        yield f"N={N} D={D} |x|~{scale:g} eps={eps:g}", "float32", (x, w, eps)


def _cases_add_rmsnorm(rng, n):
    for desc, fmt, (x, w, eps) in _cases_rmsnorm(rng, n):  # rmsnorm's cases, and a branch ~0.3 x as large
        yield desc, fmt, (x, _normal(rng, x.shape, 0.3 * float(np.abs(x).max())), w, eps)


def _cases_add(rng, n):
    for i in range(n):
        N, D = _pick(rng, (1, 3, 17)), _pick(rng, ODD + (64,))
        yield f"N={N} D={D}", "float32", (_normal(rng, (N, D)), _normal(rng, (N, D), 0.1))


def _cases_swiglu(rng, n):
    for i in range(n):
        N, F = _pick(rng, (1, 3, 17)), _pick(rng, ODD + (172, 256))
        g, u = _normal(rng, (N, F), 3.0), _normal(rng, (N, F))
        if i % 2:  # very negative gates: exp(-g) overflows, silu -> -0
            g.flat[:: max(1, g.size // 7)] = -120.0
        yield f"N={N} F={F}{' with gates < -88' if i % 2 else ''}", "float32", (g, u)


def _cases_rope(rng, n):
    for i in range(n):
        N, nh, hd = _pick(rng, (1, 3, 17)), _pick(rng, (1, 3, 8)), _pick(rng, (2, 6, 8, 16, 64, 128))
        theta = _pick(rng, (10000.0, 500000.0))
        inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)))).astype(
            np.float32)
        maxpos = _pick(rng, (16, 512, 8192))
        pos = np.sort(rng.integers(0, maxpos, N)).astype(np.int64)
        yield f"N={N} heads={nh} hd={hd} pos<{maxpos}", "float32", (_normal(rng, (N, nh, hd)), pos, inv_freq)


def _kv_layout(rng):
    """Some sequences in cache slots, each a run of tokens at consecutive positions (prefill, decode or a
    chunk continuing a prefill): slots (N,), positions (N,), with positions < Tmax."""
    S = _pick(rng, (1, 2, 3))
    Tmax = _pick(rng, (8, 33, 64))
    runs = []
    for slot in rng.permutation(S)[: int(rng.integers(1, S + 1))]:
        kind = _pick(rng, ("prefill", "decode", "chunk"))
        if kind == "prefill":
            start, length = 0, int(rng.integers(1, Tmax + 1))
        elif kind == "decode":
            start, length = int(rng.integers(0, Tmax)), 1
        else:
            start = int(rng.integers(1, Tmax))
            length = int(rng.integers(1, Tmax - start + 1))
        runs.append((int(slot), start, length, kind))
    slots = np.concatenate([np.full(n, s, np.int64) for s, _, n, _ in runs])
    positions = np.concatenate([np.arange(p, p + n, dtype=np.int64) for _, p, n, _ in runs])
    desc = "+".join(f"{kind}{n}@{p}" for _, p, n, kind in runs)
    return S, Tmax, slots, positions, desc


def _cases_kv_write(rng, n):
    for i in range(n):
        KVH, hd = _pick(rng, (1, 2, 3)), _pick(rng, (4, 6, 8, 64))
        S, Tmax, slots, positions, desc = _kv_layout(rng)
        N = slots.size
        kc, vc = _normal(rng, (S, KVH, Tmax, hd)), _normal(rng, (S, KVH, Tmax, hd))
        yield (f"S={S} KVH={KVH} Tmax={Tmax} hd={hd} {desc}", "float32",
               (kc, vc, _normal(rng, (N, KVH, hd)), _normal(rng, (N, KVH, hd)), slots, positions))


def _cases_rope_kv_write(rng, n):
    for i in range(n):
        KVH, G, hd = _pick(rng, (1, 2, 3)), _pick(rng, (1, 2, 4, 8)), _pick(rng, (2, 6, 8, 64))
        S, Tmax, slots, positions, desc = _kv_layout(rng)
        N = slots.size
        inv_freq = (1.0 / (np.float32(10000.0) ** (np.arange(0, hd, 2).astype(np.float32) / np.float32(hd)))).astype(
            np.float32)
        kc, vc = _normal(rng, (S, KVH, Tmax, hd)), _normal(rng, (S, KVH, Tmax, hd))
        yield (f"S={S} KVH={KVH} G={G} Tmax={Tmax} hd={hd} {desc}", "float32",
               (_normal(rng, (N, KVH * G, hd)), _normal(rng, (N, KVH, hd)), _normal(rng, (N, KVH, hd)), kc, vc,
                slots, positions, inv_freq))


def _cases_attention(rng, n):
    for i in range(n):
        KVH, G, hd = _pick(rng, (1, 2, 3)), _pick(rng, (1, 2, 3, 4)), _pick(rng, (4, 6, 8, 16, 64))
        S, Tmax, slots, positions, desc = _kv_layout(rng)
        N = slots.size
        window = 0 if i % 3 else int(rng.integers(1, 9))
        kc, vc = _normal(rng, (S, KVH, Tmax, hd)), _normal(rng, (S, KVH, Tmax, hd))
        q = _normal(rng, (N, KVH * G, hd), _pick(rng, (0.3, 1.0, 3.0)))
        yield (f"H={KVH * G} KVH={KVH} hd={hd} {desc}{f' window={window}' if window else ''}", "float32",
               (q, kc, vc, slots, positions, window))


def quant_module():
    """tinyserve.quant if it is there and has quantize(), else None."""
    try:
        quant = importlib.import_module("tinyserve.quant")
    except ImportError:
        return None
    return quant if hasattr(quant, "quantize") else None


def quantize(w: np.ndarray, fmt: str, group_size: int, zero_point: bool = False):
    """A quantized tensor of w in tinyserve.quant's format ('int8' or 'int4')."""
    quant = quant_module()
    bits = {"int8": 8, "int4": 4}[fmt]
    try:
        return quant.quantize(w, bits=bits, group_size=group_size, zero_point=zero_point)
    except TypeError:
        return quant.quantize(w, bits, group_size)


def _cases_linear(rng, n, formats=("float32", "float16", "bfloat16", "int8", "int4")):
    quant = quant_module()
    formats = [f for f in formats if f not in ("int8", "int4") or quant is not None]
    for i in range(n):
        fmt = formats[i % len(formats)]
        N, M = _pick(rng, (1, 2, 3, 17)), _pick(rng, ODD + (64, 96))
        if fmt in ("int8", "int4"):  # whole groups, or a ragged last group (rows are padded to whole groups)
            gs = _pick(rng, (32, 64, 128))
            K = gs * int(rng.integers(1, 5)) - _pick(rng, (0, 0, 1, 5, 31))
        else:
            gs, K = None, _pick(rng, ODD[1:] + (64, 256, 1000))
        # Columns in groups of very different magnitudes, so that a kernel that reads one column with
        # the wrong group's scale (or drops / repeats a column) moves the result far beyond rounding.
        col_scale = np.exp(rng.standard_normal((K + 31) // 32)).repeat(32)[:K].astype(np.float32)
        w = _as_format(_normal(rng, (M, K)) * col_scale, fmt)
        x = _normal(rng, (N, K))
        bias = _normal(rng, (M,)) if i % 2 else None
        desc = f"N={N} K={K} M={M}{' bias' if bias is not None else ''}"
        if gs is not None:
            zp = fmt == "int4" and bool(i % 4 == 3)
            try:
                w = quantize(w, fmt, gs, zero_point=zp)
            except Exception as e:  # the quant module refuses this shape: say so rather than fail
                raise TinyserveError(f"tinyserve.quant.quantize refused a {M}x{K} {fmt} group {gs} weight: {e}"
                                     ) from None
            desc += f" g{gs}{' zp' if zp else ''}"
        yield desc, fmt, (x, w, bias)


CASE_MAKERS = {
    "take_rows": _cases_take_rows,
    "rmsnorm": _cases_rmsnorm,
    "add_rmsnorm": _cases_add_rmsnorm,
    "linear": _cases_linear,
    "rope": _cases_rope,
    "kv_write": _cases_kv_write,
    "rope_kv_write": _cases_rope_kv_write,
    "attention": _cases_attention,
    "swiglu": _cases_swiglu,
    "add": _cases_add,
}
assert set(CASE_MAKERS) == set(OP_NAMES)


def _copy(a):
    return a.copy() if isinstance(a, np.ndarray) else a


# ------------------------------------------------------------------------------------------ check_op
def check_op(name: str, fn, cases: int = 12, seed: int = 0, formats=None, ops=None) -> OpCheck:
    """Compare fn with the reference op `name` on `cases` randomized cases. Returns an OpCheck.

    fn takes the reference op's arguments (see tinyserve/ops/reference.py). formats: for "linear", which
    weight formats to try (default: float32, float16 and bfloat16 values, and int8 / int4 quantized when
    tinyserve.quant is available). ops: the backend module whose upload / download move arrays to and
    from fn's device (default: host NumPy arrays). A kernel that raises is a TinyserveError naming the case.
    """
    if name not in CASE_MAKERS:
        raise TinyserveError(f"unknown op {name!r} (ops are: {', '.join(OP_NAMES)})")
    if not callable(fn):
        raise TinyserveError(f"the kernel for {name} is not callable")
    up = getattr(ops, "upload", None) or (lambda a: a)
    down = getattr(ops, "download", None) or np.asarray
    rng = np.random.default_rng(seed)
    maker = CASE_MAKERS[name]
    gen = maker(rng, cases, formats) if (name == "linear" and formats) else maker(rng, cases)
    result = OpCheck(name)
    for desc, fmt, args in gen:
        want_args = [_copy(a) for a in args]
        want = getattr(ref, name)(*want_args)
        # arrays (and a quantized weight) go where fn computes; scalars (eps, window) and None stay as they are
        got_args = [up(_copy(a)) if isinstance(a, np.ndarray) or (name == "linear" and k == 1) else a
                    for k, a in enumerate(args)]
        try:
            got = fn(*got_args)
        except Exception as e:
            raise TinyserveError(f"kernel for {name} raised {type(e).__name__}: {e} (case {desc}, {fmt})") from None
        if name == "kv_write":  # in place: compare the caches it wrote
            want = np.stack([want_args[0], want_args[1]])
            got = np.stack([np.asarray(down(got_args[0])), np.asarray(down(got_args[1]))])
        elif name == "rope_kv_write":  # rope(q) returned, and the caches written: compared as one array
            want = np.concatenate([want.ravel(), want_args[3].ravel(), want_args[4].ravel()])
            got = None if got is None else np.concatenate(
                [np.asarray(down(got)).ravel(), np.asarray(down(got_args[3])).ravel(),
                 np.asarray(down(got_args[4])).ravel()])
        elif isinstance(want, tuple):  # add_rmsnorm: (sum, norm), compared as one array
            want = np.stack(want)
            got = None if not isinstance(got, tuple) or len(got) != 2 else np.stack([np.asarray(down(g)) for g in got])
        else:
            got = None if got is None else np.asarray(down(got))
        lim = op_limits(name, fmt)
        note = ""
        if got is None:
            nmse = max_err = max_rel = float("inf")
            note = "returned None"
        elif got.shape != want.shape:
            nmse = max_err = max_rel = float("inf")
            note = f"shape {got.shape}, expected {want.shape}"
        else:
            nmse, max_err, max_rel = errors(got, want)
            if got.dtype != np.float32 and name != "kv_write":
                note = f"dtype {got.dtype}, expected float32"
        ok = not note and nmse <= lim["nmse"] and max_rel <= lim["max_rel"]
        result.cases.append(CaseResult(name, desc, fmt, nmse, max_err, max_rel, lim["nmse"], lim["max_rel"], ok, note))
    return result
