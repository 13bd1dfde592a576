"""Import a llama.cpp GGUF file (Llama architecture) as a Hugging Face model directory.

    tinyserve convert gguf model.gguf --out DIR

A GGUF file is a header of typed key/value metadata (hyperparameters under ``llama.*``, the vocabulary
under ``tokenizer.ggml.*``), a table of tensors (name, dims, type, offset) and the tensors' bytes. The
`gguf` package (llama.cpp's own Python reader, an optional dependency: ``pip install 'tinyserve[gguf]'``)
parses it and hands us memory-mapped views of the tensors, so nothing is read twice.

What we accept, and how it maps onto a Hugging Face Llama directory:

- ``general.architecture`` must be "llama" (Llama 1/2 and compatible models; Llama 3 files are "llama"
  too, but use a byte-level BPE tokenizer ("gpt2") and often a ``rope_freqs`` tensor, both refused).
- Tensor names: ``token_embd`` -> ``model.embed_tokens``, ``output_norm`` -> ``model.norm``, ``output`` ->
  ``lm_head`` (absent: the embeddings are tied), and per layer N ``blk.N.attn_q/k/v/output`` ->
  ``self_attn.q/k/v/o_proj``, ``attn_norm`` -> ``input_layernorm``, ``ffn_gate/up/down`` ->
  ``mlp.gate/up/down_proj``, ``ffn_norm`` -> ``post_attention_layernorm``.
- GGUF lists dims innermost first: a matrix with dims [in, out] is a row-major (out, in) array, the same
  layout as a Hugging Face ``nn.Linear`` weight; no transposes are needed.
- llama.cpp's converter stores attn_q / attn_k rows in Meta's interleaved RoPE layout; we permute them back
  to Hugging Face's half-split layout (``permute_rotary_rows``, per head). For a quantized tensor we
  permute whole rows (data and scales): each row is quantized on its own, so that is exact.
- Tensor types: F32, F16 and BF16 become float32 (exactly); Q8_0 and Q4_0 become tinyserve's int8 / int4
  formats with group size 32 (``quant.from_q8_0`` / ``from_q4_0``): the same integers and the same scales,
  never re-quantized, so the imported model computes with exactly the numbers llama.cpp does. A quantized
  ``token_embd`` is dequantized for the embedding lookup; if the model is tied, the quantized copy is also
  stored as ``lm_head.weight`` so the output head stays quantized. Any other type (Q4_K, Q5_0, ...) is
  refused, naming the type.
- config.json from ``llama.embedding_length``, ``feed_forward_length``, ``block_count``,
  ``attention.head_count(_kv)``, ``attention.key_length`` (head_dim), ``context_length``,
  ``attention.layer_norm_rms_epsilon``, ``rope.freq_base`` (default 10000), ``rope.dimension_count`` (must
  be the head dim: rotary on part of a head is not a Llama), ``rope.scaling.type`` none / linear; vocab size
  from ``token_embd``.
- The vocabulary: ``tokenizer.ggml.model`` "llama" is a SentencePiece BPE vocabulary (tokens, scores,
  token_type, special ids, ``add_bos_token``, ``add_space_prefix``) -> ``SPVocab`` -> tokenizer.json. We
  tokenize as llama.cpp does: runs of spaces are kept (``remove_extra_whitespaces`` off unless the file
  says otherwise). ``add_eos_token`` is not carried over. ``tokenizer.chat_template`` goes into
  tokenizer_config.json.

Everything the file cannot give us correctly is a TinyserveError with one line; the output directory is
written all at once or not at all (``output_directory``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import save_safetensors
from ..errors import TinyserveError
from ..quant import QuantizedTensor, checkpoint_metadata, dequantize, from_q4_0, from_q8_0, quantized_tensors
from .common import output_directory, permute_rotary_rows, require_finite, write_json
from .sp_tokenizer import PieceType, SPVocab, write_tokenizer_files

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_NO_ID = 0xFFFFFFFF  # llama.cpp writes uint32 -1 for "no such token"


def _load_gguf_package():
    try:
        import gguf
    except ImportError:
        raise TinyserveError("convert gguf needs the gguf package (pip install 'tinyserve[gguf]')") from None
    return gguf


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ------------------------------------------------------------------------------------------ reading
@dataclass
class GGUFModel:
    """What convert_gguf needs from a GGUF file, checked: hyperparameters, tensors by GGUF name, vocabulary."""

    path: Path
    params: dict  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, ...
    tensors: dict  # GGUF name -> gguf.ReaderTensor (memory-mapped)
    vocab: SPVocab
    add_bos: bool
    chat_template: str | None = None


class _Meta:
    """Typed access to a GGUFReader's key/value fields, with one-line errors naming the file and key."""

    def __init__(self, reader, path: Path, gguf):
        self.reader, self.path, self.T = reader, path, gguf.GGUFValueType

    def __contains__(self, key) -> bool:
        return key in self.reader.fields

    def _value(self, key):
        f = self.reader.fields[key]
        try:
            return f.types, f.contents()
        except Exception as e:  # a malformed field (e.g. a string that is not UTF-8)
            raise TinyserveError(f"{self.path}: cannot read metadata {key} ({_one_line(e)}); corrupt file?") from None

    def _bad(self, key, want, got):
        shown = repr(got) if not isinstance(got, list) else f"an array of {len(got)}"
        return TinyserveError(f"{self.path}: metadata {key} must be {want}, got {shown}")

    def _get(self, key, default, ok, want: str, convert):
        """convert(value) of key when its GGUF type passes ok, else a one-line error naming `want`; when the
        key is missing: default, or an error if there is none."""
        if key not in self:
            if default is ...:
                raise TinyserveError(f"{self.path}: GGUF metadata has no {key}")
            return default
        types, v = self._value(key)
        if not ok(types[0]):
            raise self._bad(key, want, v)
        return convert(v)

    def int(self, key, default=...):
        T = self.T
        return self._get(key, default, lambda t: t not in (T.ARRAY, T.STRING, T.BOOL, T.FLOAT32, T.FLOAT64),
                         "an integer", int)

    def float(self, key, default=...):
        T = self.T
        x = self._get(key, default, lambda t: t not in (T.ARRAY, T.STRING, T.BOOL), "a number", float)
        if not math.isfinite(x):  # no Llama hyperparameter is NaN or infinite
            raise self._bad(key, "a finite number", x)
        return x

    def str(self, key, default=...):
        return self._get(key, default, lambda t: t == self.T.STRING, "a string", lambda v: v)

    def bool(self, key, default):
        return self._get(key, default, lambda t: t == self.T.BOOL, "true or false", bool)

    def array(self, key, kind, default=...):
        return self._get(key, default, lambda t: t == self.T.ARRAY, f"an array of {kind}", lambda v: v)


def _short_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def read_gguf(path) -> GGUFModel:
    """Open a GGUF file and check everything convert_gguf relies on. Tensors stay memory-mapped."""
    gguf = _load_gguf_package()
    path = Path(path)
    if not path.is_file():
        raise TinyserveError(f"GGUF file not found: {path}" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise TinyserveError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise TinyserveError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except MemoryError:
        raise TinyserveError(f"{path}: corrupt GGUF file (its header asks for more memory than there is)") from None
    except Exception as e:  # GGUFReader raises ValueError, IndexError, KeyError, ... on broken files
        raise TinyserveError(f"{path}: truncated or corrupt GGUF file ({_one_line(e)})") from None
    if reader.byte_order != "I":
        raise TinyserveError(f"{path}: a big-endian GGUF file; only little-endian files are supported")
    meta = _Meta(reader, path, gguf)

    arch = meta.str("general.architecture")
    if arch != "llama":
        raise TinyserveError(
            f"{path}: architecture {arch!r} is not supported; "
            "convert gguf reads Llama models (general.architecture 'llama')"
        )
    tensors = {t.name: t for t in reader.tensors}
    params = _llama_params(meta, tensors, path)
    _check_tensors(tensors, params, path)
    vocab, add_bos = _read_vocab(meta, params["vocab_size"], path)
    chat_template = meta.str("tokenizer.chat_template", None)
    return GGUFModel(path, params, tensors, vocab, add_bos, chat_template)


def _llama_params(meta: _Meta, tensors: dict, path: Path) -> dict:
    """The hyperparameters, from the llama.* keys, checked for consistency."""
    if meta.int("llama.expert_count", 0) > 0:
        raise TinyserveError(f"{path}: a mixture-of-experts model (llama.expert_count > 0) is not supported")
    if "rope_freqs.weight" in tensors:
        raise TinyserveError(
            f"{path}: has a rope_freqs tensor (Llama 3.1-style RoPE frequency scaling), "
            "which convert gguf does not support"
        )
    D = meta.int("llama.embedding_length")
    F = meta.int("llama.feed_forward_length")
    L = meta.int("llama.block_count")
    H = meta.int("llama.attention.head_count")
    KVH = meta.int("llama.attention.head_count_kv", H)
    if min(D, F, L, H, KVH) <= 0:
        raise TinyserveError(f"{path}: impossible sizes (embedding {D}, ffn {F}, layers {L}, heads {H}/{KVH})")
    if H % KVH:
        raise TinyserveError(f"{path}: {H} attention heads do not divide into {KVH} key/value heads")
    if "llama.attention.key_length" not in meta and D % H:
        raise TinyserveError(f"{path}: embedding length {D} is not a multiple of {H} heads")
    hd = meta.int("llama.attention.key_length", D // H)
    hd_v = meta.int("llama.attention.value_length", hd)
    rot = meta.int("llama.rope.dimension_count", hd)
    if hd_v != hd:
        raise TinyserveError(f"{path}: key length {hd} and value length {hd_v} differ; not supported")
    if rot != hd:
        raise TinyserveError(
            f"{path}: rope.dimension_count {rot} is not the head dim {hd} (partial rotary embeddings are not supported)"
        )
    if hd <= 0 or hd % 2:
        raise TinyserveError(f"{path}: head dim {hd} must be even")

    scaling = None
    kind = meta.str("llama.rope.scaling.type", "none")
    factor = meta.float("llama.rope.scaling.factor", meta.float("llama.rope.scale_linear", 1.0))
    if kind not in ("none", "linear"):
        raise TinyserveError(f"{path}: RoPE scaling type {kind!r} is not supported (only none and linear)")
    if kind == "linear" or ("llama.rope.scaling.type" not in meta and factor not in (0.0, 1.0)):
        if not factor > 0:
            raise TinyserveError(f"{path}: linear RoPE scaling needs a positive factor, got {factor}")
        if factor != 1.0:
            scaling = {"rope_type": "linear", "factor": _short_float(factor)}

    if "token_embd.weight" not in tensors:
        raise TinyserveError(f"{path}: tensor token_embd.weight is missing")
    emb_dims = [int(d) for d in tensors["token_embd.weight"].shape]
    if len(emb_dims) != 2 or emb_dims[0] != D:
        raise TinyserveError(
            f"{path}: token_embd.weight has dims {emb_dims}; the metadata says [{D}, vocab size]"
        )
    V = emb_dims[1]
    declared_v = meta.int("llama.vocab_size", V)
    if declared_v != V:
        raise TinyserveError(f"{path}: llama.vocab_size {declared_v} but token_embd.weight holds {V} rows")
    eps = meta.float("llama.attention.layer_norm_rms_epsilon")
    if not eps > 0:
        raise TinyserveError(f"{path}: llama.attention.layer_norm_rms_epsilon must be positive, got {eps}")
    theta = meta.float("llama.rope.freq_base", 10000.0)
    if not theta > 0:
        raise TinyserveError(f"{path}: llama.rope.freq_base must be positive, got {theta}")
    ctx = meta.int("llama.context_length")
    if ctx <= 0:
        raise TinyserveError(f"{path}: llama.context_length must be positive, got {ctx}")
    return dict(
        dim=D, hidden_dim=F, n_layers=L, n_heads=H, n_kv_heads=KVH, head_dim=hd, vocab_size=V, context_length=ctx,
        rms_norm_eps=_short_float(eps), rope_theta=_short_float(theta), rope_scaling=scaling,
        tied="output.weight" not in tensors,
    )


def expected_shapes(params: dict) -> dict:
    """GGUF tensor name -> logical (numpy, outermost first) shape, for every tensor a Llama model has."""
    D, F, V, hd = params["dim"], params["hidden_dim"], params["vocab_size"], params["head_dim"]
    qd, kvd = params["n_heads"] * hd, params["n_kv_heads"] * hd
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,)}
    if not params["tied"]:
        shapes["output.weight"] = (V, D)
    per_layer = {
        "attn_norm": (D,), "attn_q": (qd, D), "attn_k": (kvd, D), "attn_v": (kvd, D), "attn_output": (D, qd),
        "ffn_norm": (D,), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F),
    }
    for i in range(params["n_layers"]):
        for part, shape in per_layer.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
    return shapes


def _check_tensors(tensors: dict, params: dict, path: Path) -> None:
    """Every expected tensor present, nothing unknown, shapes as the metadata says, types we can read."""
    shapes = expected_shapes(params)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise TinyserveError(f"{path}: tensor {', '.join(missing[:3])}{more} missing")
    for name, t in tensors.items():
        if name not in shapes:
            m = _LAYER_TENSOR.fullmatch(name)
            if m and m.group(2) == "rot_embd":  # a cached RoPE table some old files carry; llama.cpp ignores it
                continue
            raise TinyserveError(
                f"{path}: unexpected tensor {name} (not part of a {params['n_layers']}-layer Llama model)"
            )
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise TinyserveError(
                f"{path}: tensor {name} has type {kind}; convert gguf supports {', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != shapes[name]:
            raise TinyserveError(
                f"{path}: tensor {name} has shape {shape}; the metadata says it should be {shapes[name]}"
            )
        if kind in QUANT_TYPES and len(shape) != 2:
            raise TinyserveError(f"{path}: tensor {name} is {kind}; 1-D tensors (norms) must be F32, F16 or BF16")


def _read_vocab(meta: _Meta, n_vocab: int, path: Path) -> tuple[SPVocab, bool]:
    """The tokenizer.ggml.* keys -> SPVocab, and whether BOS is added to every text."""
    if "tokenizer.ggml.model" not in meta:
        raise TinyserveError(f"{path}: has no vocabulary (no tokenizer.ggml.model)")
    model = meta.str("tokenizer.ggml.model")
    if model != "llama":
        what = {"gpt2": " (byte-level BPE, as in Llama 3)", "no_vocab": " (no vocabulary)", "none": " (no vocabulary)"}
        raise TinyserveError(
            f"{path}: tokenizer model {model!r}{what.get(model, '')} is not supported; "
            "convert gguf reads SentencePiece vocabularies (tokenizer.ggml.model 'llama')"
        )
    tokens = meta.array("tokenizer.ggml.tokens", "strings")
    if not all(isinstance(t, str) for t in tokens):
        raise TinyserveError(f"{path}: tokenizer.ggml.tokens must be an array of strings")
    n = len(tokens)
    scores = meta.array("tokenizer.ggml.scores", "numbers", [0.0] * n)
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise TinyserveError(f"{path}: tokenizer.ggml.scores must be an array of numbers")
    types = meta.array("tokenizer.ggml.token_type", "integers", [int(PieceType.NORMAL)] * n)
    if n != n_vocab:
        raise TinyserveError(f"{path}: the vocabulary has {n} tokens but token_embd.weight has {n_vocab} rows")
    if len(scores) != n or len(types) != n:
        raise TinyserveError(f"{path}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    bad = next((i for i, t in enumerate(types) if t not in PieceType._value2member_map_), None)
    if bad is not None:
        raise TinyserveError(f"{path}: token {bad} has unknown token type {types[bad]!r} (expected 1..6)")

    def special(key, default):
        v = meta.int(f"tokenizer.ggml.{key}_token_id", default)
        if v in (-1, _NO_ID):
            return -1
        if not 0 <= v < n:
            raise TinyserveError(f"{path}: tokenizer.ggml.{key}_token_id {v} is outside the vocabulary (0..{n - 1})")
        return v

    vocab = SPVocab(
        pieces=list(tokens),
        scores=[float(s) for s in scores],
        types=[int(t) for t in types],
        bos_id=special("bos", 1),  # llama.cpp's defaults for a SentencePiece vocabulary
        eos_id=special("eos", 2),
        unk_id=special("unknown", 0),
        pad_id=special("padding", -1),
        add_dummy_prefix=meta.bool("tokenizer.ggml.add_space_prefix", True),
        remove_extra_whitespaces=meta.bool("tokenizer.ggml.remove_extra_whitespaces", False),
        escape_whitespaces=True,
        byte_fallback=int(PieceType.BYTE) in types,
        source=str(path),
    )
    add_bos = meta.bool("tokenizer.ggml.add_bos_token", True) and vocab.bos_id >= 0
    return vocab, add_bos


# ------------------------------------------------------------------------------------------ converting
def _tensor(t, shape: tuple):
    """One GGUF tensor -> float32 array or QuantizedTensor of the given logical shape (types checked before)."""
    kind = t.tensor_type.name
    if kind == "F32":
        return np.asarray(t.data).reshape(shape)  # a memory-mapped view
    if kind == "F16":
        return t.data.astype(np.float32).reshape(shape)
    if kind == "BF16":  # the reader gives raw bytes; bfloat16 is the high half of a float32
        bits = np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if kind == "Q8_0":
        return from_q8_0(t.data, shape)
    if kind == "Q4_0":
        return from_q4_0(t.data, shape)
    raise AssertionError(kind)  # _check_tensors refused it


def permute_rows(w, n_heads: int):
    """permute_rotary_rows for a float array or a quantized tensor (whole rows: data, scales, zero points)."""
    if not isinstance(w, QuantizedTensor):
        return permute_rotary_rows(w, n_heads)
    perm = permute_rotary_rows(np.arange(w.shape[0])[:, None], n_heads)[:, 0]  # new row r = old row perm[r]
    zeros = None if w.zeros is None else np.ascontiguousarray(w.zeros[perm])
    return QuantizedTensor(
        w.bits, w.group_size, w.shape, np.ascontiguousarray(w.data[perm]), np.ascontiguousarray(w.scales[perm]), zeros
    )


def to_hf_tensors(model: GGUFModel) -> dict:
    """GGUF names and layout -> Hugging Face names and layout: float32 arrays and QuantizedTensors."""
    p = model.params
    shapes = expected_shapes(p)
    out = {}
    for name, shape in shapes.items():
        w = _tensor(model.tensors[name], shape)
        require_finite(name, w.scales if isinstance(w, QuantizedTensor) else w, model.path)
        m = _LAYER_TENSOR.fullmatch(name)
        if m:
            part = m.group(2)
            if part == "attn_q":
                w = permute_rows(w, p["n_heads"])
            elif part == "attn_k":
                w = permute_rows(w, p["n_kv_heads"])
            hf = f"model.layers.{m.group(1)}.{LAYER_NAMES[part]}.weight"
        else:
            hf = GLOBAL_NAMES[name]
        out[hf] = w
    embed = out["model.embed_tokens.weight"]
    if isinstance(embed, QuantizedTensor):  # the lookup table is float; a tied head keeps the quantized copy
        out["model.embed_tokens.weight"] = dequantize(embed)
        if p["tied"]:
            out["lm_head.weight"] = embed
    return out


def hf_config(model: GGUFModel) -> dict:
    p, v = model.params, model.vocab
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": p["dim"],
        "intermediate_size": p["hidden_dim"],
        "num_hidden_layers": p["n_layers"],
        "num_attention_heads": p["n_heads"],
        "num_key_value_heads": p["n_kv_heads"],
        "head_dim": p["head_dim"],
        "vocab_size": p["vocab_size"],
        "max_position_embeddings": p["context_length"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": p["rope_scaling"],
        "tie_word_embeddings": p["tied"],
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": v.bos_id if v.bos_id >= 0 else None,
        "eos_token_id": v.eos_id if v.eos_id >= 0 else None,
        "torch_dtype": "float32",
    }


def _finish_tokenizer_config(model: GGUFModel, out_dir: Path) -> None:
    """What write_tokenizer_files does not know: no BOS for this model, and the chat template."""
    if model.add_bos and not model.chat_template:
        return
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    if not model.add_bos:  # the post-processor would add BOS to every text
        tok_path = out_dir / "tokenizer.json"
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        tok["post_processor"] = None
        tok_path.write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tc["add_bos_token"] = False
    if model.chat_template:
        tc["chat_template"] = model.chat_template
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(path, out) -> Path:
    """Write an HF-format directory (config, weights, tokenizer, generation config) at `out`.

    Float tensors are written as float32; Q8_0 / Q4_0 tensors in tinyserve's quantized layout (int8 / int4,
    group 32), with the checkpoint marked quantized in its metadata.
    """
    model = read_gguf(path)
    hf = to_hf_tensors(model)
    arrays, quantized = {}, []
    for name, w in hf.items():
        if isinstance(w, QuantizedTensor):
            arrays.update(quantized_tensors(name, w))
            quantized.append(w)
        else:
            arrays[name] = np.ascontiguousarray(w, dtype=np.float32)
    metadata = {"format": "pt", "source": "gguf"}
    if quantized:
        metadata.update(checkpoint_metadata(quantized))
    vocab = model.vocab
    with output_directory(out) as tmp:
        save_safetensors(arrays, tmp / "model.safetensors", metadata=metadata)
        write_json(tmp / "config.json", hf_config(model))
        gen = {"do_sample": False}
        if vocab.bos_id >= 0:
            gen["bos_token_id"] = vocab.bos_id
        if vocab.eos_id >= 0:
            gen["eos_token_id"] = vocab.eos_id
        write_json(tmp / "generation_config.json", gen)
        write_tokenizer_files(vocab, tmp, model_max_length=model.params["context_length"])
        _finish_tokenizer_config(model, tmp)
    return Path(out)
