"""The ops the forward pass is made of, one module per backend.

Every backend module defines every name in OP_NAMES with the same signature as ops/reference.py (the
NumPy specification), plus the array helpers in ARRAY_NAMES that move data to and from where the backend
keeps it. `model.py` only ever calls `ops.<name>(...)`, so it does not know which backend runs it. A backend
may also define `upload_weight(a)`, which model.upload_weights then uses for the weights (arrays that live
as long as the model) instead of `upload` (the cpu backend places them in 2 MiB pages).
"""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import TinyserveError


class Stacked:
    """Linear weights that take the same input, stacked along their outputs (q, k and v; gate and up), so that
    one matrix product reads them all in one pass.

    weight: the stacked (sum(parts), in) matrix, float32 or quantized, in the backend's form; parts: the
    number of outputs of each. `ops.linear(x, stacked, bias)` returns a tuple with one C-contiguous
    (N, parts[i]) output per part (bias: the parts' biases stacked the same way, or None).
    model.stack_projections makes them when weights are loaded.
    """

    def __init__(self, weight, parts):
        if sum(parts) != weight.shape[0]:
            raise ValueError(f"Stacked: parts {parts} do not add up to the weight's {weight.shape[0]} rows")
        self.weight, self.parts = weight, tuple(int(p) for p in parts)

    @property
    def shape(self):
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)

    def __repr__(self) -> str:
        return f"Stacked({self.weight!r}, parts={self.parts})"


def split_columns(y, parts) -> tuple:
    """(N, sum(parts)) host array -> one C-contiguous (N, p) array per part (no copy when N == 1)."""
    out, at = [], 0
    for p in parts:
        out.append(np.ascontiguousarray(y[:, at:at + p]))
        at += p
    return tuple(out)


OP_NAMES = (
    "take_rows",  # x[idx]: the embedding lookup, and picking the rows that need logits
    "rmsnorm",
    "add_rmsnorm",  # (x + branch, rmsnorm(x + branch)): a block's residual add and the next block's norm
    "linear",  # x @ W.T (+ b); W float32, a quantized tensor, or Stacked (then one output per part)
    "rope",
    "kv_write",
    "rope_kv_write",  # rope(q), and k rotated and stored in the cache with v: rope twice and kv_write in one call
    "attention",
    "swiglu",
    "add",
)
ARRAY_NAMES = ("upload", "download", "zeros")

BACKENDS = {"numpy": "reference", "cpu": "cpu", "cuda": "cuda"}


def get_ops(backend: str):
    """The ops module of a backend: 'numpy' (the reference), 'cpu' (Numba) or 'cuda' (numba.cuda)."""
    if backend not in BACKENDS:
        raise TinyserveError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(f"{__name__}.{BACKENDS[backend]}")
