"""The KV cache: every layer's keys and values of every live sequence, so that each new token attends to
the past without recomputing it.

Layout, per layer:  k[layer], v[layer]: (S, KVH, Tmax, hd)
    S     slots: one per sequence being generated at the same time (a freed slot is reused)
    KVH   key/value heads (grouped-query attention stores only these, not H)
    Tmax  positions: the context length the cache was sized for
    hd    head dim
A head's keys for one sequence are contiguous (Tmax x hd), which is what attention reads.

Size: 2 (k and v) x L x S x KVH x Tmax x hd x 4 bytes (float32, the default), or x 2 bytes in float16
(kv_dtype="float16": each key and value rounded to the nearest float16 when written, attention still
computed in float32; half the bytes attention reads each step, docs/formats.md). Arrays are created with
zeros(), which the operating system backs lazily, so a slot costs memory only as far as it is filled.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig

# By default the context is the model's max_position_embeddings, capped so the cache stays comfortably in
# memory (Llama 3.1 declares 131072 positions: 16 GiB of cache for the 8B model, per sequence).
DEFAULT_CACHE_BUDGET_BYTES = 2 * 2**30


KV_DTYPES = {"float32": np.float32, "float16": np.float16}


def kv_dtype(name) -> np.dtype:
    """The cache's element type from its name ("float32", "float16"); ValueError for anything else."""
    if name not in KV_DTYPES:
        raise ValueError(f"unknown KV-cache dtype {name!r} (choose {', '.join(KV_DTYPES)})")
    return np.dtype(KV_DTYPES[name])


def cache_bytes(cfg: ModelConfig, slots: int, context: int, dtype="float32") -> int:
    return 2 * cfg.num_hidden_layers * slots * cfg.num_key_value_heads * context * cfg.head_dim * kv_dtype(dtype).itemsize


def default_context(cfg: ModelConfig, slots: int = 1, budget: int = DEFAULT_CACHE_BUDGET_BYTES,
                    dtype="float32") -> tuple[int, bool]:
    """(context length, capped?) : max_position_embeddings, or less so that the cache fits the budget."""
    per_position = cache_bytes(cfg, slots, 1, dtype)
    fits = max(16, budget // per_position)
    if cfg.max_position_embeddings <= fits:
        return cfg.max_position_embeddings, False
    return int(fits), True


class KVCache:
    def __init__(self, cfg: ModelConfig, slots: int, context: int, ops, dtype="float32"):
        self.slots = slots
        self.context = context
        self.dtype = kv_dtype(dtype)
        shape = (slots, cfg.num_key_value_heads, context, cfg.head_dim)
        self.k = [ops.zeros(shape, self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [ops.zeros(shape, self.dtype) for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * self.dtype.itemsize for a in self.k + self.v)
