"""The reference backend: every op in plain NumPy. This file is the executable specification.

The fast backends (ops/cpu.py with Numba, ops/cuda.py with numba.cuda) define the same names with the same
signatures, and the tests compare them with these functions. Written for clarity first; still, nothing here
loops over tokens in Python where a matrix product will do, so a whole prompt is one call per op.

Shapes (the legend of model.py): N tokens in the step (from any number of sequences), D hidden size,
H query heads, KVH key/value heads, hd head dim, F MLP width, S cache slots, Tmax cache length.
All activations are float32.
"""

from __future__ import annotations

import numpy as np

from . import Stacked, split_columns


# ----------------------------------------------------------------------------------------------- arrays
def upload(a):
    """Put a host array (or quantized tensor) where this backend computes on it. NumPy: nothing to do."""
    return a


def download(a) -> np.ndarray:
    """Bring an array back to the host as NumPy."""
    return np.asarray(a)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


# ------------------------------------------------------------------------------------------------- ops
def take_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx] for a 2-D x and 1-D integer idx: (R, C), (N,) -> (N, C) float32.

    It is the embedding lookup (x = the embedding table, idx = token ids) and also picks the rows whose
    logits are needed.
    """
    return np.asarray(x[np.asarray(idx)], dtype=np.float32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, per row. (N, D), (D,) -> (N, D)."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + np.float32(eps)) * weight).astype(np.float32)


def add_rmsnorm(x: np.ndarray, branch: np.ndarray, weight: np.ndarray, eps: float) -> tuple:
    """The residual add and the RMSNorm that follows it, as one op: s = x + branch, returns (s, rmsnorm(s)).
    (N, D), (N, D), (D,) -> (N, D), (N, D).

    Every block of the model ends with the first (its output added to the residual stream) and the next
    block begins with the second, so the forward pass makes one call where it would make two: a fast backend
    reads the rows once, and at one token a step the calls themselves are much of the time (each costs
    microseconds of cache misses after a matrix product has streamed its weights through the caches).
    """
    s = add(x, branch)
    return s, rmsnorm(s, weight, eps)


def linear(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T + bias. (N, in), W (out, in) -> (N, out).

    W is a float32 array or a quantized tensor (tinyserve.quant); a quantized W means exactly
    dequantize(W), so the spec of the quantized matmul is the float one. W may also be several weights
    stacked (ops.Stacked): then the result is one (N, part) array per part, the product's columns split.
    """
    if isinstance(w, Stacked):
        return split_columns(linear(x, w.weight, bias), w.parts)
    if not isinstance(w, np.ndarray):
        from ..quant import dequantize

        w = dequantize(w)
    y = x @ w.T
    if bias is not None:
        y = y + bias
    return y.astype(np.float32, copy=False)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary position embedding, Hugging Face's half-split layout. (N, nh, hd), (N,), (hd/2,) -> (N, nh, hd).

    Dimension i of the first half and dimension i of the second half form one pair, rotated by the angle
    position * inv_freq[i]:  (a, b) -> (a cos - b sin, b cos + a sin).
    Angles are computed in float32, as transformers does.
    """
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (N, hd/2)
    cos = np.cos(angles)[:, None, :]  # (N, 1, hd/2)
    sin = np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(np.float32)


def kv_write(k_cache, v_cache, k: np.ndarray, v: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> None:
    """Store each token's key and value in its sequence's cache slot, at its position (in place).

    k_cache, v_cache: (S, KVH, Tmax, hd) float32, or float16 (the kv_dtype option: NumPy's assignment rounds
    each value to the nearest float16, ties to even); k, v: (N, KVH, hd) float32; slots, positions: (N,).
    """
    with np.errstate(over="ignore"):  # float16: beyond +-65504 a value becomes +-inf, as the kernels make it
        k_cache[slots, :, positions, :] = k
        v_cache[slots, :, positions, :] = v


def rope_kv_write(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache, v_cache, slots: np.ndarray,
                  positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """RoPE on a step's queries and keys, and its keys and values stored in the cache, as one op: writes
    kv_write(k_cache, v_cache, rope(k), v, slots, positions) and returns rope(q). (N, H, hd), (N, KVH, hd) x 2,
    the caches, (N,), (N,), (hd/2,) -> (N, H, hd).

    The forward pass makes one call where it would make three (as add_rmsnorm does two): at one token a step
    a call costs more than its work, and a fast backend computes each position's angles once for both.
    """
    kv_write(k_cache, v_cache, rope(k, positions, inv_freq), v, slots, positions)
    return rope(q, positions, inv_freq)


def attention(q, k_cache, v_cache, slots, positions, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention over the KV cache. Returns (N, H, hd).

    q: (N, H, hd) queries (after RoPE); k_cache, v_cache: (S, KVH, Tmax, hd), already holding this step's
    keys and values (kv_write runs first). Token n belongs to sequence slot slots[n] and sits at position
    positions[n]; it attends to that slot's positions 0..positions[n] (the causal mask), or only the last
    `window` of them when window > 0 (Mistral's sliding window). Query head h uses key/value head
    h // (H // KVH): the G = H // KVH query heads of a group share one key/value head, which is never copied.
    Scores are scaled by 1/sqrt(hd) and softmaxed in float32.
    """
    N, H, hd = q.shape
    KVH = k_cache.shape[1]
    G = H // KVH
    out = np.empty_like(q)
    scale = np.float32(1.0 / np.sqrt(hd))
    # Tokens of one sequence come as one run (a prompt being prefilled, or one decoding token): one set of
    # matrix products per run.
    start = 0
    while start < N:
        end = start + 1
        while end < N and slots[end] == slots[start]:
            end += 1
        slot, pos = slots[start], positions[start:end]  # pos: (n,)
        T = int(pos.max()) + 1  # keys 0..T-1 are visible to some token of the run
        K = k_cache[slot, :, :T, :].astype(np.float32, copy=False)  # (KVH, T, hd); a float16 cache widens exactly
        V = v_cache[slot, :, :T, :].astype(np.float32, copy=False)  # (KVH, T, hd)
        qg = q[start:end].reshape(end - start, KVH, G, hd)  # (n, KVH, G, hd): heads grouped by KV head
        scores = np.einsum("nkgd,ktd->nkgt", qg, K) * scale  # (n, KVH, G, T)
        t = np.arange(T)
        visible = t[None, :] <= pos[:, None]  # (n, T) causal
        if window > 0:
            visible &= t[None, :] > pos[:, None] - window
        scores = np.where(visible[:, None, None, :], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)  # softmax over keys
        out[start:end] = np.einsum("nkgt,ktd->nkgd", p, V).reshape(end - start, H, hd)
        start = end
    return out.astype(np.float32, copy=False)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU's gating: silu(gate) * up, where silu(g) = g * sigmoid(g). (N, F), (N, F) -> (N, F)."""
    with np.errstate(over="ignore"):  # exp(-g) overflows to inf for very negative g, and silu(g) -> -0
        return (gate / (np.float32(1) + np.exp(-gate)) * up).astype(np.float32)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The residual connection: a + b."""
    return a + b
