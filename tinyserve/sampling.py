"""Sampling: one sequence's next-token logits (V,) -> one token id.

The chain, in the order Hugging Face transformers applies it in ``generate()`` (repetition penalty is a
"logits processor", the rest are "warpers" that only run when sampling):

1. **Repetition penalty** (``RepetitionPenaltyLogitsProcessor``). For every token id that appears in the
   context (prompt + tokens generated so far; each id counts once however often it appears), its logit
   ``l`` becomes ``l * penalty`` if ``l < 0`` and ``l / penalty`` otherwise (so a logit of 0 stays 0).
   ``penalty > 1`` discourages repeats, ``penalty < 1`` encourages them, ``1`` is off. Ids ``>= V`` are
   ignored, as transformers does. Arithmetic in float32, bit-identical to torch.
2. **Temperature** (``TemperatureLogitsWarper``). ``l / temperature`` in float32 (bit-identical to torch).
   ``temperature == 0`` means greedy: see below.
3. **Top-k** (``TopKLogitsWarper``). Let ``t`` be the k-th largest logit; every token with logit ``< t``
   is removed. Tokens *tied* with the k-th value are all kept, so more than k tokens may survive.
   ``k == 0`` (or ``k >= V``) is off.
4. **Top-p / nucleus** (``TopPLogitsWarper``). Keep the smallest set of most probable tokens whose
   cumulative probability is ``>= top_p``; always at least one token. Computed exactly as transformers does
   it, so the float rounding agrees: probabilities are the float32 softmax of the current logits; going
   from the least probable token upwards, a token is removed when the running sum (accumulated in float64,
   rounded to float32, like torch's CPU cumsum) of its own probability and those of all less probable
   tokens is ``<= float32(1 - top_p)``; the most probable token is never removed. Tokens tied in
   probability at the boundary are ordered by id: the **lower id is treated as more probable** and is
   kept first. (transformers orders ties by whatever ``torch.sort`` happens to return, which is neither by
   id nor reproducible across devices; the number of tokens kept and their probabilities agree, only which
   of several equal tokens survives can differ.) ``top_p == 1`` is off (transformers does not add the
   warper either).
5. **Min-p** (``MinPLogitsWarper``). With ``p`` the float32 softmax of the current logits, remove every
   token whose ``p < float32(min_p) * max(p)``; the most probable token is always kept. ``min_p == 0`` is
   off.

Removed tokens get the logit ``-inf``; :func:`probabilities` is the softmax of what remains.

**Greedy** (``temperature == 0``): the token is the argmax of the logits after the repetition penalty
(transformers applies logits *processors*, including the repetition penalty, in greedy search too, but no
warpers); ties go to the lowest id. :func:`process_logits` then returns ``-inf`` everywhere except that
token, so :func:`probabilities` is one-hot and top-k / top-p / min-p have nothing left to do.

**Sampling** (``temperature > 0``): :class:`Sampler` draws one uniform number per token from its own
``numpy.random.default_rng(seed)`` and inverts the cumulative distribution of :func:`probabilities`, so the
same seed and the same logits give the same tokens on every machine.

Differences from transformers worth knowing when comparing the two:

- ``generate(do_sample=True)`` defaults to ``top_k=50`` when the model's generation config does not set it;
  here the default is ``top_k=0`` (off). Pass ``top_k=0`` to transformers to compare.
- transformers rejects ``temperature=0`` when sampling; here 0 means greedy.
- Logits containing NaN or ``+inf`` raise ``ValueError``: they are a bug upstream, and torch would produce
  NaN probabilities.
- Where steps 1-2 overflow float32 (a tiny temperature, an extreme penalty), torch gets ``inf`` and NaN
  probabilities; here they are redone in float64 and shifted so that the largest logit is 0, which changes
  no probability, and rounded back to float32 (logits far below the largest become ``-inf``: probability 0
  either way). So a temperature of 1e-40 is (nearly) greedy, as its limit is.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from tinyserve.errors import TinyserveError, is_integer

__all__ = [
    "SamplingParams",
    "Sampler",
    "apply_repetition_penalty",
    "process_logits",
    "probabilities",
]


def _bad(name: str, value, rule: str) -> TinyserveError:
    return TinyserveError(f"bad sampling value: {name}={value!r} ({rule})")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token. Defaults: greedy, every filter off. Call :meth:`validate`."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off; must be in (0, 1]
    min_p: float = 0.0  # 0 = off; must be in [0, 1]
    repetition_penalty: float = 1.0  # 1.0 = off; must be > 0
    seed: int | None = None  # None = fresh entropy

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Return self, or raise TinyserveError with one line naming the first bad value."""
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise _bad("temperature", t, "must be a finite number >= 0; 0 means greedy")
        k = self.top_k
        if not is_integer(k) or k < 0:
            raise _bad("top_k", k, "must be an integer >= 0; 0 means off")
        p = self.top_p
        if not _is_real(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise _bad("top_p", p, "must be in (0, 1]; 1 means off")
        m = self.min_p
        if not _is_real(m) or not math.isfinite(m) or not 0 <= m <= 1:
            raise _bad("min_p", m, "must be in [0, 1]; 0 means off")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise _bad("repetition_penalty", r, "must be a finite number > 0; 1 means off")
        s = self.seed
        if s is not None and (not is_integer(s) or s < 0):
            raise _bad("seed", s, "must be an integer >= 0, or None for a random seed")
        return self


class NonFiniteLogits(ValueError):
    """Logits holding NaN or +inf (the generator reports them as the model's fault, in one line)."""


def _check_logits(logits) -> np.ndarray:
    """A float32 copy of one sequence's logits (V,); raises ValueError on bad shapes or values."""
    x = np.array(logits, dtype=np.float32)  # always a copy: the caller's array is never modified
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must have shape (V,) with V >= 1, got shape {x.shape}")
    if np.isnan(x).any() or np.isposinf(x).any():
        raise NonFiniteLogits("logits contain NaN or +inf")
    if np.isneginf(x).all():
        raise ValueError("every logit is -inf: no token can be chosen")
    return x


def _context_array(context_ids) -> np.ndarray:
    if context_ids is None:
        return np.zeros(0, dtype=np.int64)
    ids = context_ids if isinstance(context_ids, np.ndarray) else np.asarray(list(context_ids))
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"context_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64).ravel()
    if (ids < 0).any():
        raise ValueError(f"context_ids must be >= 0, got {int(ids.min())}")
    return ids


def _apply_penalty(x: np.ndarray, context_ids, penalty: float) -> np.ndarray:
    """Step 1 in place on a float array we own, in its precision (float32 as torch, or float64)."""
    if penalty == 1.0:
        return x
    ids = _context_array(context_ids)
    ids = np.unique(ids[ids < x.shape[0]])  # ids beyond the vocabulary cannot be generated: ignored
    if ids.size:
        v, p = x[ids], x.dtype.type(penalty)
        x[ids] = np.where(v < 0, v * p, v / p)
    return x


def _penalize_and_scale(x: np.ndarray, context_ids, penalty: float, temperature: float) -> np.ndarray:
    """Steps 1 and 2 on checked float32 logits we own: float32 as torch computes them, or, where that
    overflows, in float64 shifted so that the largest is 0 (see the module docstring)."""
    if penalty == 1.0 and temperature == 1.0:
        return x
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        y = _apply_penalty(x.copy(), context_ids, penalty)
        if temperature != 1.0:
            y = y / np.float32(temperature)
        if np.isfinite(y.max()):  # no NaN or +inf, and some token left: torch's numbers exactly
            return y
        y = _apply_penalty(x.astype(np.float64), context_ids, penalty)
        top = y.max()
        if not np.isfinite(top):  # a penalty beyond ~1e±270 overflows float64 too
            raise TinyserveError(f"bad sampling value: repetition_penalty={penalty!r} (too extreme for these logits)")
        return ((y - top) / temperature).astype(np.float32)


def apply_repetition_penalty(logits, context_ids, penalty: float) -> np.ndarray:
    """Step 1 alone: float32 (V,) copy of ``logits`` with every context token's logit penalized."""
    return _apply_penalty(_check_logits(logits), context_ids, float(penalty))


def _softmax64(x: np.ndarray) -> np.ndarray:
    """Softmax in float64; tokens at -inf get exactly 0 (and cost nothing when most tokens are removed)."""
    alive = np.flatnonzero(x > -np.inf)
    e = np.exp(x[alive].astype(np.float64) - float(x[alive].max()))
    p = np.zeros(x.shape[0], dtype=np.float64)
    p[alive] = e / e.sum()
    return p


def _probs32(x: np.ndarray) -> np.ndarray:
    """Softmax rounded to float32, the precision transformers works in: the probabilities top-p and min-p see."""
    return _softmax64(x).astype(np.float32)


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    V = x.shape[0]
    if 0 < k < V:
        kth = np.partition(x, V - k)[V - k]  # the k-th largest value
        x[x < kth] = -np.inf  # ties with the k-th value survive
    return x


def _top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    if top_p >= 1.0:
        return x
    alive = np.flatnonzero(x > -np.inf)  # tokens already removed have p == 0: they cannot change the sums
    order = alive[np.argsort(-x[alive], kind="stable")]  # most probable first; ties: lower id first
    p = _probs32(x)[order]
    # mass of each token plus every less probable token, summed from the least probable upwards
    tail = np.cumsum(p[::-1], dtype=np.float64)[::-1].astype(np.float32)
    remove = tail <= np.float32(1.0 - top_p)
    remove[0] = False  # always keep the most probable token
    x[order[remove]] = -np.inf
    return x


def _min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    if min_p <= 0.0:
        return x
    p = _probs32(x)
    remove = p < np.float32(min_p) * p.max()
    remove[np.argmax(p)] = False  # always keep the most probable token
    x[remove] = -np.inf
    return x


def process_logits(logits: np.ndarray, params: SamplingParams, context_ids=()) -> np.ndarray:
    """The whole chain (see the module docstring); float32 (V,), removed tokens at -inf. Input untouched."""
    params.validate()
    temperature = 1.0 if params.greedy else float(params.temperature)
    x = _penalize_and_scale(_check_logits(logits), context_ids, float(params.repetition_penalty), temperature)
    if params.greedy:
        best = int(np.argmax(x))  # first maximum: ties go to the lowest id
        out = np.full_like(x, -np.inf)
        out[best] = x[best]
        return out
    x = _top_k(x, int(params.top_k))
    x = _top_p(x, float(params.top_p))
    x = _min_p(x, float(params.min_p))
    return x


def probabilities(logits: np.ndarray, params: SamplingParams, context_ids=()) -> np.ndarray:
    """Softmax of :func:`process_logits` in float64 (V,); sums to 1, removed tokens are exactly 0."""
    return _softmax64(process_logits(logits, params, context_ids))


class Sampler:
    """Picks tokens for one sequence with ``params``; owns its random generator (seeded by params.seed)."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context_ids=()) -> int:
        if self.params.greedy:  # no random draw
            x = _penalize_and_scale(_check_logits(logits), context_ids, float(self.params.repetition_penalty), 1.0)
            return int(np.argmax(x))
        p = probabilities(logits, self.params, context_ids)
        cdf = np.cumsum(p)
        u = self.rng.random() * cdf[-1]  # one uniform draw in [0, total)
        i = int(np.searchsorted(cdf, u, side="right"))  # first token whose cdf exceeds u: never a p == 0 token
        if i >= p.shape[0]:  # u rounded up to the total: take the last token that can be drawn
            i = int(np.flatnonzero(p)[-1])
        return i
