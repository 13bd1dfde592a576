"""The batch generator: requests in, token events out (continuous batching).

The generator owns time and order; the model owns math (model.forward); sampling.py picks tokens.

    waiting requests ──admit──> slots (at most max_batch, each a KV-cache slot) ──finish──> slot freed

Each step:
  1. admit waiting requests into free slots (a freed slot is reused at once, without waiting for others);
  2. build one flat batch: the whole prompt of every newly admitted request (prefill) and the last token
     of every running request (decode); one forward() call reads every weight once for all of them;
  3. sample each request's next token from its own logits row with its own sampling parameters and seed;
  4. stream the text, and finish a request on EOS, on a stop string, at max_new_tokens or when its
     context is full; its slot is then free for the next step.

A request's tokens depend only on its own prompt, parameters and seed, never on its neighbours in the
batch (every op treats rows independently), so greedy results equal running each request alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import TinyserveError
from .sampling import NonFiniteLogits, Sampler, SamplingParams, is_integer
from .tokenizer import StreamDecoder


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    id: object = None


def stop_strings(stop) -> tuple[str, ...]:
    """A request's stop strings: None, a string, or a list or tuple of strings (empty ones are dropped)."""
    if isinstance(stop, str):
        stop = (stop,)
    elif stop is None:
        stop = ()
    elif not isinstance(stop, (list, tuple)):
        raise TinyserveError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    bad = [s for s in stop if not isinstance(s, str)]
    if bad:
        raise TinyserveError(f"stop must be a string or a list of strings, got {type(bad[0]).__name__} in the list")
    return tuple(s for s in stop if s)


@dataclass
class Event:
    request_id: object
    token_id: int | None  # None on a finishing event that carries no new token
    text: str  # the new text (may be empty while a character or a possible stop string is incomplete)
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "stop" | "length" (max_new_tokens) | "context" (cache full)


@dataclass
class RequestResult:
    """A finished request: what LLM.generate returns (text and token_ids are the continuation only;
    an EOS that ended the text is included in token_ids) and what the timer reports from."""

    request_id: object
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length" (max_new_tokens) | "context" (cache full)
    started: float  # time.perf_counter() when admitted
    first_token: float | None  # when the first token was sampled
    finished: float
    token_times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict:
        """What `generate --json` prints for one request."""
        return {
            "id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 6),
            "ttft_s": None if self.ttft is None else round(self.ttft, 6),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 3),
        }


class _Sequence:
    """A request while it lives in a slot."""

    def __init__(self, req: Request, slot: int, tokenizer, eos_ids, context: int):
        self.req = req
        self.slot = slot
        self.tokens = list(req.prompt_ids)  # prompt + generated so far
        self.generated: list[int] = []
        self.cached = 0  # how many of self.tokens are in the KV cache
        self.sampler = Sampler(req.params)
        self.decoder = StreamDecoder(tokenizer, req.prompt_ids) if tokenizer is not None else None
        self.eos_ids = eos_ids
        self.context = context
        self.text = ""  # text emitted so far
        self.pending = ""  # text held back: it might be the start of a stop string
        self.started = time.perf_counter()
        self.first_token = None
        self.token_times: list[float] = []
        self.finish_reason: str | None = None

    def step_tokens(self) -> list[int]:
        """The tokens this sequence feeds to the next forward call: the prompt, then one at a time."""
        return self.tokens[self.cached :]

    def accept(self, token: int) -> Event:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.token_times.append(now)
        self.tokens.append(token)
        self.generated.append(token)
        req = self.req
        if token in self.eos_ids:
            return self._finish(token, "eos")
        delta = self.decoder.push(token) if self.decoder else ""
        self.pending += delta
        if req.stop:
            hit = min((i for i in (self.pending.find(s) for s in req.stop) if i >= 0), default=-1)
            if hit >= 0:
                out, self.pending = self.pending[:hit], ""
                self.text += out
                return Event(req.id, token, out, True, "stop")
        if len(self.generated) >= req.max_new_tokens:
            return self._finish(token, "length")
        if len(self.tokens) >= self.context:
            return self._finish(token, "context")
        # Emit everything except a tail that could still grow into a stop string.
        keep = _longest_stop_prefix(self.pending, req.stop)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        self.text += out
        return Event(req.id, token, out)

    def _finish(self, token, reason) -> Event:
        tail = self.pending + (self.decoder.flush() if self.decoder and reason != "eos" else "")
        self.pending = ""
        if self.req.stop:  # a stop string may have been completed by the flushed tail
            hit = min((i for i in (tail.find(s) for s in self.req.stop) if i >= 0), default=-1)
            if hit >= 0:
                tail, reason = tail[:hit], "stop"
        self.text += tail
        return Event(self.req.id, token, tail, True, reason)

    def result(self) -> RequestResult:
        return RequestResult(
            request_id=self.req.id,
            prompt_tokens=len(self.req.prompt_ids),
            token_ids=list(self.generated),
            text=self.text,
            finish_reason=self.finish_reason,
            started=self.started,
            first_token=self.first_token,
            finished=time.perf_counter(),
            token_times=self.token_times,
        )


def _longest_stop_prefix(text: str, stops) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Generator:
    """Continuous batching over a fixed set of KV-cache slots.

    engine: a tinyserve.engine.LLM (weights, config, ops, tokenizer). Add requests with add(), then iterate
    over run() for events; results() gives the finished requests.
    """

    def __init__(self, engine, max_batch: int = 8, context: int | None = None, timer=None):
        if not is_integer(max_batch) or max_batch <= 0:
            raise TinyserveError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.engine = engine
        self.max_batch = int(max_batch)
        self.cache = engine.new_cache(self.max_batch, context)
        self.context = self.cache.context
        self.timer = timer
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Sequence] = {}  # slot -> sequence
        self.finished: list[RequestResult] = []
        self._next_id = 0

    def add(self, req: Request) -> object:
        n = len(req.prompt_ids)
        if n == 0:
            raise TinyserveError("empty prompt, and this model has no BOS token to start from")
        if n >= self.context:
            raise TinyserveError(
                f"prompt is {n} tokens, too long for the context of {self.context} tokens "
                "(at least one position must be left to generate)"
            )
        if not is_integer(req.max_new_tokens) or req.max_new_tokens < 0:
            raise TinyserveError(f"max_new_tokens must be a non-negative integer, got {req.max_new_tokens!r}")
        vocab = self.engine.config.vocab_size
        if any(not (is_integer(t) and 0 <= t < vocab) for t in req.prompt_ids):
            raise TinyserveError(f"prompt has token ids that are not integers in the vocabulary (0..{vocab - 1})")
        req.params.validate()
        req.max_new_tokens, req.stop = int(req.max_new_tokens), stop_strings(req.stop)
        if req.id is None:
            req.id = self._next_id
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def _admit(self) -> list[Event]:
        events = []
        free = [s for s in range(self.max_batch) if s not in self.running]
        while self.waiting and free:
            req = self.waiting.popleft()
            seq = _Sequence(req, free.pop(0), self.engine.tokenizer, self.engine.eos_ids, self.context)
            if req.max_new_tokens == 0:  # nothing to do: finish at once, never touching the model
                seq.finish_reason = "length"
                self.finished.append(seq.result())
                events.append(Event(req.id, None, "", True, "length"))
                free.insert(0, seq.slot)
                continue
            self.running[seq.slot] = seq
        return events

    def step(self) -> list[Event]:
        """One forward pass over all running sequences; returns the events it produced."""
        events = self._admit()
        if not self.running:
            return events
        seqs = sorted(self.running.values(), key=lambda s: s.slot)
        ids, pos, slots, rows = [], [], [], []
        for s in seqs:
            new = s.step_tokens()
            ids.extend(new)
            pos.extend(range(s.cached, s.cached + len(new)))
            slots.extend([s.slot] * len(new))
            rows.append(len(ids) - 1)
        with np.errstate(all="ignore"):  # no numpy warnings: non-finite logits are reported below, in one line
            logits = self.engine.forward(
                np.asarray(ids, np.int64), np.asarray(pos, np.int64), np.asarray(slots, np.int64), self.cache,
                rows=np.asarray(rows, np.int64), phase="prefill" if any(s.cached == 0 for s in seqs) else "decode",
            )
        for s, row in zip(seqs, logits):
            s.cached = len(s.tokens)
            t0 = time.perf_counter()
            try:
                token = s.sampler(row, s.tokens)  # checks the row's values
            except NonFiniteLogits:
                raise TinyserveError("the model produced non-finite logits (NaN or +inf): its weights may hold "
                                     "NaN/inf") from None
            if self.timer is not None:
                self.timer.add_sampling(time.perf_counter() - t0)
            ev = s.accept(token)
            events.append(ev)
            if ev.finished:
                s.finish_reason = ev.finish_reason
                self.finished.append(s.result())
                if self.timer is not None:
                    self.timer.add_request(self.finished[-1])
                del self.running[s.slot]
        return events

    def run(self):
        """Yield events until every request has finished."""
        while self.waiting or self.running:
            yield from self.step()

    def results(self) -> list[RequestResult]:
        return list(self.finished)
