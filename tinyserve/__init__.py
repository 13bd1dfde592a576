"""tinyserve: a small reference inference engine for Llama-family models.

    import tinyserve
    llm = tinyserve.load("DIR")                 # a Hugging Face model directory; default: weights/tinystories
    llm.generate("Once upon a time", max_new_tokens=50)[0].text

Start reading at model.py (the forward pass), then ops/reference.py (what every op computes).
"""

__version__ = "0.1.0"

from .errors import TinyserveError  # noqa: E402


def load(*args, **kwargs):
    """tinyserve.engine.load: load a model directory onto a backend (see engine.LLM)."""
    from .engine import load as _load

    return _load(*args, **kwargs)


__all__ = ["load", "TinyserveError", "__version__"]
