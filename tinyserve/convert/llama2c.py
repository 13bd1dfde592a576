"""Import a llama2.c checkpoint (+ its tokenizer) as a Hugging Face model directory.

    tinyserve convert llama2c stories260K.bin --tokenizer tok512.model --out DIR

llama2.c's checkpoint formats (from its export.py):

version 0 ("legacy"): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
  a negative vocab_size means the classifier is NOT shared with the embedding), then float32 arrays:
      token_embedding (V, D), rms_att (L, D), wq (L, D, D), wk (L, KVD, D), wv (L, KVD, D), wo (L, D, D),
      rms_ffn (L, D), w1 (L, F, D), w2 (L, D, F), w3 (L, F, D), rms_final (D),
      freq_cis_real (seq_len, hd/2), freq_cis_imag (seq_len, hd/2), [wcls (V, D) if not shared]
version 1: a 256-byte header (magic "ak42" as uint32 0x616b3432, int32 version 1, the 7 int32 params,
  uint8 shared_classifier, zero padding), then float32: the norms first (rms_att, rms_ffn, rms_final),
  then token_embedding, wq, wk, wv, wo, w1, w2, w3, [wcls].
Matrices are (out, in) row-major like torch.nn.Linear; w1 is gate_proj, w3 up_proj, w2 down_proj.
Q and K rows are in Meta's interleaved RoPE layout and are permuted to Hugging Face's half-split layout.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..checkpoint import save_safetensors
from ..errors import TinyserveError
from .common import output_directory, permute_rotary_rows, require_finite, write_json
from .sp_tokenizer import load_sentencepiece_vocab, write_tokenizer_files

MAGIC = 0x616B3432


def read_llama2c(path) -> tuple[dict, dict]:
    """(params, tensors in llama2.c names) from a version 0 or 1 checkpoint. Float32, memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise TinyserveError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise TinyserveError(f"{path}: too short to be a llama2.c checkpoint")
    magic, version = struct.unpack("<Ii", head[:8])
    if magic == MAGIC:
        if version != 1:
            raise TinyserveError(f"{path}: llama2.c checkpoint version {version} is not supported (only 0 and 1 (float32))")
        dim, hidden, L, H, KVH, V, seq_len = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        offset = 256
    else:
        version = 0
        dim, hidden, L, H, KVH, V, seq_len = struct.unpack("<7i", head[:28])
        shared = V > 0
        V = abs(V)
        offset = 28
    params = dict(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KVH, vocab_size=V, seq_len=seq_len)
    if min(dim, hidden, L, H, KVH, V, seq_len) <= 0 or dim % H or H % KVH or (dim // H) % 2 or dim > 1 << 16:
        raise TinyserveError(f"{path}: header has impossible sizes {params}: not a llama2.c checkpoint?")
    hd = dim // H
    kvd = KVH * hd
    layout = [("token_embedding", (V, dim))]
    norms = [("rms_att", (L, dim)), ("rms_ffn", (L, dim)), ("rms_final", (dim,))]
    mats = [
        ("wq", (L, dim, dim)), ("wk", (L, kvd, dim)), ("wv", (L, kvd, dim)), ("wo", (L, dim, dim)),
        ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)),
    ]
    if version == 0:
        layout += [norms[0]] + mats[:4] + [norms[1]] + mats[4:] + [norms[2]]
        layout += [("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2))]
    else:
        layout = norms + layout + mats
    if not shared:
        layout.append(("wcls", (V, dim)))
    n_floats = sum(math.prod(s) for _, s in layout)  # Python ints: an absurd header cannot wrap around
    if size < offset + 4 * n_floats:
        raise TinyserveError(
            f"{path}: truncated (the header describes {offset + 4 * n_floats} bytes of model, the file has {size})"
        )
    data = np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=(n_floats,))
    tensors, pos = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        tensors[name] = np.asarray(data[pos : pos + n]).reshape(shape)
        pos += n
        if not name.startswith("freq_cis"):  # version 0's RoPE tables are not used
            require_finite(name, tensors[name], path)
    params["shared_classifier"] = shared
    return params, tensors


def to_hf_tensors(params: dict, t: dict) -> dict:
    """llama2.c names and layout -> Hugging Face Llama names and layout."""
    H, KVH = params["n_heads"], params["n_kv_heads"]
    out = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(params["n_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = t["rms_att"][i]
        out[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        out[p + "self_attn.q_proj.weight"] = permute_rotary_rows(t["wq"][i], H)
        out[p + "self_attn.k_proj.weight"] = permute_rotary_rows(t["wk"][i], KVH)
        out[p + "self_attn.v_proj.weight"] = t["wv"][i]
        out[p + "self_attn.o_proj.weight"] = t["wo"][i]
        out[p + "mlp.gate_proj.weight"] = t["w1"][i]
        out[p + "mlp.down_proj.weight"] = t["w2"][i]
        out[p + "mlp.up_proj.weight"] = t["w3"][i]
    if not params["shared_classifier"]:
        out["lm_head.weight"] = t["wcls"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_config(params: dict, bos_id: int = 1, eos_id: int = 2) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": params["dim"],
        "intermediate_size": params["hidden_dim"],
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params["n_kv_heads"],
        "head_dim": params["dim"] // params["n_heads"],
        "vocab_size": params["vocab_size"],
        "max_position_embeddings": params["seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": params["shared_classifier"],
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def convert_llama2c(checkpoint, tokenizer, out) -> Path:
    """Write an HF-format directory (config, weights, tokenizer, generation config) at `out`."""
    params, tensors = read_llama2c(checkpoint)
    if tokenizer is None:
        raise TinyserveError("convert llama2c needs --tokenizer (a SentencePiece .model or llama2.c tokenizer.bin)")
    vocab = load_sentencepiece_vocab(tokenizer, vocab_size=params["vocab_size"])
    if len(vocab.pieces) != params["vocab_size"]:
        raise TinyserveError(
            f"{tokenizer}: has {len(vocab.pieces)} tokens, the checkpoint's vocab_size is {params['vocab_size']}"
        )
    hf = to_hf_tensors(params, tensors)
    with output_directory(out) as tmp:
        save_safetensors(hf, tmp / "model.safetensors", metadata={"format": "pt", "source": "llama2.c"})
        write_json(tmp / "config.json", hf_config(params, vocab.bos_id, vocab.eos_id))
        write_json(
            tmp / "generation_config.json",
            {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "do_sample": False},
        )
        write_tokenizer_files(vocab, tmp, model_max_length=params["seq_len"])
    return Path(out)
