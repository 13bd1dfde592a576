"""What every converter shares: write a Hugging Face model directory all at once, or not at all."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from ..checkpoint import give_default_mode
from ..errors import TinyserveError


@contextlib.contextmanager
def output_directory(out):
    """Yield a temporary directory beside `out`; on success it becomes `out`, on any error it is removed.

    So a failed conversion leaves nothing half-written behind. An existing non-empty `out` is refused.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TinyserveError(f"output directory {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        give_default_mode(tmp, directory=True)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
