"""What every converter shares: write a Hugging Face model directory all at once, or not at all."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..checkpoint import give_default_mode
from ..errors import TinyserveError


@contextlib.contextmanager
def output_directory(out):
    """Yield a temporary directory beside `out`; on success it becomes `out`, on any error it is removed.

    So a failed conversion leaves nothing half-written behind: neither the temporary directory nor the
    parent folders this call created. An existing non-empty `out` is refused, and so is a place where no
    folder can be made (a parent that is a file, a read-only or special file system), in one line.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TinyserveError(f"output directory {out} already exists and is not empty")
    made = _make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        _remove_dirs(made)
        raise TinyserveError(f"cannot write {out}: cannot create a folder in {out.parent} ({e.strerror})") from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        give_default_mode(tmp, directory=True)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(made)
        raise


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parent folders of `out`, outermost first; return the ones created."""
    missing, p = [], out.parent
    while not p.exists():  # also False below a regular file (ENOTDIR)
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise TinyserveError(f"cannot write {out}: {p} is a file, not a directory")
    made = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as e:
            _remove_dirs(made)
            raise TinyserveError(f"cannot write {out}: cannot create {d} ({e.strerror})") from None
        made.append(d)
    return made


def _remove_dirs(made: list[Path]) -> None:
    """Remove the folders _make_parents created, innermost first (only if still empty)."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def require_finite(name: str, a, source) -> None:
    """Refuse a tensor holding NaN or infinity (it would only show up later, as NaN logits), naming it.

    Checked a few million values at a time, so a large memory-mapped tensor is never copied whole.
    """
    flat = np.asarray(a).reshape(-1)
    step = 1 << 22
    if not all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step)):
        raise TinyserveError(f"{source}: tensor {name} contains NaN or infinity (corrupt file?)")


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def permute_rotary_rows(w, n_heads: int):
    """Reorder the rows of q_proj / k_proj from Meta's interleaved RoPE layout to Hugging Face's half-split.

    Meta (llama2.c, GGUF) rotates dimensions (2i, 2i+1) of a head together; Hugging Face rotates i with
    i + hd/2. Moving row 2i of each head to position i and row 2i+1 to i + hd/2 makes the same model compute
    the same function with rotate_half. (The same permutation as transformers' convert_llama_weights_to_hf.)
    """
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)
