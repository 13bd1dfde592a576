"""Every tolerance tinyserve checks against, with the reason for it: ONE table.

    from tinyserve.tolerances import TOLERANCES, op_limits, model_limits
    TOLERANCES["op", "linear", "float32", "nmse"]        # Tol(limit=..., why=..., measured=...)

Keys are (scope, item, format, metric):

- scope "op": a kernel against the reference op of the same name (tinyserve.testing.check_op), float32
  activations. format: the weights' format for "linear" (float32; float16 / bfloat16 values, which are
  widened exactly to float32 at load; int8 / int4 quantized tensors, whose spec is "exactly
  dequantize(W)"), float32 for every other op.
- scope "model": a whole model against a reference run on the same tokens (`tinyserve validate` against
  transformers, `tinyserve compare` of two dumps, `validate --kernel` against the unmodified model).
  item "layer": the hidden state after each attention residual and after each MLP residual (also the
  embedding and the final norm); item "logits": the output. format: the weight format of the run being
  checked (float32 for float checkpoints of any storage dtype, int8, int4); the reference is float32 or
  float64 transformers (or another dump).

Metrics (a figure passes when it is <= its limit, except top1 which must be >= its limit):
    nmse     sum((a - b)^2) / sum(b^2) over all elements (b: the reference)
    max_rel  max|a - b| / max|b|
    atol     an absolute floor added to max_rel * max|b| (logits: max|a - b| <= max_rel * max|b| + atol)
    kl_mean  mean over positions of KL(P_ref || P) of the next-token distributions (nats)
    kl_max   the largest per-position KL
    top1     fraction of positions where both pick the same most likely token (a position where the
             reference's two best logits are closer than the float32 logits tolerance counts as agreeing)

docs/tolerances.md shows this table with the reasoning; tests/test_tolerances.py checks the two agree.
`python -m tinyserve.tolerances` prints the table in that document's form.
"""

from __future__ import annotations

from typing import NamedTuple


class Tol(NamedTuple):
    limit: float
    why: str
    measured: str = ""


U = 2.0**-24  # float32 unit roundoff, 6.0e-8: the error of one rounding

# Reduction lengths the limits are sized for: K up to 16384 (Llama 3 8B's intermediate size is 14336),
# attention over up to 8192 positions. A sum of K terms evaluated in another order differs by about
# sqrt(K) * U relative to its size (random-walk rounding): 7.6e-6 at K = 16384, NMSE ~ (sqrt(K) U)^2 = 6e-11.

_EXACT = "a copy or one correctly rounded operation per element: same bits from any correct kernel"
_F32_LINEAR = "sum of K terms in another order: ~sqrt(K)·u relative; sized for K = 16384"
_WIDENED = "fp16/bf16 weights are widened exactly to float32 at load: as float32"
_QUANT_OP = "spec: exactly dequantize(W) @ x in float32, so only the order of sums differs: as float32"
_INT8 = "255 steps of max|group|/127: ~4e-5 NMSE per matrix, compounded over layers; ~6x above the worst measured"
_INT4 = "15 steps of max|group|/7: ~1e-2 NMSE per matrix; a sanity bound against a broken quantizer, not a quality bar"
_INT8_ACT = ("x rounded to int8 per group (step max|x_g|/127): each value moves <= step/2, so per output "
             "<= sum_g step_g/2·sum|w_g|; Gaussian x: NMSE ~ (3.5/127)²/12 ≈ 6e-5; ~20x margin")
_MODEL = "float32 roundings (~1e-6 relative per op) compound over layers; sized for deep, wide real models"
_TINY = "tiny configs + stories260K: "
_CPU = "cpu backend: "

TOLERANCES: dict[tuple[str, str, str, str], Tol] = {
    # ---------------------------------------------------------------- ops: kernel vs ops/reference.py
    ("op", "take_rows", "float32", "nmse"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "take_rows", "float32", "max_rel"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "add", "float32", "nmse"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "add", "float32", "max_rel"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "kv_write", "float32", "nmse"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "kv_write", "float32", "max_rel"): Tol(0.0, _EXACT, _CPU + "0"),
    ("op", "rmsnorm", "float32", "nmse"): Tol(
        1e-10, "mean of D squares in another order (~sqrt(D)·u/2 relative), then a few roundings",
        _CPU + "1.4e-14"),
    ("op", "rmsnorm", "float32", "max_rel"): Tol(
        3e-5, "the row's scale: ~sqrt(D)·u/2 = 3.8e-6 at D = 16384; ~8x margin", _CPU + "1.9e-7"),
    # add_rmsnorm's two outputs compared together: the sum exactly, its norm as rmsnorm
    ("op", "add_rmsnorm", "float32", "nmse"): Tol(1e-10, "the sum exact; its norm as rmsnorm's", _CPU + "6.1e-15"),
    ("op", "add_rmsnorm", "float32", "max_rel"): Tol(3e-5, "the sum exact; its norm as rmsnorm's", _CPU + "1.9e-7"),
    ("op", "linear", "float32", "nmse"): Tol(1e-10, _F32_LINEAR, _CPU + "2.3e-14"),
    ("op", "linear", "float32", "max_rel"): Tol(3e-5, _F32_LINEAR, _CPU + "2.5e-7"),
    ("op", "linear", "float16", "nmse"): Tol(1e-10, _WIDENED, _CPU + "5.8e-14"),
    ("op", "linear", "float16", "max_rel"): Tol(3e-5, _WIDENED, _CPU + "3.8e-7"),
    ("op", "linear", "bfloat16", "nmse"): Tol(1e-10, _WIDENED, _CPU + "2.0e-14"),
    ("op", "linear", "bfloat16", "max_rel"): Tol(3e-5, _WIDENED, _CPU + "1.7e-7"),
    ("op", "linear", "int8", "nmse"): Tol(1e-10, _QUANT_OP, _CPU + "3.5e-14"),
    ("op", "linear", "int8", "max_rel"): Tol(3e-5, _QUANT_OP, _CPU + "1.8e-7"),
    ("op", "linear", "int4", "nmse"): Tol(1e-10, _QUANT_OP, _CPU + "5.3e-13"),
    ("op", "linear", "int4", "max_rel"): Tol(3e-5, _QUANT_OP, _CPU + "7.2e-7"),
    # cpu.ACTIVATIONS = "int8" (an option, off by default): x rounded to int8 per group, against the exact
    # dequantize(W) @ x. Per output the error is at most quant.activation_error_bound (tests check that).
    ("op", "linear_int8_act", "int8", "nmse"): Tol(1e-3, _INT8_ACT, _CPU + "5.2e-5"),
    ("op", "linear_int8_act", "int8", "max_rel"): Tol(0.05, _INT8_ACT, _CPU + "7.1e-3"),
    ("op", "linear_int8_act", "int4", "nmse"): Tol(1e-3, _INT8_ACT, _CPU + "4.9e-5"),
    ("op", "linear_int8_act", "int4", "max_rel"): Tol(0.05, _INT8_ACT, _CPU + "7.3e-3"),
    ("op", "rope", "float32", "nmse"): Tol(
        1e-12, "cos/sin of the same float32 angle differ by ~1 ulp; a float64 angle fails by design",
        _CPU + "0"),
    ("op", "rope", "float32", "max_rel"): Tol(
        1e-6, "a few roundings per element: 16 u", _CPU + "0"),
    # rope_kv_write's result and the caches it wrote, compared together: rope's values, and copies
    ("op", "rope_kv_write", "float32", "nmse"): Tol(1e-12, "rope's (the cache holds rope(k) and v)", _CPU + "0"),
    ("op", "rope_kv_write", "float32", "max_rel"): Tol(1e-6, "rope's (the cache holds rope(k) and v)", _CPU + "0"),
    ("op", "attention", "float32", "nmse"): Tol(
        1e-10, "dot products of hd terms, sums over up to 8192 keys: ~sqrt(n)·u relative each",
        _CPU + "2.3e-13"),
    ("op", "attention", "float32", "max_rel"): Tol(
        3e-5, "~sqrt(8192)·u = 5.4e-6 at 8192 keys; ~6x margin",
        _CPU + "6.6e-7"),
    ("op", "swiglu", "float32", "nmse"): Tol(
        1e-12, "elementwise: exp, a division, two products: a few ulps",
        _CPU + "8.2e-15"),
    ("op", "swiglu", "float32", "max_rel"): Tol(1e-6, "16 u", _CPU + "9.1e-8"),
    # ------------------------------------------------------------ model: a run vs a reference run
    # float32 rows: a float run against transformers; a quantized run against transformers holding the same
    # dequantized weights (like with like); two dumps of the same format; validate --kernel.
    ("model", "layer", "float32", "nmse"): Tol(1e-8, _MODEL, _TINY + "<= 1.1e-12"),
    ("model", "logits", "float32", "nmse"): Tol(1e-8, _MODEL, _TINY + "<= 1.1e-12"),
    ("model", "logits", "float32", "max_rel"): Tol(
        1e-4, "the suite's bound since the first commit (test_transformers_agreement.py)", _TINY + "<= 2.1e-6"),
    ("model", "logits", "float32", "atol"): Tol(1e-5, "a floor for logits of tiny scale", "-"),
    ("model", "logits", "float32", "kl_mean"): Tol(
        1e-8, "KL ~ half the variance of the logit error", _TINY + "<= 1.1e-12"),
    ("model", "logits", "float32", "kl_max"): Tol(1e-6, "one position's KL", _TINY + "<= 1.5e-11"),
    ("model", "logits", "float32", "top1"): Tol(
        1.0, "rounding reorders the best token only at near-ties, which count as agreeing", _TINY + "1.0"),
    # int8 / int4 budgets: a quantized run against the FLOAT model (validate --quant's second check; compare of
    # dumps of different formats).
    ("model", "layer", "int8", "nmse"): Tol(5e-3, _INT8, "tiny configs <= 8.1e-4; stories260K 2.4e-4"),
    ("model", "logits", "int8", "nmse"): Tol(5e-3, _INT8, "tiny configs <= 8.5e-4; stories260K 5.3e-5"),
    ("model", "logits", "int8", "max_rel"): Tol(0.2, _INT8, "tiny configs <= 5.3e-2; stories260K 1.4e-2"),
    ("model", "logits", "int8", "atol"): Tol(0.0, "max_rel alone", "-"),
    ("model", "logits", "int8", "kl_mean"): Tol(5e-3, _INT8, "tiny configs <= 6.3e-4; stories260K 1.7e-4"),
    ("model", "logits", "int8", "kl_max"): Tol(5e-2, _INT8, "tiny configs <= 4.0e-3; stories260K 1.2e-3"),
    ("model", "logits", "int8", "top1"): Tol(0.85, _INT8, "tiny configs >= 0.945 (55 tokens); stories260K 1.0"),
    ("model", "layer", "int4", "nmse"): Tol(0.5, _INT4, "tiny configs <= 0.25; stories260K 0.098"),
    ("model", "logits", "int4", "nmse"): Tol(0.5, _INT4, "tiny configs <= 0.26; stories260K 0.026"),
    ("model", "logits", "int4", "max_rel"): Tol(1.0, _INT4, "tiny configs <= 0.76; stories260K 0.45"),
    ("model", "logits", "int4", "atol"): Tol(0.0, "max_rel alone", "-"),
    ("model", "logits", "int4", "kl_mean"): Tol(0.5, _INT4, "tiny configs <= 0.19; stories260K 0.092"),
    ("model", "logits", "int4", "kl_max"): Tol(2.0, _INT4, "tiny configs <= 0.80; stories260K 0.70"),
    ("model", "logits", "int4", "top1"): Tol(0.2, _INT4, "tiny configs >= 0.29; stories260K >= 0.84"),
}


# --------------------------------------------------------------------------------------------- lookups
METRICS = ("nmse", "max_rel", "atol", "kl_mean", "kl_max", "top1")


def limit(scope: str, item: str, fmt: str, metric: str) -> float:
    try:
        return TOLERANCES[scope, item, fmt, metric].limit
    except KeyError:
        raise KeyError(f"no tolerance for {scope}/{item}/{fmt}/{metric} in tinyserve/tolerances.py") from None


def op_limits(op: str, fmt: str = "float32") -> dict:
    """{"nmse": ..., "max_rel": ...} for a kernel of `op` with weights of `fmt`."""
    return {m: limit("op", op, fmt, m) for m in ("nmse", "max_rel")}


def model_formats() -> list[str]:
    return sorted({k[2] for k in TOLERANCES if k[0] == "model"})


def model_limits(fmt: str = "float32") -> dict:
    """The model-level limits for a run whose weights are `fmt`: {"layer_nmse", "logits_nmse", ...}."""
    if ("model", "layer", fmt, "nmse") not in TOLERANCES:
        raise KeyError(f"no model-level tolerances for format {fmt!r} (have: {', '.join(model_formats())})")
    out = {"layer_nmse": limit("model", "layer", fmt, "nmse")}
    for m in ("nmse", "max_rel", "atol", "kl_mean", "kl_max", "top1"):
        out[f"logits_{m}"] = limit("model", "logits", fmt, m)
    return out


def passes(metric: str, value: float, lim: float) -> bool:
    """Whether a figure is within its limit (top1 is a minimum, every other metric a maximum)."""
    if value != value:  # NaN never passes
        return False
    return value >= lim if metric == "top1" else value <= lim


# ------------------------------------------------------------------------------------------ markdown
HEADER = ("scope", "item", "format", "metric", "limit", "measured", "why")


def fmt_limit(x: float) -> str:
    """The limit as written in docs/tolerances.md (parsed back with float())."""
    return "0" if x == 0 else (f"{x:g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.0e}")


def markdown_table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for (scope, item, fmt, metric), t in TOLERANCES.items():
        cells = (scope, item, fmt, metric, fmt_limit(t.limit), t.measured, t.why)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
