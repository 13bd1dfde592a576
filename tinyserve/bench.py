"""Measurements behind `tinyserve bench`, in the spirit of llama-bench.

For each configuration (model or shape, backend, quantization, batch) it measures, in one run:
- prefill: one prompt of `prompt_tokens` tokens through one forward call -> tokens/s and GFLOP/s;
- decode: `batch` sequences that each hold the prompt in their KV cache, stepping `gen_tokens` times
  together (greedy) from position `depth` (default: the prompt's length; 0 decodes from an empty context,
  as llama-bench's tg tests do: each step at position p attends to cache rows 0..p only, so steps from
  position d after the prompt are steps after a d-token prompt, its first d tokens) -> aggregate tokens/s,
  mean and standard deviation over the repetitions, and where batch 1 is measured too, the aggregate over
  batch 1's (decode_vs_batch1). The batch sizes of a model take turns repetition by repetition (1, 16, 1, 16,
  ...), so a shared machine's drift falls on all of them;
- the weight bytes one decode step reads (every linear weight once, plus the norms), divided by the batch:
  bytes per token; and the floor: (weight bytes per step) / (measured read bandwidth) is the least time a
  step can take when it is limited by memory. floor_fraction = floor / measured step time: 1.0 would mean
  decoding at the speed of memory.
- the machine's read bandwidth, measured right before and right after the decode steps of every
  repetition: each repetition's steps are held against the better of its two passes (a ceiling is the
  best the machine showed, and on a shared machine the pass itself swings from 32 to 57 GB/s within a
  minute, so only a pass taken around the same steps says what memory could do while they ran). A
  configuration reports the mean of its repetitions' fractions and of their ceilings (bandwidth_gb_s;
  each one in bandwidth_by_repetition_gb_s, beside decode_tok_s_by_repetition); the report's
  bandwidth_gb_s is the run's first and last pass.
Nothing is estimated: every figure printed is a measurement or arithmetic on measurements.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .config import ModelConfig, config_from_dict, rope_inv_freq
from .errors import TinyserveError
from .model import LINEAR_NAMES, LayerWeights, Weights, linear_shapes
from .progress import progress_bar

# Random-weight shapes (no download). stories15M / stories110M: the llama2.c TinyStories models;
# llama-1b: Llama 3.2 1B (tied embeddings, GQA 4:1).
SHAPES = {
    "stories260K": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True),
    "stories15M": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=6, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=True),
    "stories110M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024,
                        tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                     tie_word_embeddings=True, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise TinyserveError(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    d = dict(architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5, bos_token_id=1,
             eos_token_id=2, **SHAPES[name])
    return config_from_dict(d, where=f"shape {name}")


def random_weights(cfg: ModelConfig, seed: int = 0, transform=None) -> Weights:
    """Random float32 weights of a config's shapes (std 0.02, norms 1). transform(W) may quantize each matrix."""
    rng = np.random.default_rng(seed)

    def mat(shape):
        w = rng.random(shape, dtype=np.float32)
        w -= 0.5
        w *= 0.07  # uniform(-0.035, 0.035): std 0.02
        return transform(w) if transform else w

    D = cfg.hidden_size
    shapes = linear_shapes(cfg)
    layers = [
        LayerWeights(input_layernorm=np.ones(D, np.float32), post_attention_layernorm=np.ones(D, np.float32),
                     **{n: mat(shapes[n]) for n in LINEAR_NAMES})
        for _ in range(cfg.num_hidden_layers)
    ]
    embed = rng.random((cfg.vocab_size, D), dtype=np.float32) - np.float32(0.5)
    lm_head = embed if cfg.tie_word_embeddings and transform is None else mat((cfg.vocab_size, D))
    return Weights(embed_tokens=embed, layers=layers, norm=np.ones(D, np.float32), lm_head=lm_head,
                   inv_freq=rope_inv_freq(cfg))


def weight_bytes_per_step(w: Weights) -> int:
    """Bytes of weights one forward step reads: every linear weight once, the norms, one embedding row."""
    from .timer import _nbytes

    total = _nbytes(w.lm_head) + _nbytes(w.norm) + w.embed_tokens.shape[1] * 4
    for layer in w.layers:
        for m in _linear_weights(layer):
            total += _nbytes(m)
        total += _nbytes(layer.input_layernorm) + _nbytes(layer.post_attention_layernorm)
    return total


def _linear_weights(layer: LayerWeights) -> list:
    """A layer's matrices as the forward pass reads them: separate, or stacked (model.stack_projections)."""
    names = LINEAR_NAMES + ("qkv_proj", "gate_up_proj")
    return [getattr(layer, n) for n in names if getattr(layer, n) is not None]


def linear_flops_per_token(w: Weights) -> int:
    total = 2 * int(np.prod(w.lm_head.shape))
    for layer in w.layers:
        for m in _linear_weights(layer):
            total += 2 * int(np.prod(m.shape))
    return total


# ------------------------------------------------------------------------------------------ bandwidth
_read_kernel = None


def read_kernel():
    """The compiled read pass: read_all(a, chunks) sums a float32 array in `chunks` parallel pieces.
    bench/kernels.py and bench/bench_kernels.py measure bandwidth with it too."""
    global _read_kernel
    if _read_kernel is None:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True, cache=True)
        def read_all(a, chunks):
            partial = np.zeros(chunks, dtype=np.float32)
            step = (a.size + chunks - 1) // chunks
            for c in prange(chunks):
                lo = c * step
                hi = min(a.size, lo + step)
                part = a[lo:hi]  # slice first: a loop index from 0 vectorizes (NUMBA_NOTES)
                s = np.float32(0.0)
                for i in range(part.size):
                    s += part[i]
                partial[c] = s
            return partial.sum()

        _read_kernel = read_all
    return _read_kernel


READ_PASS_BYTES = 512 * 2**20  # far larger than any last-level cache here (32 MiB)


def measure_bandwidth(nbytes: int = READ_PASS_BYTES, repeats: int = 7, buffer: np.ndarray | None = None) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` parallel passes over a buffer far larger than L3
    (`buffer`, a float32 array, or a new one of nbytes)."""
    kern = read_kernel()
    a = np.ones(nbytes // 4, dtype=np.float32) if buffer is None else buffer
    from numba import get_num_threads

    chunks = 8 * get_num_threads()
    kern(a[:1024], chunks)  # compile / load from cache
    kern(a, chunks)  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kern(a, chunks)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def bandwidth_meter(backend: str):
    """A function that measures, once per call, the read bandwidth (bytes/s) of the memory a backend's
    weights live in: the GPU's for a backend that measures its own (cuda: ops.measure_bandwidth), this
    machine's RAM (measure_bandwidth) otherwise, its buffer allocated once (a run measures it around every
    repetition)."""
    from .ops import get_ops

    own = getattr(get_ops(backend), "measure_bandwidth", None)
    if own is not None:
        return own
    buffer = np.ones(READ_PASS_BYTES // 4, dtype=np.float32)
    return functools.partial(measure_bandwidth, buffer=buffer)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class BenchResult:
    model: str
    backend: str
    quant: str
    batch: int
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    prefill_tok_s: float
    prefill_tok_s_sd: float
    prefill_gflop_s: float
    decode_tok_s: float
    decode_tok_s_sd: float
    decode_gflop_s: float
    weight_bytes_per_token: float
    bandwidth_gb_s: float
    floor_fraction: float
    compile_s: float
    kv_dtype: str = "float32"
    activations: str = "float32"  # "int8": the cpu backend's int8-activation option (quantized layers, decode)
    decode_vs_batch1: float | None = None  # decode tok/s / the batch-1 decode tok/s of the same run (if measured)
    bandwidth_by_repetition_gb_s: list | None = None  # each repetition's: the better pass around its decode steps
    decode_tok_s_by_repetition: list | None = None  # and its decode rate
    decode_depth: int | None = None  # the position the decode steps start from (the context they attend to)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape" if self.model in SHAPES else "model"] = self.model
        return d


def copy_slot(cache, src: int, dst: int) -> bool:
    """Give slot dst the cache contents of slot src (host backends); False where arrays live elsewhere."""
    if not isinstance(cache.k[0], np.ndarray):
        return False
    for k, v in zip(cache.k, cache.v):
        k[dst] = k[src]
        v[dst] = v[src]
    return True


def _context(llm, name: str, prompt_tokens: int, gen_tokens: int) -> int:
    context = prompt_tokens + gen_tokens + 1
    if context > llm.config.max_position_embeddings:
        raise TinyserveError(f"{name}: prompt + generated tokens ({context}) exceed the model's "
                             f"{llm.config.max_position_embeddings} positions")
    return context


def decode_start(prompt_tokens: int, depth: int | None) -> int:
    """The position decode steps start from: depth (0 .. prompt_tokens), or the prompt's length when None."""
    start = prompt_tokens if depth is None else depth
    if not 0 <= start <= prompt_tokens:
        raise TinyserveError(f"--decode-depth {start}: must be between 0 and --prompt-tokens ({prompt_tokens})")
    return start


def measure_once(llm, batch: int, prompt_tokens: int, gen_tokens: int, context: int, bandwidth=None,
                 depth: int | None = None) -> tuple[float, float, float | None]:
    """One repetition: (prefill tokens/s of one prompt, aggregate decode tokens/s of `batch` sequences
    stepping from position `depth` (default prompt_tokens; at most that), the read bandwidth in bytes/s around
    the decode steps: the better of a pass by `bandwidth` (a function, e.g. bandwidth_meter's) right before
    them and one right after; None without it)."""
    start = decode_start(prompt_tokens, depth)
    prompt = np.random.default_rng(0).integers(3, llm.config.vocab_size, prompt_tokens)
    cache = llm.new_cache(batch, context)
    t0 = time.perf_counter()
    logits = llm.forward(prompt, np.arange(prompt_tokens), np.zeros(prompt_tokens, np.int64), cache,
                         rows=[prompt_tokens - 1], phase="prefill")
    prefill = prompt_tokens / (time.perf_counter() - t0)
    for s in range(1, batch):  # every sequence holds the same prompt
        if not copy_slot(cache, 0, s):
            llm.forward(prompt, np.arange(prompt_tokens), np.full(prompt_tokens, s), cache, rows=[prompt_tokens - 1])
    tokens = np.full(batch, int(np.argmax(logits[0])), dtype=np.int64)
    slots = np.arange(batch)
    before = bandwidth() if bandwidth is not None else None
    t0 = time.perf_counter()
    for t in range(gen_tokens):
        logits = llm.forward(tokens, np.full(batch, start + t), slots, cache, phase="decode")
        tokens = np.argmax(logits, axis=1)  # greedy: the sampling cost of temperature 0
    decode = batch * gen_tokens / (time.perf_counter() - t0)
    return prefill, decode, max(before, bandwidth()) if bandwidth is not None else None


def _result(llm, name: str, batch: int, prompt_tokens: int, gen_tokens: int, rates: list, depth: int) -> BenchResult:
    """A configuration's figures from its repetitions' (prefill rate, decode rate, bandwidth around the
    decode steps). The floor fraction is the mean of the repetitions' own: each one's decode steps against
    the bandwidth measured right around them."""
    prefill_rates, decode_rates, ceilings = ([r[i] for r in rates] for i in range(3))
    step_bytes = weight_bytes_per_step(llm.weights)
    flops_tok = linear_flops_per_token(llm.weights)
    pre, dec = float(np.mean(prefill_rates)), float(np.mean(decode_rates))
    fractions = [(step_bytes / bw) / (batch / d) for d, bw in zip(decode_rates, ceilings)]
    return BenchResult(
        model=name, backend=llm.backend, quant=llm.quant or "none", batch=batch, prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens, repetitions=len(rates),
        prefill_tok_s=pre, prefill_tok_s_sd=float(np.std(prefill_rates)), prefill_gflop_s=pre * flops_tok / 1e9,
        decode_tok_s=dec, decode_tok_s_sd=float(np.std(decode_rates)), decode_gflop_s=dec * flops_tok / 1e9,
        weight_bytes_per_token=step_bytes / batch, bandwidth_gb_s=float(np.mean(ceilings)) / 1e9,
        floor_fraction=float(np.mean(fractions)), compile_s=llm.compile_seconds,
        kv_dtype=llm.kv_dtype, activations=llm.activations,
        bandwidth_by_repetition_gb_s=[bw / 1e9 for bw in ceilings], decode_tok_s_by_repetition=list(decode_rates),
        decode_depth=depth,
    )


def load_for_bench(model: str | None, shape: str | None, backend: str, quant: str, group_size: int = 128,
                   timer=None, kv_dtype: str = "float32"):
    """(name, LLM): a model directory, or random weights of a named shape."""
    from .engine import LLM, load

    q = None if quant in (None, "none") else quant
    if shape:
        cfg = shape_config(shape)
        transform = None
        if q:
            from .quant import quantize

            bits = {"int8": 8, "int4": 4}[q]

            def transform(w):
                return quantize(w, bits, group_size)

        return shape, LLM.from_weights(cfg, random_weights(cfg, transform=transform), backend=backend, quant=q,
                                       timer=timer, kv_dtype=kv_dtype, consume=True)
    return str(model), load(model, backend=backend, quant=q, group_size=group_size, timer=timer, kv_dtype=kv_dtype)


def run_bench(model=None, shape=None, backends=("cpu",), quants=("none",), batches=(1,), prompt_tokens=512,
              gen_tokens=128, repetitions=3, group_size=128, progress=True, kv_dtype="float32",
              depth: int | None = None) -> dict:
    """Every combination; returns {"bandwidth_gb_s": [first pass, last pass], "results": [BenchResult dicts]}.
    depth: the position decode starts from (default: the prompt's length; see the module's docstring)."""
    depth = decode_start(prompt_tokens, depth)  # checked before any model loads
    combos = [(b, q) for b in backends for q in quants]
    batches = tuple(dict.fromkeys(batches))  # each size once (its repetitions are pooled by size)
    total = len(combos) * len(batches) * repetitions
    done = [0]
    bar = progress_bar("bench") if progress else None

    def tick(label=""):
        done[0] += 1
        if bar:
            bar(done[0], total, label)

    meters = {b: bandwidth_meter(b) for b in dict.fromkeys(backends)}
    passes = {b: [] for b in meters}  # each backend's read passes, in order

    def read_pass(backend):
        passes[backend].append(meters[backend]())
        return passes[backend][-1]

    results = []
    for backend, quant in combos:
        name, llm = load_for_bench(model, shape, backend, quant, group_size, kv_dtype=kv_dtype)
        context = _context(llm, name, prompt_tokens, gen_tokens)
        rates = {b: [] for b in batches}
        for _ in range(repetitions):  # the batch sizes take turns: the machine's drift falls on all of them
            for b in batches:  # each with the memory's read bandwidth measured right around its decode steps
                rates[b].append(measure_once(llm, b, prompt_tokens, gen_tokens, context,
                                              functools.partial(read_pass, backend), depth))
                tick(f"{backend}/{quant}/b{b}")
        ours = [_result(llm, name, b, prompt_tokens, gen_tokens, rates[b], depth) for b in batches]
        one = next((r for r in ours if r.batch == 1), None)
        for r in ours:  # aggregate decode against one sequence's, both measured in this run
            r.decode_vs_batch1 = r.decode_tok_s / one.decode_tok_s if one is not None else None
        results += ours
        del llm
    meters.clear()  # (the passes' buffers)
    first_last = {b: [bw[0], bw[-1]] for b, bw in passes.items() if bw}
    return {
        "bandwidth_gb_s": [x / 1e9 for x in first_last.get(backends[0], [])],  # the first backend's first / last pass
        "bandwidth_by_backend": {b: [x / 1e9 for x in bw] for b, bw in first_last.items()},
        "threads": _threads(),
        "kv_dtype": kv_dtype,
        "decode_depth": depth,
        "results": [r.as_dict() for r in results],
    }


def _threads() -> int:
    try:
        from numba import get_num_threads

        return get_num_threads()
    except Exception:  # pragma: no cover - numba is a dependency; this is only a label
        return os.cpu_count() or 1


def markdown_table(report: dict) -> str:
    by = report["bandwidth_by_backend"]  # named where it is not only this machine's RAM (cpu, numpy)
    named = len(by) > 1 or "cuda" in by
    where = ", ".join(f"{b + ' ' if named else ''}{bw[0]:.1f} / {bw[1]:.1f} GB/s" for b, bw in by.items())
    modes = sorted({r.get("activations", "float32") for r in report["results"]})
    a8 = ", quantized layers with int8 activations (cpu option)" if "int8" in modes else ""
    lines = [
        f"read bandwidth, first / last pass: {where} (each repetition's decode steps against the better pass "
        f"right before or after them; read GB/s: their mean), {report['threads']} CPU threads, "
        f"KV cache {report.get('kv_dtype', 'float32')}{a8}, decode from position {report.get('decode_depth')}",
        "",
        "| model | backend | quant | batch | prefill tok/s | decode tok/s | vs batch 1 | weight MB/token | "
        "read GB/s | floor fraction | prefill GFLOP/s | decode GFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ratio = r.get("decode_vs_batch1")
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['quant']}{' a8' if r.get('activations') == 'int8' else ''} | "
            f"{r['batch']} | "
            f"{r['prefill_tok_s']:.1f} ± {r['prefill_tok_s_sd']:.1f} | {r['decode_tok_s']:.1f} ± {r['decode_tok_s_sd']:.1f} | "
            f"{'' if ratio is None or r['batch'] == 1 else f'{ratio:.2f}x'} | "
            f"{r['weight_bytes_per_token'] / 1e6:.2f} | {r['bandwidth_gb_s']:.1f} | {r['floor_fraction']:.2f} | "
            f"{r['prefill_gflop_s']:.1f} | "
            f"{r['decode_gflop_s']:.1f} |"
        )
    return "\n".join(lines)


def measure_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Peak-ish float32 matrix-multiply rate of this machine (NumPy's BLAS), in FLOP/s."""
    a = np.ones((n, n), np.float32)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def pyplot():
    """matplotlib.pyplot, drawing to files (the Agg backend); a TinyserveError where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TinyserveError("--plot needs matplotlib (pip install 'tinyserve[plot]')") from None
    return plt


PLOT_FORMATS = ("png", "pdf", "svg")  # what matplotlib writes with no other package


def plot_format(path) -> str:
    """The picture format a --plot path names by its extension (PLOT_FORMATS); a one-line error otherwise,
    checked before any run (matplotlib would add ".png" to a path without an extension: DIR.png for a
    folder DIR)."""
    fmt = os.path.splitext(str(path))[1][1:].lower()
    if fmt not in PLOT_FORMATS:
        raise TinyserveError(f"--plot {path}: name the picture with one of the extensions "
                             f"{', '.join('.' + f for f in PLOT_FORMATS)} (e.g. roofline.png)")
    return fmt


def roofline_plot(path: str, timer_report: dict, bandwidth: float, peak_flops: float, title: str = "") -> None:
    """Each op's achieved GFLOP/s against its arithmetic intensity, under the measured ceilings; written to
    path in the format its extension names, through a temporary file (a failed write leaves nothing)."""
    from .validate import atomic_write

    fmt = plot_format(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = np.logspace(-2, 3, 200)
    ax.loglog(xs, np.minimum(xs * bandwidth, peak_flops) / 1e9, "k-", label="measured ceilings")
    for name, op in timer_report["ops"].items():
        if op["bytes"] and op["flops"] and op["seconds"]:
            ai = op["flops"] / op["bytes"]
            ax.loglog([ai], [op["flops"] / op["seconds"] / 1e9], "o", label=name)
            ax.annotate(name, (ai, op["flops"] / op["seconds"] / 1e9), fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(title or "tinyserve roofline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=120))
    plt.close(fig)


def profile_ops(llm, name: str, batch: int, prompt_tokens: int, gen_tokens: int, depth: int | None = None) -> dict:
    """One timed run with the instrumented timer attached: per-op seconds, bytes and FLOPs."""
    from .timer import Timer

    timer = Timer()
    llm.timer, llm._timed_ops = timer, None
    try:
        measure_once(llm, batch, prompt_tokens, gen_tokens, _context(llm, name, prompt_tokens, gen_tokens),
                     depth=depth)
    finally:
        llm.timer, llm._timed_ops = None, None
    return timer.report().as_dict()


def dump_json(report: dict) -> str:
    return json.dumps(report, indent=2)
