"""`tinyserve quantize`: write a quantized checkpoint that loads without re-quantizing.

    tinyserve quantize --model DIR --bits 4 --group-size 128 [--zero-point] --out DIR-int4

The output is an ordinary model directory (config.json, tokenizer files, generation_config.json) whose
model.safetensors holds the linear layers in tinyserve's quantized layout (docs/formats.md) and everything
else (embedding, norms, biases) in float32. The output head of a tied model is stored as a quantized
`lm_head.weight` beside the float embedding table. Loading it memory-maps the quantized tensors as they are,
so the logits are exactly those of quantizing while loading (`tinyserve.load(DIR, quant=...)`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import Checkpoint, save_safetensors
from ..config import load_config
from ..errors import TinyserveError
from ..model import LINEAR_NAMES, hf_name, linear_shapes
from ..quant import checkpoint_metadata, check_format, is_quantized, make_read_linear, quantized_tensors
from .common import output_directory, require_finite

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def quantize_checkpoint(model_dir, out, bits: int, group_size: int, zero_point: bool = False, progress=None) -> Path:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    check_format(bits, group_size, zero_point)
    ckpt = Checkpoint(model_dir)
    if any(is_quantized(ckpt, n) for n in ckpt.names()):
        raise TinyserveError(f"{model_dir} is already quantized")
    read_linear = make_read_linear(bits, group_size, zero_point)
    shapes = linear_shapes(cfg)
    linear_names = {hf_name(i, n): shapes[n] for i in range(cfg.num_hidden_layers) for n in LINEAR_NAMES}
    V, D = cfg.vocab_size, cfg.hidden_size
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    with output_directory(out) as tmp:  # an output that cannot be written is refused before the work
        tensors, qts = {}, []
        for name, shape in list(linear_names.items()) + [(head_src, (V, D))]:
            qt = read_linear(ckpt, name, shape)  # refuses NaN / infinity (quant.quantize)
            qts.append(qt)
            tensors.update(quantized_tensors("lm_head.weight" if name == head_src else name, qt))
            if progress:
                progress(len(qts), len(linear_names) + 1)
        for name in ckpt.names():  # everything else stays float32
            if name not in linear_names and name != "lm_head.weight":
                tensors[name] = ckpt.get(name)
                require_finite(name, tensors[name], model_dir)
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt", **checkpoint_metadata(qts)})
        for f in COPIED_FILES:
            if (model_dir / f).is_file():
                shutil.copy(model_dir / f, tmp / f)
    return Path(out)
