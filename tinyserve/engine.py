"""tinyserve.load(): a model directory in, an LLM object out (weights on a backend, tokenizer, defaults).

    llm = tinyserve.load("DIR", quant="int8")     # backend "cpu" (Numba) by default; "numpy", "cuda"
    llm.logits([1, 403, 407])                      # (3, V) float32: one teacher-forced prefill
    outs = llm.generate(["Once upon a time"], max_new_tokens=50, temperature=0.0)
    outs[0].text, outs[0].token_ids                # the continuation only
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .config import ModelConfig, load_config, read_json
from .errors import TinyserveError
from .generate import Generator, Request, RequestResult, stop_strings
from .kv_cache import KVCache, cache_bytes, default_context, kv_dtype
from .model import forward, load_weights, upload_weights
from .ops import get_ops
from .progress import progress_bar
from .sampling import SamplingParams, is_integer
from .tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "weights" / "tinystories"
DEFAULT_BACKEND = "cpu"


def default_model_dir() -> Path:
    """The model used when none is named: $TINYSERVE_MODEL, else the small model shipped in weights/."""
    env = os.environ.get("TINYSERVE_MODEL")
    path = Path(env) if env else DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise TinyserveError(
            f"no model given and the default model is missing at {path} "
            "(pass --model DIR; tinyserve never downloads weights)"
        )
    return path


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class LLM:
    def __init__(
        self,
        model_dir=None,
        backend: str = DEFAULT_BACKEND,
        quant: str | None = None,
        group_size: int = 128,
        zero_point: bool = False,
        progress: bool = False,
        timer=None,
        kv_dtype: str = "float32",
    ):
        t0 = time.perf_counter()
        _check_load_args(model_dir, backend, quant, zero_point)
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.config: ModelConfig = load_config(self.model_dir)
        self.backend = backend
        self.kv_dtype = _check_kv_dtype(kv_dtype, backend)
        self.ops = get_ops(backend)
        self.tokenizer = Tokenizer(self.model_dir, self.config)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise TinyserveError(
                f"{self.model_dir}: tokenizer has {self.tokenizer.vocab_size} tokens, "
                f"more than the model's vocab_size {self.config.vocab_size}"
            )
        self.generation_defaults = self._generation_defaults()
        self.ckpt = Checkpoint(self.model_dir)
        read_linear = None
        self.quant = quant if quant not in (None, "none") else None
        self.group_size = group_size if self.quant else None
        self.zero_point = bool(zero_point) if self.quant else False
        if self.quant:
            from .quant import make_read_linear

            bits = {"int8": 8, "int4": 4}.get(quant)
            if bits is None:
                raise TinyserveError(f"unknown quantization {quant!r} (choose none, int8 or int4)")
            read_linear = make_read_linear(bits, group_size, zero_point)
        elif "tinyserve_quant" in self.ckpt.metadata:  # a checkpoint written by `tinyserve quantize`
            from .quant import check_label, make_read_linear

            read_linear = make_read_linear(None, None, None)
            self.quant = check_label(self.ckpt.metadata["tinyserve_quant"], self.model_dir)
        bar = progress_bar("loading") if progress else None
        host = load_weights(self.ckpt, self.config, read_linear=read_linear, progress=bar)
        self._place(host, t0, timer, progress, consume=True)
        del host
        self.ckpt.release()  # the mappings stay only where weights are used in place (numpy backend, no copy)

    @classmethod
    def from_weights(cls, config: ModelConfig, host_weights, backend: str = DEFAULT_BACKEND, timer=None,
                     quant: str | None = None, kv_dtype: str = "float32", consume: bool = False) -> "LLM":
        """An LLM from weights already in memory (random-weight benchmarks); no tokenizer, no EOS. consume: the
        host weights' layers are taken out as they are placed (model.upload_weights), for a caller that does
        not keep them."""
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self.model_dir, self.config, self.backend, self.quant = None, config, backend, quant
        self.group_size, self.zero_point = None, False
        self.kv_dtype = _check_kv_dtype(kv_dtype, backend)
        self.ops = get_ops(backend)
        self.tokenizer = None
        self.generation_defaults = {"temperature": 0.0}
        self._place(host_weights, t0, timer, consume=consume)
        return self

    def _place(self, host_weights, t0, timer, progress: bool = False, consume: bool = False) -> None:
        """Put the weights on the backend, compile its kernels, and time both (consume: see upload_weights)."""
        self.timer = timer
        self.weights = upload_weights(host_weights, self.ops, consume)
        self.load_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        if hasattr(self.ops, "warmup"):
            note = progress and sys.stderr.isatty()
            if note:  # the first run compiles every kernel (~1 min); later runs load them from Numba's cache
                sys.stderr.write("compiling kernels (only the first time; cached afterwards)...\r")
                sys.stderr.flush()
            self.ops.warmup(self.weights)  # JIT-compile (or load from the cache) every kernel, up front
            if note:
                sys.stderr.write(" " * 64 + "\r")
        self.compile_seconds = time.perf_counter() - t1
        self._timed_ops = None
        if timer is not None:
            timer.add_phase("load", self.load_seconds)
            timer.add_phase("compile", self.compile_seconds)

    # --------------------------------------------------------------------------------------------- info
    @property
    def eos_ids(self) -> frozenset:
        return self.tokenizer.eos_ids if self.tokenizer is not None else frozenset()

    @property
    def activations(self) -> str:
        """"int8" where this model's quantized layers take the cpu backend's int8-activation path
        (ops.cpu.ACTIVATIONS), else "float32": what bench and perplexity report."""
        if self.backend != "cpu" or not self.quant:
            return "float32"
        from .ops import cpu

        return cpu.ACTIVATIONS

    def _generation_defaults(self) -> dict:
        """Sampling defaults from generation_config.json: the model author's settings, if sampling is on."""
        path = self.model_dir / "generation_config.json"
        gc = read_json(path) if path.is_file() else {}
        do_sample = gc.get("do_sample") if isinstance(gc, dict) else None
        if do_sample is not None and not isinstance(do_sample, bool):
            raise TinyserveError(f"{path}: do_sample must be true or false, got {do_sample!r}")
        if not do_sample:
            return {"temperature": 0.0}
        out = {k: gc[k] for k in SAMPLING_KEYS if gc.get(k) is not None}
        out.setdefault("temperature", 1.0)
        return out

    # ------------------------------------------------------------------------------------------- model
    def new_cache(self, slots: int, context: int | None = None) -> KVCache:
        """A KV cache with `slots` sequences of `context` positions (default: the model's, capped)."""
        capped = False
        if context is None:
            context, capped = default_context(self.config, slots, dtype=self.kv_dtype)
        elif not is_integer(context) or context <= 0:
            raise TinyserveError(f"context must be a positive integer, got {context!r}")
        elif context > self.config.max_position_embeddings:
            raise TinyserveError(
                f"context {context} is longer than the model's max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        cache = KVCache(self.config, slots, int(context), self.ops, self.kv_dtype)
        if capped:  # noted once the cache exists: one too large for memory fails with its error alone
            print(
                f"note: context capped at {context} tokens (the model allows {self.config.max_position_embeddings}) "
                f"to keep the KV cache at {cache_bytes(self.config, slots, context, self.kv_dtype) / 2**30:.1f} GiB; "
                "pass a context length to change it",
                file=sys.stderr,
            )
        return cache

    def forward(self, token_ids, positions, slots, cache, rows=None, tap=None, phase="prefill") -> np.ndarray:
        """model.forward on host int arrays; returns host float32 logits (R, V).

        phase ("prefill" or "decode") only labels the time spent, when a timer is attached.
        """
        ids = np.asarray(token_ids, np.int64)
        positions, slots = np.asarray(positions, np.int64), np.asarray(slots, np.int64)
        step_graphs = getattr(self.ops, "StepGraphs", None)
        if (step_graphs is not None and phase == "decode" and tap is None and self.timer is None
                and (rows is None or np.array_equal(rows, np.arange(ids.size)))):  # rows: all of them
            # a backend that replays decode steps as recorded graphs (cuda): one per cache and step size
            graphs = getattr(cache, "step_graphs", None)
            if graphs is None:
                graphs = cache.step_graphs = step_graphs()
            return graphs.run((ids, positions, slots),
                              lambda i, p, s: forward(self.weights, self.config, self.ops, i, p, s, cache))
        ops = self.ops
        if self.timer is not None:
            ops = self._timed_ops
            if ops is None or ops._ops is not self.ops or ops._timer is not self.timer:  # a swapped-in ops or timer
                ops = self._timed_ops = self.timer.wrap(self.ops, self.weights)
            # the phase holds the step's op calls (timer.TimedOps times each one), not the timer's own set-up
            # above (wrapping the ops walks every weight once: the timer's cost, not the step's)
            t0 = time.perf_counter()
            # a step's op calls follow from its number of tokens and of logit rows (see timer.TimedOps)
            ops.begin_step((ids.size, None if rows is None else len(rows)), slots, positions)
        up = self.ops.upload
        logits = forward(
            self.weights, self.config, ops, up(ids), up(positions), up(slots),
            cache, rows=None if rows is None else up(np.asarray(rows, np.int64)), tap=tap,
        )
        logits = self.ops.download(logits)
        if self.timer is not None:
            self.timer.add_phase(phase, time.perf_counter() - t0)
            ops.end_step()
        return logits

    def logits(self, token_ids, tap=None, chunk: int | None = None) -> np.ndarray:
        """Logits (T, V) for every position of one sequence (teacher forcing): in one prefill, or with chunk=k
        in steps of k tokens over one KV cache, each step attending to the cache of the steps before, as a
        chunked prefill does (chunk=1: every token a decode step, the path generation takes). The same
        logits either way up to float32 rounding (other batch sizes take other kernels), except where an
        option rounds activations in decode steps (the cpu backend's int8 activations). tap: one prefill
        only."""
        bad = TinyserveError(f"token ids must be integers in 0..{self.config.vocab_size - 1}")
        try:
            ids = np.asarray(token_ids).reshape(-1)
        except ValueError:  # a ragged list
            raise bad from None
        if ids.size == 0:
            raise TinyserveError("logits() needs at least one token")
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise bad
        ids = ids.astype(np.int64)
        if ids.size > self.config.max_position_embeddings:
            raise TinyserveError(
                f"{ids.size} tokens are more than the model's {self.config.max_position_embeddings} positions"
            )
        cache = KVCache(self.config, 1, ids.size, self.ops, self.kv_dtype)
        if chunk is None:
            return self.forward(ids, np.arange(ids.size), np.zeros(ids.size, np.int64), cache, tap=tap)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise TinyserveError(f"chunk must be a positive integer, got {chunk!r}")
        if tap is not None:
            raise TinyserveError("tap sees one prefill: it cannot be combined with chunk")
        parts, step = [], int(chunk)
        for a in range(0, ids.size, step):
            b = min(ids.size, a + step)
            parts.append(np.asarray(self.forward(ids[a:b], np.arange(a, b), np.zeros(b - a, np.int64), cache,
                                                 phase="decode" if b - a == 1 else "prefill")))
        return np.concatenate(parts)

    # -------------------------------------------------------------------------------------- generation
    def encode_prompt(self, prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, (list, tuple)):
            if not all(is_integer(t) for t in prompt):
                raise TinyserveError("a prompt given as a list must hold integer token ids only")
            return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise TinyserveError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise TinyserveError("a prompt must be valid Unicode text (it holds a lone surrogate)") from None
        return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)

    def sampling_params(self, **given) -> SamplingParams:
        """SamplingParams from the given values; missing ones come from generation_config.json."""
        values = dict(self.generation_defaults)
        values.update({k: v for k, v in given.items() if v is not None})
        return SamplingParams(**{k: values[k] for k in (*SAMPLING_KEYS, "seed") if k in values}).validate()

    def request(self, prompt, max_new_tokens=128, stop=None, chat=False, id=None, **sampling) -> Request:
        return Request(
            prompt_ids=self.encode_prompt(prompt, chat),
            params=self.sampling_params(**sampling),
            max_new_tokens=max_new_tokens,
            stop=stop_strings(stop),
            id=id,
        )

    def stream(self, requests, max_batch: int | None = None, context: int | None = None):
        """Run requests with continuous batching; yields generate.Event objects as tokens are made."""
        requests = list(requests) if hasattr(requests, "__iter__") else None
        if requests is None or not all(isinstance(r, Request) for r in requests):
            raise TinyserveError("stream() takes a list of requests made by LLM.request()")
        if max_batch is None:
            max_batch = max(1, min(len(requests), 8))
        gen = Generator(self, max_batch=max_batch, context=context, timer=self.timer)
        for r in requests:
            gen.add(r)
        self.last_generator = gen
        yield from gen.run()

    def generate(
        self,
        prompts,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop=None,
        chat: bool = False,
        max_batch: int | None = None,
        context: int | None = None,
        on_event=None,
    ) -> list[RequestResult]:
        """Generate continuations of one prompt or several (of any lengths) at once, in input order."""
        if on_event is not None and not callable(on_event):
            raise TinyserveError(f"on_event must be a function of one generate.Event, got {type(on_event).__name__}")
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and is_integer(prompts[0]))
        if single:
            prompts = [prompts]
        elif isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
            raise TinyserveError(
                f"prompts must be a string, a list of token ids, or a list of those, got {type(prompts).__name__}"
            )
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed)
        reqs = [self.request(p, max_new_tokens, stop, chat, id=i, **sampling) for i, p in enumerate(prompts)]
        for ev in self.stream(reqs, max_batch=max_batch, context=context):
            if on_event is not None:
                on_event(ev)
        return sorted(self.last_generator.results(), key=lambda r: r.request_id)  # ids are input positions


def _check_load_args(model_dir, backend, quant, zero_point) -> None:
    """The types of load()'s arguments (their values are checked where they are used)."""
    if model_dir is not None and not isinstance(model_dir, (str, os.PathLike)):
        raise TinyserveError(f"model_dir must be a path (str or os.PathLike), got {type(model_dir).__name__}")
    if not isinstance(backend, str):
        raise TinyserveError(f"backend must be a string such as 'cpu', got {backend!r}")
    if quant is not None and not isinstance(quant, str):
        raise TinyserveError(f"quant must be None or a string such as 'int8', got {quant!r}")
    if not isinstance(zero_point, bool):
        raise TinyserveError(f"zero_point must be True or False, got {zero_point!r}")


def _check_kv_dtype(name, backend: str) -> str:
    """The KV cache's dtype, checked: "float32" (default) or "float16" (cpu and numpy backends)."""
    if not isinstance(name, str):
        raise TinyserveError(f"kv_dtype must be 'float32' or 'float16', got {name!r}")
    try:
        kv_dtype(name)
    except ValueError as e:
        raise TinyserveError(str(e)) from None
    if name != "float32" and backend == "cuda":
        raise TinyserveError("the cuda backend keeps its KV cache in float32 (a float16 cache is for cpu and numpy)")
    return name


def load(model_dir=None, backend: str = DEFAULT_BACKEND, quant=None, group_size: int = 128, zero_point: bool = False,
         progress: bool = False, timer=None, kv_dtype: str = "float32") -> LLM:
    """Load a Hugging Face model directory (default: the small model shipped in weights/).

    kv_dtype: the KV cache's element type, "float32" (default: the reference's numbers) or "float16" (half
    the cache's memory and of the bytes attention reads; keys and values rounded to float16 as written)."""
    return LLM(model_dir, backend=backend, quant=quant, group_size=group_size, zero_point=zero_point,
               progress=progress, timer=timer, kv_dtype=kv_dtype)
