"""Validation: tinyserve against transformers, golden activation dumps, kernel swap-in, perplexity.

    from tinyserve import validate as v
    rep = v.validate("DIR", prompt="Once upon a time")     # vs transformers (torch CPU), per layer
    rep.passed, rep.first_failure, print(rep.table())
    v.dump("DIR", "Once upon a time", "a.safetensors")      # every layer's hidden states + logits
    v.compare_dumps("a.safetensors", "b.safetensors")      # the same report from two dumps
    v.validate_kernel("DIR", "linear", my_linear)           # op-level + model-level errors of a kernel
    v.perplexity(llm, "text.txt")                           # mean NLL over paragraphs, KL vs a base run

Every figure is compared with its limit in tinyserve/tolerances.py (one table, reasons included).
The figures, for a run A checked against a reference run B on the same tokens:

- per stage (embedding; after each layer's attention residual; after its MLP residual; final norm):
  NMSE = sum((A - B)^2) / sum(B^2) over all tokens and features;
- logits: max |A - B| (and relative to max |B|), NMSE, top-1 agreement (the same most likely next token),
  and KL(P_B || P_A) between the next-token distributions (mean and max over positions, nats).

The first stage whose NMSE is over its limit names where the two runs part: the residual stream carries
an error forward, so the first failing stage is the culprit and the later ones are its echo.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoint import give_default_mode
from .errors import TinyserveError
from .ops import OP_NAMES
from .tolerances import limit as _limit
from .tolerances import model_limits, passes

DEFAULT_PROMPT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree."
)
DUMP_FORMAT = "tinyserve-activations"
LOGITS_FORMAT = "tinyserve-logits"
FORMAT_VERSION = "1"
FORMAT_ORDER = ("float32", "int8", "int4")  # coarser to the right


# ------------------------------------------------------------------------------------------- metrics
def nmse(a, b) -> float:
    """sum((a - b)^2) / sum(b^2) in float64 (b is the reference); 0 when both are all zero."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = float(np.sum((a - b) ** 2))
    den = float(np.sum(b * b))
    if not math.isfinite(num):
        return float("inf")
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_rows(ref_logits, logits) -> np.ndarray:
    """Per row KL(P_ref || P) in nats, P = softmax of each row."""
    lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
    return np.sum(np.exp(lp_ref) * (lp_ref - lp), axis=-1)


def logits_figures(logits, ref) -> dict:
    """max_abs, max_rel, nmse, top1 (ties within rounding count as agreeing), kl_mean, kl_max of logits vs ref."""
    a = np.asarray(logits, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise TinyserveError(f"logits of shape {a.shape} cannot be compared with {b.shape}")
    if not np.all(np.isfinite(a)):
        nan = float("nan")
        return dict(max_abs=float("inf"), max_rel=float("inf"), nmse=float("inf"), top1=0.0, top1_exact=0,
                    positions=int(a.shape[0]), kl_mean=nan, kl_max=nan)
    diff = np.abs(a - b)
    scale = float(np.abs(b).max())
    # a position whose reference has two best logits closer than float32 rounding can pick either
    tie = _limit("model", "logits", "float32", "max_rel") * scale + _limit("model", "logits", "float32", "atol")
    pick = a.argmax(axis=-1)
    rows = np.arange(a.shape[0])
    exact = pick == b.argmax(axis=-1)
    agree = exact | (b[rows, pick] >= b.max(axis=-1) - tie)
    kl = kl_rows(b, a)
    return dict(
        max_abs=float(diff.max()),
        max_rel=float(diff.max()) / scale if scale > 0 else float(diff.max()),
        nmse=nmse(a, b),
        top1=float(agree.mean()),
        top1_exact=int(exact.sum()),
        positions=int(a.shape[0]),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
    )


def jsonable(obj):
    """obj with every non-finite float as the string "inf", "-inf" or "nan" (strict JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else str(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# -------------------------------------------------------------------------------------------- report
STAGE_WORDS = {"embed": "embedding", "attn": "attention", "mlp": "MLP", "norm": "final norm"}


@dataclass
class Stage:
    """One checkpoint of the residual stream: NMSE of the run against the reference there."""

    stage: str  # "embed", "attn" (after the attention residual), "mlp" (after the MLP residual), "norm"
    layer: int | None  # the decoder layer (None for embed / norm)
    nmse: float
    max_abs: float
    limit: float
    passed: bool

    @property
    def where(self) -> str:
        if self.layer is None:
            return STAGE_WORDS[self.stage]
        return f"layer {self.layer} {STAGE_WORDS[self.stage]}"

    def to_dict(self) -> dict:
        return dict(stage=self.stage, layer=self.layer, where=self.where, nmse=self.nmse, max_abs=self.max_abs,
                    limit=self.limit, passed=self.passed)


@dataclass
class Report:
    """The per-layer report of one run against a reference run (validate, compare, validate --kernel)."""

    title: str
    meta: dict
    fmt: str  # which row of the tolerance table applies (float32, int8, int4)
    limits: dict
    stages: list[Stage]
    logits: dict
    kernel: object = None  # testing.OpCheck, for validate --kernel
    logits_checks: dict = field(default_factory=dict)
    quant_error: "Report | None" = None  # validate --quant: the quantized run against the float model

    def __post_init__(self):
        lim, f = self.limits, self.logits
        bound = lim["logits_max_rel"] * self.meta.get("logit_scale", 0.0) + lim["logits_atol"]
        self.logits_checks = {
            "max_abs": (f["max_abs"], bound, f["max_abs"] <= bound),
            "nmse": (f["nmse"], lim["logits_nmse"], passes("nmse", f["nmse"], lim["logits_nmse"])),
            "top1": (f["top1"], lim["logits_top1"], passes("top1", f["top1"], lim["logits_top1"])),
            "kl_mean": (f["kl_mean"], lim["logits_kl_mean"], passes("kl_mean", f["kl_mean"], lim["logits_kl_mean"])),
            "kl_max": (f["kl_max"], lim["logits_kl_max"], passes("kl_max", f["kl_max"], lim["logits_kl_max"])),
        }

    @property
    def model_passed(self) -> bool:
        return all(s.passed for s in self.stages) and all(ok for _, _, ok in self.logits_checks.values())

    @property
    def passed(self) -> bool:
        return (self.model_passed and (self.kernel is None or self.kernel.passed)
                and (self.quant_error is None or self.quant_error.model_passed))

    @property
    def first_failure(self) -> dict | None:
        """Where the run first leaves its tolerance: {"where", "layer", "stage", "figure", "value", "limit"}."""
        for s in self.stages:
            if not s.passed:
                return dict(where=s.where, layer=s.layer, stage=s.stage, figure="nmse", value=s.nmse, limit=s.limit)
        for name, (value, lim, ok) in self.logits_checks.items():
            if not ok:
                return dict(where="logits", layer=None, stage="logits", figure=name, value=value, limit=lim)
        return None

    def to_dict(self) -> dict:
        d = dict(
            title=self.title, meta=self.meta, format=self.fmt, passed=self.passed, first_failure=self.first_failure,
            limits=self.limits, stages=[s.to_dict() for s in self.stages], logits=self.logits,
            logits_checks={k: dict(value=v, limit=lim, passed=ok) for k, (v, lim, ok) in self.logits_checks.items()},
        )
        if self.kernel is not None:
            d["kernel"] = self.kernel.to_dict()
        if self.quant_error is not None:
            d["quant_error"] = self.quant_error.to_dict()
        return jsonable(d)

    def _figures(self) -> list[str]:
        out = [f"  {'stage':<24} {'NMSE':>10} {'max |diff|':>11}   limit (NMSE)"]
        for s in self.stages:
            mark = "ok" if s.passed else "FAIL"
            out.append(f"  {s.where:<24} {s.nmse:10.2e} {s.max_abs:11.3e}   {s.limit:.0e}  {mark}")
        f = self.logits
        out += ["", f"  logits over {f['positions']} positions:"]
        names = {"max_abs": "max |diff|", "nmse": "NMSE", "top1": "top-1 agreement", "kl_mean": "KL mean (nats)",
                 "kl_max": "KL max (nats)"}
        for k, (v, lim, ok) in self.logits_checks.items():
            if k == "top1":
                v_s, lim_s = f"{v:.4f} ({f['top1_exact']}/{f['positions']} identical)", f">= {lim:g}"
            else:
                rel = f" ({f['max_rel']:.2e} of max |logit|)" if k == "max_abs" else ""
                v_s, lim_s = f"{v:.3e}{rel}", f"<= {lim:.2e}"
            out.append(f"    {names[k]:<18} {v_s:<44} {lim_s:<12} {'ok' if ok else 'FAIL'}")
        return out

    def _verdict(self) -> str:
        ff = self.first_failure
        if ff is None:
            return f"within the {self.fmt} tolerances"
        return f"first divergence at {ff['where']} ({ff['figure']} {ff['value']:.3g}, limit {ff['limit']:.3g})"

    def table(self) -> str:
        """The report as text: the header, the op-level cases (--kernel), the stages, the logits, a verdict."""
        out = [self.title]
        out += [f"  {k}: {v}" for k, v in self.meta.items() if k != "logit_scale"]
        if self.kernel is not None:
            out += ["", self.kernel.table(), "", "the model with the kernel vs the model without it:"]
        out += [""] + self._figures()
        q = self.quant_error
        if q is not None:
            out += ["", q.title] + [f"  {k}: {v}" for k, v in q.meta.items() if k != "logit_scale"]
            out += [""] + q._figures()
        out.append("")
        if self.passed:
            out.append("PASS: every figure within its tolerance (tinyserve/tolerances.py)")
            return "\n".join(out)
        reasons = []
        if self.kernel is not None and not self.kernel.passed:
            reasons.append(f"the kernel fails {sum(not c.passed for c in self.kernel.cases)} op-level cases")
        if not self.model_passed:
            reasons.append(self._verdict())
        if q is not None and not q.model_passed:
            reasons.append(f"quantization error over the {q.fmt} budget: {q._verdict()}")
        out.append("FAIL: " + "; ".join(reasons))
        return "\n".join(out)


def compare_acts(acts: dict, ref: dict, num_layers: int, fmt: str, title: str, meta: dict) -> Report:
    """The report of activations `acts` against `ref` (dicts named as in a dump; see docs/validation.md)."""
    limits = model_limits(fmt)
    stages = []

    def add(stage, layer, key):
        if key not in acts or key not in ref:
            return
        a, b = np.asarray(acts[key], np.float64), np.asarray(ref[key], np.float64)
        if a.shape != b.shape:
            raise TinyserveError(f"{key}: shape {a.shape} vs {b.shape}")
        e = nmse(a, b)
        d = np.abs(a - b)
        mx = float(d.max()) if d.size and np.all(np.isfinite(d)) else float("inf")
        stages.append(Stage(stage, layer, e, mx, limits["layer_nmse"], passes("nmse", e, limits["layer_nmse"])))

    add("embed", None, "embed")
    for i in range(num_layers):
        add("attn", i, f"layers.{i}.after_attn")
        add("mlp", i, f"layers.{i}.after_mlp")
    add("norm", None, "norm")
    figures = logits_figures(acts["logits"], ref["logits"])
    meta = dict(meta, logit_scale=float(np.abs(np.asarray(ref["logits"], np.float64)).max()))
    return Report(title=title, meta=meta, fmt=fmt, limits=limits, stages=stages, logits=figures)


# ------------------------------------------------------------------------------------------ capture
def load_llm(model_dir, backend="numpy", quant=None, group_size=128, zero_point=False, kv_dtype="float32"):
    """tinyserve.load, with a missing quantization module reported as one line."""
    from .engine import load

    try:
        return load(model_dir, backend=backend or "numpy", quant=quant, group_size=group_size, zero_point=zero_point,
                    kv_dtype=kv_dtype)
    except ImportError as e:
        raise TinyserveError(f"cannot load the model on backend {backend!r} with quant {quant!r}: {e}") from None


def encode(llm, prompt=None, ids=None) -> list[int]:
    if ids is not None:
        ids = [int(t) for t in ids]
    else:
        ids = llm.tokenizer.encode(DEFAULT_PROMPT if prompt is None else prompt)
    if not ids:
        raise TinyserveError("the prompt encodes to no tokens")
    if len(ids) > llm.config.max_position_embeddings:
        raise TinyserveError(
            f"the prompt is {len(ids)} tokens, more than the model's {llm.config.max_position_embeddings} positions")
    return ids


def capture_tinyserve(llm, ids, ops=None) -> dict:
    """Run tinyserve on ids (one prefill) and keep every tapped stage: {"embed", "layers.i.input", ...}.

    ops: an ops object to run with instead of llm.ops (a testing.SwappedOps); current_layer() follows
    the forward pass either way.
    """
    from .testing import layer_context, layer_tracking_tap

    acts = {}
    download = llm.ops.download
    L = llm.config.num_hidden_layers

    def tap(name, layer, array):
        a = np.array(download(array), dtype=np.float32, copy=True)
        if name == "embed":
            acts["embed"] = a
            acts["layers.0.input"] = a
        elif name == "attn":
            acts[f"layers.{layer}.after_attn"] = a
        elif name == "mlp":
            acts[f"layers.{layer}.after_mlp"] = a
            if layer + 1 < L:
                acts[f"layers.{layer + 1}.input"] = a
        elif name in ("norm", "logits"):
            acts[name] = a

    saved = llm.ops
    try:
        if ops is not None:
            llm.ops = ops
        with layer_context():
            logits = llm.logits(ids, tap=layer_tracking_tap(L, tap))
    except TinyserveError:
        raise
    except Exception as e:
        if ops is None:
            raise
        raise TinyserveError(f"the model run with the swapped kernel raised {type(e).__name__}: {e}") from None
    finally:
        llm.ops = saved
    acts["logits"] = np.asarray(logits, dtype=np.float32)
    return acts


def _require_transformers() -> None:
    """A missing transformers (or torch) is one line at once, before any model is loaded (no slow import)."""
    import importlib.util

    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise TinyserveError(NO_TRANSFORMERS)


NO_TRANSFORMERS = ("transformers (with torch) is not installed; it is the outside reference: "
                   "pip install torch transformers (or pip install -e '.[dev]')")


def _import_transformers():
    try:
        import torch
        import transformers
    except ImportError:
        raise TinyserveError(NO_TRANSFORMERS) from None
    return torch, transformers


def capture_transformers(model_dir, ids, dtype: str = "float32", weights: dict | None = None) -> dict:
    """Run Hugging Face transformers (torch CPU, eager attention) on ids and keep the same stages.

    Forward hooks on each decoder layer (its input and output), on its self_attn (the attention output,
    added to the layer input exactly as the decoder layer does) and on the final norm.
    weights: {HF parameter name: float array} replacing the checkpoint's tensors after loading (the
    dequantized matrices of a quantized tinyserve run); "lm_head.weight" unties a tied output head.
    """
    torch, transformers = _import_transformers()
    if dtype not in ("float32", "float64"):
        raise TinyserveError(f"--dtype must be float32 or float64, got {dtype!r}")
    from .checkpoint import Checkpoint

    if Checkpoint(model_dir).metadata.get("tinyserve_quant"):
        raise TinyserveError(f"{model_dir} is a tinyserve-quantized checkpoint, which transformers cannot read: "
                             "validate the float checkpoint with --quant instead")
    tdtype = getattr(torch, dtype)
    tlog = transformers.utils.logging
    bar_was_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # no "Loading weights" bar on stderr
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype, attn_implementation="eager")
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TinyserveError(f"transformers cannot load {model_dir}: {msg}") from None
    finally:
        if bar_was_on:
            tlog.enable_progress_bar()
    model.eval()
    if weights:
        with torch.no_grad():
            for name, w in weights.items():
                t = torch.from_numpy(np.ascontiguousarray(w)).to(tdtype)
                if name == "lm_head.weight":  # its own tensor, even when the checkpoint ties it to the embedding
                    model.lm_head.weight = torch.nn.Parameter(t, requires_grad=False)
                else:
                    model.get_parameter(name).copy_(t)
    decoder = model.model
    raw, handles = {}, []

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def keep(key):
        def hook(module, args, out):
            raw[key] = first(out).detach().clone()
        return hook

    def keep_input(key):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            raw[key] = h.detach().clone()
        return hook

    handles.append(decoder.embed_tokens.register_forward_hook(keep("embed")))
    for i, layer in enumerate(decoder.layers):
        handles.append(layer.register_forward_pre_hook(keep_input(f"layers.{i}.input"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep(f"_attn_out.{i}")))
        handles.append(layer.register_forward_hook(keep(f"layers.{i}.after_mlp")))
    handles.append(decoder.norm.register_forward_hook(keep("norm")))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits
            for i in range(len(decoder.layers)):  # the decoder layer's own `residual + hidden_states`
                raw[f"layers.{i}.after_attn"] = raw[f"layers.{i}.input"] + raw.pop(f"_attn_out.{i}")
    finally:
        for h in handles:
            h.remove()
    np_dtype = np.float64 if dtype == "float64" else np.float32
    acts = {k: v[0].to(tdtype).numpy().astype(np_dtype) for k, v in raw.items()}
    acts["logits"] = logits[0].to(tdtype).numpy().astype(np_dtype)
    acts["_engine"] = f"transformers {transformers.__version__} (torch {torch.__version__}, {dtype}, eager)"
    return acts


def _held_quantized(llm):
    """The engine's own first quantized matrix, when the backend keeps weights as host QuantizedTensors."""
    from .quant import QuantizedTensor

    w = llm.weights.layers[0].o_proj if llm.weights.layers else None
    return w if isinstance(w, QuantizedTensor) else None


def quant_settings(llm, group_size=128, zero_point=False) -> tuple[int, bool]:
    """(group size, zero point) of a quantized llm: read from the weights it holds where it can."""
    held = _held_quantized(llm)
    if held is not None:
        return held.group_size, held.zeros is not None
    return group_size, bool(zero_point)


def dequantized_linears(llm, group_size=128, zero_point=False) -> dict:
    """{HF name: dequantize(W)} of every matrix tinyserve quantized when loading `llm` (empty for float runs).

    The values are what the engine multiplies by (a quantized linear means x @ dequantize(W).T). On host
    backends they come from the quantized tensors the engine holds; otherwise the same quantize() is applied
    to the same checkpoint tensors with (group_size, zero_point). transformers run with them is the
    like-for-like reference of a quantized run.
    """
    fmt = _fmt_of(llm.quant)
    if fmt == "float32":
        return {}
    from .model import LINEAR_NAMES, hf_name, layer_matrix, linear_shapes
    from .quant import QuantizedTensor, dequantize, make_read_linear

    cfg, ckpt = llm.config, llm.ckpt
    shapes = linear_shapes(cfg)
    group_size, zero_point = quant_settings(llm, group_size, zero_point)
    read = make_read_linear({"int8": 8, "int4": 4}[fmt], group_size, zero_point)

    def value(held, name, shape):
        if isinstance(held, QuantizedTensor):
            return dequantize(held)
        if isinstance(held, np.ndarray):
            return held
        w = read(ckpt, name, shape)  # a device-side tensor: quantize the checkpoint's again, identically
        return dequantize(w) if isinstance(w, QuantizedTensor) else w

    out = {}
    for i, layer in enumerate(llm.weights.layers):
        for n in LINEAR_NAMES:
            out[hf_name(i, n)] = value(layer_matrix(layer, n), hf_name(i, n), shapes[n])
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    out["lm_head.weight"] = value(llm.weights.lm_head, head, (cfg.vocab_size, cfg.hidden_size))
    return out


# ----------------------------------------------------------------------------------------- validate
def _fmt_of(quant) -> str:
    """The tolerance-table format of a quant label: float32, int8, int4 ("int4 g128" -> "int4")."""
    if quant in (None, "none", ""):
        return "float32"
    return str(quant).split()[0].split("-")[0]


def _quant_label(llm, group_size, zero_point) -> str:
    """"none", or e.g. "int4 g32 zero-point" (the settings the weights were quantized with)."""
    fmt = _fmt_of(llm.quant)
    if fmt == "float32":
        return "none"
    group_size, zero_point = quant_settings(llm, group_size, zero_point)
    return f"{fmt} g{group_size}{' zero-point' if zero_point else ''}"


def validate(model_dir, prompt=None, backend="numpy", quant=None, dtype="float32", ids=None, group_size=128,
             zero_point=False, ops=None, llm=None) -> Report:
    """tinyserve against transformers on the same tokens: the per-layer report.

    A quantized run (quant int8 / int4) is checked twice: against transformers holding the same dequantized
    weights (like with like: float32 limits, so a kernel bug cannot hide under the quantization error), and
    against transformers with the float weights (the quantization error itself: the int8 / int4 budget),
    in `report.quant_error`. ops: run tinyserve with this ops object (a testing.SwappedOps, say).
    """
    if dtype not in ("float32", "float64"):
        raise TinyserveError(f"--dtype must be float32 or float64, got {dtype!r}")
    _require_transformers()  # before loading anything: a missing reference is one line, at once
    llm = llm or load_llm(model_dir, backend, quant, group_size, zero_point)
    ids = encode(llm, prompt, ids)
    fmt = _fmt_of(llm.quant)
    model_limits(fmt)  # a format without tolerances is refused before any work
    if fmt != "float32" and llm.ckpt.metadata.get("tinyserve_quant"):
        raise TinyserveError(f"{llm.model_dir} holds tinyserve-quantized weights, which transformers cannot read: "
                             "validate the float checkpoint with --quant instead")
    ours = capture_tinyserve(llm, ids, ops=ops)
    L = llm.config.num_hidden_layers
    qlabel = _quant_label(llm, group_size, zero_point)
    same = dequantized_linears(llm, group_size, zero_point)
    theirs = capture_transformers(llm.model_dir, ids, dtype, weights=same)
    engine = theirs.pop("_engine")
    meta = dict(
        model=str(llm.model_dir), backend=llm.backend, quant=qlabel,
        reference=engine + (f", with tinyserve's {qlabel} weights dequantized" if same else ""), tokens=len(ids),
    )
    rep = compare_acts(ours, theirs, L, "float32", "tinyserve validate: tinyserve vs transformers on the same tokens",
                       meta)
    if same:
        del theirs
        float_ref = capture_transformers(llm.model_dir, ids, dtype)
        float_ref.pop("_engine")
        rep.quant_error = compare_acts(ours, float_ref, L, fmt, f"quantization error: {qlabel} vs the float model "
                                       f"(transformers, {dtype} weights), against the {fmt} budget",
                                       dict(reference=engine + ", float weights"))
    return rep


def validate_kernel(model_dir, op: str, fn, prompt=None, backend="numpy", quant=None, ids=None, group_size=128,
                    zero_point=False, cases: int = 12, seed: int = 0, llm=None) -> Report:
    """A user kernel for `op`: check_op against the reference op, then the model run with the kernel swapped
    in against the same model without it (like with like: the float32 model-level limits apply)."""
    from .testing import SwappedOps, check_op

    if op not in OP_NAMES:
        raise TinyserveError(f"unknown op {op!r} (ops are: {', '.join(OP_NAMES)})")
    llm = llm or load_llm(model_dir, backend, quant, group_size, zero_point)
    ids = encode(llm, prompt, ids)
    op_check = check_op(op, fn, cases=cases, seed=seed, ops=llm.ops)
    base = capture_tinyserve(llm, ids)
    swapped = capture_tinyserve(llm, ids, ops=SwappedOps(llm.ops, **{op: fn}))
    name = getattr(fn, "__module__", "?") + ":" + getattr(fn, "__qualname__", getattr(fn, "__name__", "?"))
    meta = dict(model=str(llm.model_dir), backend=llm.backend, quant=llm.quant or "none", op=op, kernel=name,
                reference="the same model with the backend's own op", tokens=len(ids))
    rep = compare_acts(swapped, base, llm.config.num_hidden_layers, "float32",
                       f"tinyserve validate --kernel: {name} as ops.{op}", meta)
    rep.kernel = op_check
    return rep


# -------------------------------------------------------------------------------------------- dumps
@dataclass
class Dump:
    path: Path
    token_ids: np.ndarray
    acts: dict  # name -> float64 array
    meta: dict  # the metadata strings
    config: dict

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def _out_path(path, overwrite: bool = True) -> Path:
    """path, unless it is a directory (or, unless overwrite, an existing file) or its folder is missing or a
    file: then a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise TinyserveError(f"cannot write {path}: it is a directory")
    if not overwrite and path.exists():
        raise TinyserveError(f"{path} already exists (remove it or choose another --out)")
    if not path.parent.is_dir():
        why = "is a file, not a directory" if path.parent.exists() else "does not exist"
        raise TinyserveError(f"cannot write {path}: directory {path.parent} {why}")
    return path


def check_out_file(path, overwrite: bool = True) -> Path:
    """Refuse, before any work, an output file that could not be written: _out_path's checks, and a folder
    where no file can be created (a temporary file made there and removed). The writers themselves need
    only _out_path: their own temporary file fails the same way."""
    path = _out_path(path, overwrite)
    fd, tmp = _temp_file(path)
    os.close(fd)
    os.unlink(tmp)
    return path


def _temp_file(path: Path) -> tuple[int, str]:
    """mkstemp beside path (mode 0600 made the default), or a one-line error."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise TinyserveError(f"cannot write {path}: cannot create a file in {path.parent} ({e.strerror})") from None
    give_default_mode(tmp)  # mkstemp makes files 0600
    return fd, tmp


def atomic_write(path: Path, write) -> Path:
    """write(file) into a temporary file next to path, then rename: a failed run leaves nothing behind."""
    path = _out_path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise TinyserveError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return path


_ST_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}


def _safetensors_header(entries, metadata: dict) -> tuple[bytes, int]:
    """entries: [(name, dtype, shape)] in the order their bytes follow. Returns (header bytes, data length)."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype)], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offset


def write_safetensors(path, tensors: dict, metadata: dict) -> Path:
    """Arrays (float32, float64, int64) and string metadata as one safetensors file, written atomically."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    entries = [(k, a.dtype, a.shape) for k, a in arrays.items()]

    def write(f):
        head, _ = _safetensors_header(entries, metadata)
        f.write(head)
        for k, a in arrays.items():
            f.write(a.tobytes())

    return atomic_write(path, write)


def dump(model_dir, prompt, out, backend="numpy", quant=None, engine="tinyserve", dtype="float32", ids=None,
         group_size=128, zero_point=False, llm=None, ops=None) -> Path:
    """Write a golden activation dump (docs/validation.md) of tinyserve (or transformers) on the prompt.

    ops: run tinyserve with this ops object instead of the backend's (a testing.SwappedOps, say).
    """
    if engine not in ("tinyserve", "transformers"):
        raise TinyserveError(f"--engine must be tinyserve or transformers, got {engine!r}")
    check_out_file(out, overwrite=False)
    if engine == "transformers":
        _require_transformers()
    llm = llm or load_llm(model_dir, backend, quant if engine == "tinyserve" else None, group_size, zero_point)
    ids = encode(llm, prompt, ids)
    if engine == "tinyserve":
        if dtype != "float32":
            raise TinyserveError("tinyserve computes in float32: --dtype float64 is for --engine transformers")
        acts = capture_tinyserve(llm, ids, ops=ops)
        producer, backend_name = f"tinyserve {__version__}", llm.backend
        quant_name = _quant_label(llm, group_size, zero_point)
    else:
        acts = capture_transformers(llm.model_dir, ids, dtype)
        producer, backend_name, quant_name = acts.pop("_engine"), "torch", "none"
    meta = {
        "format": DUMP_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(llm.config.to_dict(), sort_keys=True),
        "producer": producer,
        "tinyserve_version": __version__,
        "backend": backend_name,
        "dtype": dtype,
        "quant": quant_name,
        "prompt": prompt if prompt is not None else ("" if ids is not None else DEFAULT_PROMPT),
        "num_layers": str(llm.config.num_hidden_layers),
    }
    tensors = {"token_ids": np.asarray(ids, dtype=np.int64)}
    tensors.update({k: acts[k] for k in dump_tensor_names(llm.config.num_hidden_layers)})
    return write_safetensors(out, tensors, meta)


def dump_tensor_names(num_layers: int) -> list[str]:
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.input", f"layers.{i}.after_attn", f"layers.{i}.after_mlp"]
    return names + ["norm", "logits"]


REQUIRED_META = ("format", "format_version", "config")
SHAPE_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


def read_dump(path) -> Dump:
    """Read and check a dump: format and version, config, shapes of every tensor present."""
    from .checkpoint import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise TinyserveError(f"dump not found: {path}")
    sf = SafetensorsFile(path)
    meta = sf.metadata  # a table of strings (SafetensorsFile checks)
    for k in REQUIRED_META:
        if k not in meta:
            raise TinyserveError(f"{path}: not a tinyserve activation dump (metadata has no {k!r})")
    if meta["format"] != DUMP_FORMAT:
        raise TinyserveError(f"{path}: format is {meta['format']!r}, expected {DUMP_FORMAT!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise TinyserveError(f"{path}: dump format version {meta['format_version']} (this tinyserve reads "
                             f"version {FORMAT_VERSION})")
    try:
        config = json.loads(meta["config"])
        L, D, V = int(config["num_hidden_layers"]), int(config["hidden_size"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError):
        raise TinyserveError(f"{path}: metadata 'config' is not a config.json with num_hidden_layers, "
                             "hidden_size and vocab_size") from None
    names = set(sf.names())
    if L < 0 or D < 1 or V < 1:
        raise TinyserveError(f"{path}: metadata 'config' has impossible sizes (num_hidden_layers {L}, "
                             f"hidden_size {D}, vocab_size {V})")
    if 2 * L > len(names):  # (before listing the names of an absurd number of layers)
        raise TinyserveError(f"{path}: its config has {L} layers, but the file holds only {len(names)} tensors")
    required = ["token_ids", "logits"] + [f"layers.{i}.{s}" for i in range(L) for s in ("after_attn", "after_mlp")]
    missing = [n for n in required if n not in names]
    if missing:
        raise TinyserveError(f"{path}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                                                            if len(missing) > 1 else ""))
    if sf.entries["token_ids"][0] not in ("I64", "I32") or len(sf.shape("token_ids")) != 1:
        raise TinyserveError(f"{path}: token_ids must be a 1-D int64 (or int32) tensor")
    token_ids = np.asarray(sf.get_raw("token_ids"), dtype=np.int64)
    T = token_ids.size
    if T == 0:
        raise TinyserveError(f"{path}: the dump has no tokens (token_ids is empty)")
    acts = {}
    for name in sorted(names - {"token_ids"}):
        dt = sf.entries[name][0]
        if dt not in ("F64", "F32", "F16", "BF16"):
            raise TinyserveError(f"{path}: tensor {name} has dtype {dt}, expected a float type")
        want = (T, V) if name == "logits" else (T, D)
        if sf.shape(name) != want:
            raise TinyserveError(f"{path}: tensor {name} has shape {sf.shape(name)}, expected {want} "
                                 f"({T} tokens, hidden size {D}, vocab {V})")
        a = sf.get_raw(name) if dt == "F64" else sf.get(name)
        acts[name] = np.asarray(a, dtype=np.float64)
    return Dump(path, token_ids, acts, dict(meta), config)


def compare_dumps(a_path, b_path) -> Report:
    """The per-layer report of dump B against dump A (A is the reference). Same model and tokens required."""
    a, b = read_dump(a_path), read_dump(b_path)
    for k in SHAPE_KEYS:
        va, vb = a.config.get(k), b.config.get(k)
        if k == "head_dim" and (va is None or vb is None):
            continue
        if va != vb:
            raise TinyserveError(f"the dumps are of different models: {k} is {va} in {a.path.name} and {vb} in "
                                 f"{b.path.name}")
    if a.token_ids.shape != b.token_ids.shape or not np.array_equal(a.token_ids, b.token_ids):
        raise TinyserveError(f"the dumps are of different token ids ({a.token_ids.size} vs {b.token_ids.size} "
                             "tokens, or different tokens): dump the same prompt with the same tokenizer")
    qa, qb = a.meta.get("quant", "none"), b.meta.get("quant", "none")
    fa, fb = _fmt_of(qa), _fmt_of(qb)
    for f in (fa, fb):
        if f not in FORMAT_ORDER:
            raise TinyserveError(f"unknown quant {f!r} in a dump's metadata (known: {', '.join(FORMAT_ORDER)})")
    # the same weights (same format and settings): like with like, float32 limits; else the coarser budget
    fmt = "float32" if qa == qb else max(fa, fb, key=FORMAT_ORDER.index)
    meta = dict(reference=f"{a.path} ({a.meta.get('producer', '?')}, {a.meta.get('backend', '?')}, quant {qa})",
                checked=f"{b.path} ({b.meta.get('producer', '?')}, {b.meta.get('backend', '?')}, quant {qb})",
                tokens=int(a.token_ids.size), tolerances=f"{fmt} (tinyserve/tolerances.py)")
    return compare_acts(b.acts, a.acts, a.num_layers, fmt, "tinyserve compare: B against A", meta)


# --------------------------------------------------------------------------------------- perplexity
def split_paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs, stripped; empty ones dropped."""
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def read_text(path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinyserveError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise TinyserveError(f"{path} is a directory, not a text file") from None
    except OSError as e:
        raise TinyserveError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TinyserveError(f"{path} is not UTF-8 text") from None


@dataclass
class PerplexityResult:
    model: str
    backend: str
    quant: str
    paragraphs: int
    tokens: int  # predicted tokens
    context: int
    mean_nll: float
    perplexity: float
    seconds: float
    kl: dict | None = None  # with a base run: kl_mean, kl_max, kl_p99, kl_median, top1, base_perplexity, ...
    saved: str | None = None
    chunk: int | None = None  # tokens per forward step (None: a paragraph in one prefill)
    activations: str = "float32"  # "int8": the cpu backend's int8-activation option was on

    def to_dict(self) -> dict:
        return jsonable(dict(vars(self)))

    def table(self) -> str:
        out = [
            f"tinyserve perplexity: {self.model} (backend {self.backend}, quant {self.quant}"
            f"{', int8 activations' if self.activations == 'int8' else ''})",
            f"  paragraphs        {self.paragraphs} (each BOS + text, truncated to {self.context} tokens, "
            + ("one prefill each)" if self.chunk is None else f"in steps of {self.chunk} token"
               f"{'s' if self.chunk > 1 else ''})"),
            f"  predicted tokens  {self.tokens}",
            f"  mean NLL          {self.mean_nll:.4f} nats/token",
            f"  perplexity        {self.perplexity:.4f}",
            f"  time              {self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s)",
        ]
        if self.saved:
            out.append(f"  logits saved to   {self.saved}")
        if self.kl:
            k = self.kl
            out += [
                f"  against the base run {k['base']}:",
                f"    base perplexity   {k['base_perplexity']:.4f}   ratio {k['ppl_ratio']:.4f}  "
                f"(ln ratio {k['ln_ppl_ratio']:+.5f})",
                f"    KL mean           {k['kl_mean']:.6f} nats/token",
                f"    KL max            {k['kl_max']:.6f}",
                f"    KL 99th pct       {k['kl_p99']:.6f}",
                f"    KL median         {k['kl_median']:.6f}",
                f"    top-1 agreement   {k['top1']:.4f}",
            ]
        return "\n".join(out)


def _tokenize_paragraphs(llm, paragraphs, context):
    bos = llm.tokenizer.bos_id
    seqs = []
    for p in paragraphs:
        ids = llm.tokenizer.hf.encode(p, add_special_tokens=False).ids
        ids = ([bos] if bos is not None else []) + ids
        seqs.append(ids[:context])
    return seqs


def _open_base(path, targets, vocab):
    from .checkpoint import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise TinyserveError(f"--kl-base file not found: {path}")
    sf = SafetensorsFile(path)
    meta = sf.metadata  # a table of strings (SafetensorsFile checks)
    if meta.get("format") != LOGITS_FORMAT:
        raise TinyserveError(f"{path}: not a tinyserve logits file (written by perplexity --save-logits)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TinyserveError(f"{path}: logits format version {meta.get('format_version')}, "
                             f"this tinyserve reads {FORMAT_VERSION}")
    for name in ("logits", "targets"):
        if name not in sf.entries:
            raise TinyserveError(f"{path}: tensor {name} is missing")
    if sf.entries["targets"][0] != "I64" or len(sf.shape("targets")) != 1:
        raise TinyserveError(f"{path}: targets must be a 1-D int64 tensor")
    base_targets = np.asarray(sf.get_raw("targets"), dtype=np.int64)
    if base_targets.shape != targets.shape or not np.array_equal(base_targets, targets):
        raise TinyserveError(f"{path}: the base run predicted other tokens ({base_targets.size} vs {targets.size}): "
                             "use the same text, --paragraphs, --context and tokenizer")
    if sf.shape("logits") != (targets.size, vocab) or sf.entries["logits"][0] != "F32":
        raise TinyserveError(f"{path}: logits have shape {sf.shape('logits')}, "
                             f"expected ({targets.size}, {vocab}) float32")
    return sf.get_raw("logits")


def perplexity(llm, text_file, context=None, paragraphs=None, save_logits=None, kl_base=None,
               progress=None, chunk=None) -> PerplexityResult:
    """Mean NLL and perplexity over the text's paragraphs, like llama-perplexity's KL mode when asked.

    Each blank-line-separated paragraph is encoded with the model's tokenizer, BOS first, truncated to
    `context` tokens (default min(max_position_embeddings, 512)), and run as one teacher-forced prefill (or
    in steps of `chunk` tokens, LLM.logits: chunk=1 runs every token as a decode step, the path generation
    takes); every token after BOS is predicted. save_logits: write the logits of every predicted token
    (safetensors, float32) for a later kl_base run. progress(done, total) is called after each paragraph.
    """
    cfg = llm.config
    if context is None:
        context = min(cfg.max_position_embeddings, 512)
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise TinyserveError(f"--context must be an integer >= 2, got {context!r}")
    if context > cfg.max_position_embeddings:
        raise TinyserveError(f"--context {context} is more than the model's {cfg.max_position_embeddings} positions")
    if paragraphs is not None and (isinstance(paragraphs, bool) or not isinstance(paragraphs, int) or paragraphs < 1):
        raise TinyserveError(f"--paragraphs must be a positive integer, got {paragraphs!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise TinyserveError(f"--chunk must be a positive integer, got {chunk!r}")
    paras = split_paragraphs(read_text(text_file))
    if not paras:
        raise TinyserveError(f"{text_file} has no text")
    if paragraphs is not None:
        paras = paras[:paragraphs]
    seqs = [s for s in _tokenize_paragraphs(llm, paras, context) if len(s) >= 2]
    if not seqs:
        raise TinyserveError(f"{text_file}: no paragraph has a token to predict")
    targets = np.concatenate([np.asarray(s[1:], np.int64) for s in seqs])
    offsets = np.cumsum([0] + [len(s) - 1 for s in seqs]).astype(np.int64)
    V = cfg.vocab_size
    base = _open_base(kl_base, targets, V) if kl_base is not None else None

    writer = None
    if save_logits is not None:
        writer = _LogitsWriter(save_logits, targets, offsets, V, dict(
            format=LOGITS_FORMAT, format_version=FORMAT_VERSION, config=json.dumps(cfg.to_dict(), sort_keys=True),
            producer=f"tinyserve {__version__}", backend=llm.backend, quant=llm.quant or "none",
            context=context, paragraphs=len(seqs), text=str(text_file),
            chunk="prefill" if chunk is None else str(chunk), activations=llm.activations))
    t0 = time.perf_counter()
    nll_sum = 0.0
    kls, top1, base_nll = [], [], 0.0
    try:
        for n, ids in enumerate(seqs):
            logits = llm.logits(ids, chunk=chunk)[:-1]  # (T-1, V): row t predicts token t+1
            lp = log_softmax(logits)
            tgt = np.asarray(ids[1:])
            rows = np.arange(tgt.size)
            nll_sum -= float(lp[rows, tgt].sum())
            if not math.isfinite(nll_sum):
                raise TinyserveError(f"{llm.model_dir}: the loss is {nll_sum} on paragraph {n + 1}: the model's "
                                     "logits hold NaN or infinity (corrupt weights?)")
            if writer is not None:
                writer.write(np.asarray(logits, np.float32))
            if base is not None:
                b = np.asarray(base[offsets[n]:offsets[n + 1]], np.float64)
                if not np.isfinite(b).all():
                    raise TinyserveError(f"{kl_base}: the logits of paragraph {n + 1} hold NaN or infinity")
                lpb = log_softmax(b)
                kls.append(np.sum(np.exp(lpb) * (lpb - lp), axis=-1))
                top1.append(lpb.argmax(-1) == lp.argmax(-1))
                base_nll -= float(lpb[rows, tgt].sum())
            if progress is not None:
                progress(n + 1, len(seqs))
        if writer is not None:
            writer.close()
    finally:
        if writer is not None:
            writer.abort()
    N = int(targets.size)
    mean_nll = nll_sum / N
    res = PerplexityResult(str(llm.model_dir), llm.backend, llm.quant or "none", len(seqs), N, context, mean_nll,
                           math.exp(mean_nll), time.perf_counter() - t0,
                           saved=str(save_logits) if save_logits is not None else None, chunk=chunk,
                           activations=llm.activations)
    if base is not None:
        kl = np.concatenate(kls)
        base_mean = base_nll / N
        res.kl = dict(base=str(kl_base), kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                      kl_p99=float(np.percentile(kl, 99)), kl_median=float(np.median(kl)),
                      top1=float(np.concatenate(top1).mean()), base_mean_nll=base_mean,
                      base_perplexity=math.exp(base_mean), ppl_ratio=math.exp(mean_nll - base_mean),
                      ln_ppl_ratio=mean_nll - base_mean)
    return res


class _LogitsWriter:
    """Streams the predicted tokens' logits into a safetensors file (memory stays one paragraph's worth).

    Tensors: targets (N,) int64, paragraph_offsets (P+1,) int64, logits (N, V) float32 (row i predicts
    targets[i]). Written to a temporary file and renamed on close, so an interrupted run leaves nothing.
    """

    def __init__(self, path, targets, offsets, vocab, metadata):
        self.path = _out_path(path)
        entries = [("targets", np.int64, targets.shape), ("paragraph_offsets", np.int64, offsets.shape),
                   ("logits", np.float32, (targets.size, vocab))]
        head, self.total = _safetensors_header(entries, metadata)
        fd, self.tmp = _temp_file(self.path)
        self.f = os.fdopen(fd, "wb")
        self.f.write(head)
        self.f.write(targets.astype(np.int64).tobytes())
        self.f.write(offsets.astype(np.int64).tobytes())
        self.done = False

    def write(self, rows: np.ndarray):
        self.f.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())

    def close(self):
        try:
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:  # abort() removes the temporary file
            raise TinyserveError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.done = True

    def abort(self):
        if not self.done:
            self.f.close()
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
