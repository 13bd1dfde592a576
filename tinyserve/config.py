"""ModelConfig: the model's shape and numerics, read from a Hugging Face config.json.

Field names are Hugging Face's (`hidden_size`, `num_key_value_heads`, ...), so a reader can hold config.json
beside this file. Two generations of config.json exist in the wild:

- checkpoints on the hub (transformers 4.x) carry `rope_theta` and, for Llama 3.1/3.2, `rope_scaling`
  ({"rope_type": "llama3", "factor": 32.0, ...});
- transformers 5 writes `rope_parameters` ({"rope_type": "default", "rope_theta": 10000.0, ...}).

Both are read into the same two fields here: `rope_theta` and `rope_scaling` (None when there is none).
Everything tinyserve cannot run (another architecture, another activation, a RoPE type it does not know)
is refused with a TinyserveError naming it, before any weight is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TinyserveError

# Architectures whose forward pass is exactly model.py's. Qwen2 differs only by biases on q/k/v.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F, the MLP's inner width
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # KVH (H for classic multi-head attention)
    head_dim: int  # hd (hidden_size // num_attention_heads unless config.json says otherwise)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2 always; Llama when attention_bias is true)
    o_bias: bool = False  # bias on o_proj (Llama with attention_bias true)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: each token sees at most this many positions
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict:
        """A config.json (current transformers 4.x form) that describes this model."""
        d = dict(self.raw)
        d.update(
            architectures=[self.architecture],
            model_type={v: k for k, v in MODEL_TYPES.items()}[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        d.pop("rope_parameters", None)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return d


def parse_json(data: bytes, what: str):
    """JSON from a file's bytes; anything unreadable is a TinyserveError "{what}: reason" (`what` names the
    file). json.loads raises ValueError for bad text, bad UTF-8 and numbers of thousands of digits, and
    RecursionError for absurd nesting."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        reason = "not UTF-8 text"
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as e:  # json.JSONDecodeError, or Python's limit on the digits of an integer
        reason = str(e).split(";")[0]
    raise TinyserveError(f"{what}: {reason}")


def read_json(path: Path, what: str = "not valid JSON"):
    """The JSON value of a file (parse_json), or a TinyserveError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TinyserveError(f"cannot read {path}: {e.strerror}") from None
    return parse_json(data, f"{path}: {what}")


def is_int(v) -> bool:
    """An integer from JSON (bool is an int in Python; not here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_positive_number(v) -> bool:
    """A finite number > 0 (not a bool, not a string; an int too large for a float is not finite)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:
        return False


def _positive_int(d: dict, key: str, where: str, default=None) -> int:
    v = d.get(key, default)
    if v is None:
        raise TinyserveError(f"{where}: '{key}' is missing")
    if not is_int(v) or v <= 0:
        raise TinyserveError(f"{where}: '{key}' must be a positive integer, got {v!r}")
    return v


def _bool(d: dict, key: str, where: str, default: bool = False) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise TinyserveError(f"{where}: '{key}' must be true or false, got {v!r}")
    return v


def token_ids(d: dict, key: str, where, vocab_size: int | None = None, many: bool = True) -> tuple[int, ...]:
    """d[key] as a tuple of token ids: null/absent (()), an id, or (many) a list of ids; each an integer in
    0..vocab_size-1 (when vocab_size is given)."""
    v = d.get(key)
    ids = () if v is None else tuple(v) if many and isinstance(v, list) else (v,)
    for i in ids:
        if not is_int(i) or i < 0 or (vocab_size is not None and i >= vocab_size):
            expect = "a token id" + (f" in 0..{vocab_size - 1}" if vocab_size else "")
            raise TinyserveError(f"{where}: '{key}' must be {expect}{' or a list of them' if many else ''}, got {v!r}")
    return ids


def _rope_settings(d: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config.json generation."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise TinyserveError(f"{where}: rope_parameters must be an object or null, got {params!r}")
    if isinstance(params, dict) and "rope_type" in params and "rope_theta" in params:  # transformers 5
        theta = params["rope_theta"]
        scaling = None if params.get("rope_type", "default") == "default" else dict(params)
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
        scaling = dict(scaling) if isinstance(scaling, dict) else scaling
    if not _is_positive_number(theta):
        raise TinyserveError(f"{where}: rope_theta must be a positive finite number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise TinyserveError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise TinyserveError(
            f"{where}: rope_scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    need = ["factor"] + (
        ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"] if rope_type == "llama3" else []
    )
    for key in need:
        v = scaling.get(key)
        if not _is_positive_number(v):
            raise TinyserveError(f"{where}: rope_scaling.{key} must be a positive finite number, got {v!r}")
    if rope_type == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        if not is_int(old_len):
            raise TinyserveError(
                f"{where}: rope_scaling.original_max_position_embeddings must be a positive integer, got {old_len!r}"
            )
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise TinyserveError(f"{where}: rope_scaling.high_freq_factor must exceed low_freq_factor")
    return float(theta), scaling


def config_from_dict(d: dict, where: str = "config.json") -> ModelConfig:
    """Validate a parsed config.json and build a ModelConfig (TinyserveError on anything wrong)."""
    if not isinstance(d, dict):
        raise TinyserveError(f"{where}: expected a JSON object")
    archs, model_type = d.get("architectures") or [], d.get("model_type")
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:
        arch = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        name = arch or d.get("model_type") or "(none given)"
        raise TinyserveError(
            f"{where}: architecture {name} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise TinyserveError(f"{where}: hidden_act {act!r} is not supported (only 'silu', i.e. SwiGLU)")

    D = _positive_int(d, "hidden_size", where)
    H = _positive_int(d, "num_attention_heads", where)
    KVH = _positive_int(d, "num_key_value_heads", where, default=H)
    if H % KVH:
        raise TinyserveError(f"{where}: num_attention_heads ({H}) is not a multiple of num_key_value_heads ({KVH})")
    hd = d.get("head_dim")
    if hd is None:
        if D % H:
            raise TinyserveError(f"{where}: hidden_size ({D}) is not divisible by num_attention_heads ({H})")
        hd = D // H
    hd = _positive_int({"head_dim": hd}, "head_dim", where)
    if hd % 2:
        raise TinyserveError(f"{where}: head_dim must be even for RoPE, got {hd}")

    eps = d.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (0 < eps < 1):
        raise TinyserveError(f"{where}: rms_norm_eps must be a small positive number, got {eps!r}")
    theta, scaling = _rope_settings(d, where)

    V, L = _positive_int(d, "vocab_size", where), _positive_int(d, "num_hidden_layers", where)
    window = None
    qwen_window = arch == "Qwen2ForCausalLM" and _bool(d, "use_sliding_window", where)
    if arch == "MistralForCausalLM" or qwen_window:
        window = d.get("sliding_window")
        if window is not None:
            window = _positive_int({"sliding_window": window}, "sliding_window", where)
    if qwen_window and d.get("max_window_layers") is not None:
        mwl = d["max_window_layers"]
        if not is_int(mwl) or mwl < 0:
            raise TinyserveError(f"{where}: 'max_window_layers' must be a non-negative integer, got {mwl!r}")
        # Qwen2 applies the window only from layer max_window_layers on; one window for all layers is not that.
        if 0 < mwl < L:
            raise TinyserveError(f"{where}: Qwen2 sliding window on only some layers is not supported")

    bos_ids = token_ids(d, "bos_token_id", where, V, many=False)
    bias = _bool(d, "attention_bias", where)
    cfg = ModelConfig(
        architecture=arch,
        vocab_size=V,
        hidden_size=D,
        intermediate_size=_positive_int(d, "intermediate_size", where),
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KVH,
        head_dim=hd,
        max_position_embeddings=_positive_int(d, "max_position_embeddings", where, default=2048),
        rms_norm_eps=float(eps),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool(d, "tie_word_embeddings", where),
        attention_bias=bias or arch == "Qwen2ForCausalLM",
        o_bias=bias and arch != "Qwen2ForCausalLM",
        mlp_bias=_bool(d, "mlp_bias", where),
        sliding_window=window,
        bos_token_id=bos_ids[0] if bos_ids else None,
        eos_token_ids=token_ids(d, "eos_token_id", where, V),
        torch_dtype=str(d.get("torch_dtype", d.get("dtype", "float32"))),
        raw=d,
    )
    # A size that would not fit in memory is refused before anything is allocated.
    n_params = parameter_count(cfg)
    if n_params * 1 > 2**40:  # even at one byte a parameter, more than a terabyte
        raise TinyserveError(f"{where}: the sizes describe {n_params:.3g} parameters, far more than fits in memory")
    return cfg


def parameter_count(cfg: ModelConfig) -> int:
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = D * q + 2 * D * kv + q * D + 3 * D * F + 2 * D
    return V * D * (1 if cfg.tie_word_embeddings else 2) + L * per_layer + D


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise TinyserveError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise TinyserveError(f"no config.json in {model_dir}")
    return config_from_dict(read_json(path), where=str(path))


def rope_inv_freq(cfg: ModelConfig):
    """The rotary frequencies (hd/2,) float32, with the config's scaling applied.

    Computed the way transformers computes them (float32 from an integer arange), so that positions far
    out agree with transformers to float32 rounding.
    """
    import numpy as np

    hd = cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":  # positions are divided by the factor
        return (inv_freq / np.float32(s["factor"])).astype(np.float32)
    # Llama 3: long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
