"""The ops the forward pass is made of, one module per backend.

Every backend module defines every name in OP_NAMES with the same signature as ops/reference.py (the
NumPy specification), plus the array helpers in ARRAY_NAMES that move data to and from where the backend
keeps it. `model.py` only ever calls `ops.<name>(...)`, so it does not know which backend runs it.
"""

from __future__ import annotations

import importlib

from ..errors import TinyserveError

OP_NAMES = (
    "take_rows",  # x[idx]: the embedding lookup, and picking the rows that need logits
    "rmsnorm",
    "linear",  # x @ W.T (+ b); W float32 or a quantized tensor
    "rope",
    "kv_write",
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
