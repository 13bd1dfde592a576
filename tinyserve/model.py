"""The transformer forward pass of Llama-family models, as a recipe.

Read `forward()` top to bottom: it is the whole model. It calls `ops.<name>` for every piece of math and
never knows which backend runs it (ops/reference.py is the NumPy spec of each op; ops/cpu.py and
ops/cuda.py are the fast versions). Sampling is not here: forward() returns logits, the generator
(generate.py) picks tokens.

Shape legend
    N    tokens in this step, from any number of sequences (a whole prompt, or one token per sequence)
    D    hidden size                      (config.hidden_size)
    H    query heads                      (config.num_attention_heads)
    KVH  key/value heads                  (config.num_key_value_heads; H // KVH query heads share one)
    hd   head dim                         (config.head_dim)
    F    MLP width                        (config.intermediate_size)
    V    vocabulary size                  (config.vocab_size)
    L    layers                           (config.num_hidden_layers)
    R    rows whose logits are wanted     (usually the last token of each sequence)

One step of many sequences is one flat batch of N tokens: token n carries its sequence's cache slot
`slots[n]` and its position `positions[n]`. Prefill (a prompt of T tokens: N = T) and decode (one token
per running sequence) are the same call, so every matrix product reads each weight once per step.

Loaded weights hold each layer's q, k and v projections stacked into one matrix, and gate and up into
another (stack_projections): one matrix product per group, one output per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checkpoint import Checkpoint
from .config import ModelConfig, rope_inv_freq
from .ops import Stacked
from .quant import QuantizedTensor


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray  # (D,)
    q_proj: object  # (H*hd, D)  float32 array or quantized tensor
    k_proj: object  # (KVH*hd, D)
    v_proj: object  # (KVH*hd, D)
    o_proj: object  # (D, H*hd)
    post_attention_layernorm: np.ndarray  # (D,)
    gate_proj: object  # (F, D)
    up_proj: object  # (F, D)
    down_proj: object  # (D, F)
    q_bias: np.ndarray | None = None  # (H*hd,)  Qwen2, or Llama with attention_bias
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    gate_bias: np.ndarray | None = None  # Llama with mlp_bias
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None
    # q, k and v stacked into one matrix, and gate and up (stack_projections, when a model is loaded): the
    # forward pass reads each group in one pass. The separate fields are then None.
    qkv_proj: object = None  # ops.Stacked of (H*hd + 2*KVH*hd, D)
    qkv_bias: np.ndarray | None = None
    gate_up_proj: object = None  # ops.Stacked of (2*F, D)
    gate_up_bias: np.ndarray | None = None


@dataclass
class Weights:
    embed_tokens: np.ndarray  # (V, D)
    layers: list[LayerWeights]
    norm: np.ndarray  # (D,)
    lm_head: object  # (V, D); the embedding table itself when the embeddings are tied
    inv_freq: np.ndarray  # (hd/2,) RoPE frequencies, scaling applied
    extra: dict = field(default_factory=dict)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        "q_proj": (H * hd, D),
        "k_proj": (KVH * hd, D),
        "v_proj": (KVH * hd, D),
        "o_proj": (D, H * hd),
        "gate_proj": (F, D),
        "up_proj": (F, D),
        "down_proj": (D, F),
    }


def hf_name(layer: int, name: str) -> str:
    """The Hugging Face tensor name of a layer's weight."""
    part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{part}.{name}.weight"


def load_weights(ckpt: Checkpoint, cfg: ModelConfig, read_linear=None, progress=None) -> Weights:
    """Read every tensor the config asks for, checking each shape against the config (and that weights,
    norms and biases are float tensors).

    read_linear(ckpt, name, shape) -> float32 array or quantized tensor decides how the big matrices are
    held (float, quantized while loading, or read already quantized); by default they are float32.
    """
    if read_linear is None:

        def read_linear(ckpt, name, shape):
            return ckpt.get_float(name, shape)

    D, V = cfg.hidden_size, cfg.vocab_size
    shapes = linear_shapes(cfg)
    layers = []
    for i in range(cfg.num_hidden_layers):
        lin = {n: read_linear(ckpt, hf_name(i, n), shapes[n]) for n in LINEAR_NAMES}
        biases = {}
        if cfg.attention_bias:
            for n in ("q", "k", "v"):
                biases[f"{n}_bias"] = ckpt.get_float(hf_name(i, f"{n}_proj")[: -len("weight")] + "bias", (shapes[f"{n}_proj"][0],))
        if cfg.o_bias:
            biases["o_bias"] = ckpt.get_float(hf_name(i, "o_proj")[: -len("weight")] + "bias", (D,))
        if cfg.mlp_bias:
            for n in ("gate", "up", "down"):
                biases[f"{n}_bias"] = ckpt.get_float(hf_name(i, f"{n}_proj")[: -len("weight")] + "bias", (shapes[f"{n}_proj"][0],))
        layers.append(stack_projections(  # stacked now, so the separate matrices are never all held at once
            LayerWeights(
                input_layernorm=ckpt.get_float(f"model.layers.{i}.input_layernorm.weight", (D,)),
                post_attention_layernorm=ckpt.get_float(f"model.layers.{i}.post_attention_layernorm.weight", (D,)),
                **lin,
                **biases,
            )
        ))
        if progress is not None:
            progress(i + 1, cfg.num_hidden_layers)
    embed = ckpt.get_float("model.embed_tokens.weight", (V, D))
    if cfg.tie_word_embeddings:  # the output head is the embedding table (or a quantized copy of it)
        # A quantized checkpoint of a tied model stores the quantized copy as lm_head.weight.
        head = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"
        lm_head = read_linear(ckpt, head, (V, D))
        lm_head = embed if isinstance(lm_head, np.ndarray) else lm_head
    else:
        lm_head = read_linear(ckpt, "lm_head.weight", (V, D))
    return Weights(
        embed_tokens=embed,
        layers=layers,
        norm=ckpt.get_float("model.norm.weight", (D,)),
        lm_head=lm_head,
        inv_freq=rope_inv_freq(cfg),
    )


# The projections that read the same input, stacked when weights are loaded: group -> its projections
# (LayerWeights has "<group>_proj" and "<group>_bias" for the stacked form, "<name>_proj" for each part).
STACKS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _stack(mats: list):
    """The matrices one under the other (all float32 arrays, or all quantized tensors of one format), or None
    when their formats differ."""
    if all(isinstance(m, np.ndarray) for m in mats):
        return np.concatenate(mats)
    if all(isinstance(m, QuantizedTensor) for m in mats):
        first = mats[0]
        if any((m.bits, m.group_size, m.shape[1], m.zeros is None) !=
               (first.bits, first.group_size, first.shape[1], first.zeros is None) for m in mats):
            return None
        zeros = None if first.zeros is None else np.concatenate([m.zeros for m in mats])
        return QuantizedTensor(first.bits, first.group_size, (sum(m.shape[0] for m in mats), first.shape[1]),
                               np.concatenate([m.data for m in mats]), np.concatenate([m.scales for m in mats]),
                               zeros)
    return None


def stack_projections(layer: LayerWeights) -> LayerWeights:
    """The layer with q, k and v stacked into one matrix (qkv_proj) and gate and up into another
    (gate_up_proj), so that each group is one matrix product: fewer, larger calls, each output the same dot
    product (bit for bit on the cpu backend; NumPy's BLAS may round a differently shaped product
    differently). Weights of different formats (possible in a GGUF file) stay apart."""
    fields = dict(vars(layer))
    for stacked, names in STACKS.items():
        mats = [fields[f"{n}_proj"] for n in names]
        weight = _stack(mats)
        if weight is None:
            continue
        biases = [fields[f"{n}_bias"] for n in names]
        if any(b is not None for b in biases):
            biases = [np.zeros(m.shape[0], np.float32) if b is None else b for m, b in zip(mats, biases)]
            fields[f"{stacked}_bias"] = np.concatenate(biases).astype(np.float32)
        fields[f"{stacked}_proj"] = Stacked(weight, [m.shape[0] for m in mats])
        for n in names:
            fields[f"{n}_proj"] = fields[f"{n}_bias"] = None
    return LayerWeights(**fields)


def layer_matrix(layer: LayerWeights, name: str):
    """A layer's linear weight by its checkpoint name ("q_proj", ...), held apart or stacked: for a stacked one,
    its rows of the stacked matrix (a view) when that is a host array or quantized tensor; None when it is in
    a backend's own device form."""
    m = getattr(layer, name)
    part = name[: -len("_proj")]
    group = next((g for g, names in STACKS.items() if part in names), None)
    if m is not None or group is None:
        return m
    stacked = getattr(layer, f"{group}_proj")
    i = STACKS[group].index(part)
    a = sum(stacked.parts[:i])
    b = a + stacked.parts[i]
    w = stacked.weight
    if isinstance(w, np.ndarray):
        return w[a:b]
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.bits, w.group_size, (b - a, w.shape[1]), w.data[a:b], w.scales[a:b],
                               None if w.zeros is None else w.zeros[a:b])
    return None


def upload_weights(w: Weights, ops, consume: bool = False) -> Weights:
    """The same weights, placed where the backend computes (its upload_weight if it has one: the cpu backend's
    copy in 2 MiB pages; else ops.upload), with each layer's projections of one input stacked. consume: take
    each layer out of w once it is placed, so that its host arrays can go before the next one is copied (the
    loader's own weights: the peak is then the model and one layer, not the model twice)."""

    def up(a, place=getattr(ops, "upload_weight", None) or ops.upload):
        return None if a is None else place(a)

    layers = []
    for i, layer in enumerate(w.layers):
        if consume:
            w.layers[i] = None
        layers.append(LayerWeights(**{k: up(v) for k, v in vars(stack_projections(layer)).items()}))
    layer = None  # the last host layer too can go before the embeddings are placed
    lm_head = up(w.lm_head) if w.lm_head is not w.embed_tokens else None
    embed = up(w.embed_tokens)
    return Weights(
        embed_tokens=embed,
        layers=layers,
        norm=up(w.norm),
        lm_head=embed if lm_head is None else lm_head,
        inv_freq=up(w.inv_freq),
        extra=w.extra,
    )


def project(ops, h, layer: LayerWeights, group: str) -> tuple:
    """The projections of h by a group of weights (STACKS): one product over the stacked matrix when the
    layer has it (stack_projections), else one product per weight."""
    weight = getattr(layer, f"{group}_proj")
    if weight is not None:
        return ops.linear(h, weight, getattr(layer, f"{group}_bias"))
    return tuple(ops.linear(h, getattr(layer, f"{n}_proj"), getattr(layer, f"{n}_bias")) for n in STACKS[group])


def forward(w: Weights, cfg: ModelConfig, ops, token_ids, positions, slots, cache, rows=None, tap=None):
    """Run the model over one step's tokens and return logits (R, V) for the chosen rows.

    token_ids, positions, slots: (N,) int arrays (on the backend's device). The keys and values of these
    tokens are written into `cache` at (slot, position); each token attends to its own sequence's cache up
    to its own position. rows: (R,) indices of the tokens whose logits are wanted (None: all N).
    tap(name, layer, array), if given, sees each stage (used by validation tools): "embed"; per layer
    "attn_out" (attention branch output), "attn" (hidden state after its residual add), "mlp_out", "mlp";
    then "norm" and "logits".
    """
    N = token_ids.shape[0]
    H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, window = cfg.rms_norm_eps, cfg.sliding_window or 0

    x = ops.take_rows(w.embed_tokens, token_ids)  # (N, D) the token embeddings: the residual stream
    if tap:
        tap("embed", -1, x)
    L = len(w.layers)
    h = ops.rmsnorm(x, w.layers[0].input_layernorm, eps)  # (N, D) the first block's input, normalized
    for i, layer in enumerate(w.layers):
        # --- attention block: x + o_proj(attention(rope(q), rope(k), v)), from h = rmsnorm(x)
        q, k, v = project(ops, h, layer, "qkv")  # (N, D) -> (N, H*hd), (N, KVH*hd) x 2
        q = q.reshape(N, H, hd)  # (N, H*hd) -> (N, H, hd): one row of hd values per head
        k = k.reshape(N, KVH, hd)
        v = v.reshape(N, KVH, hd)
        # q and k rotated by position (RoPE), and this step's keys and values stored in the cache: one op that
        # is q = ops.rope(q, ...); k = ops.rope(k, ...); ops.kv_write(cache.k[i], cache.v[i], k, v, ...)
        q = ops.rope_kv_write(q, k, v, cache.k[i], cache.v[i], slots, positions, w.inv_freq)  # (N, H, hd)
        a = ops.attention(q, cache.k[i], cache.v[i], slots, positions, window)  # (N, H, hd)
        a = ops.linear(a.reshape(N, H * hd), layer.o_proj, layer.o_bias)  # (N, H*hd) -> (N, D)
        if tap:
            tap("attn_out", i, a)
        # the residual add, and the MLP block's norm of its result, in one op: x = x + a; h = rmsnorm(x)
        x, h = ops.add_rmsnorm(x, a, layer.post_attention_layernorm, eps)  # (N, D), (N, D)
        if tap:
            tap("attn", i, x)

        # --- MLP block (SwiGLU): x + down(silu(gate(h)) * up(h)), from h = rmsnorm(x)
        g, u = project(ops, h, layer, "gate_up")  # (N, D) -> (N, F), (N, F)
        m = ops.linear(ops.swiglu(g, u), layer.down_proj, layer.down_bias)  # (N, F) -> (N, D)
        if tap:
            tap("mlp_out", i, m)
        # the residual add, and the next block's norm: the next layer's input norm, or after the last layer
        # the final norm (row by row, so normalizing every row and then picking some is picking and then
        # normalizing)
        next_norm = w.layers[i + 1].input_layernorm if i + 1 < L else w.norm
        x, h = ops.add_rmsnorm(x, m, next_norm, eps)  # (N, D), (N, D)
        if tap:
            tap("mlp", i, x)

    if rows is not None:
        h = ops.take_rows(h, rows)  # (R, D) only the tokens whose next token we want
    if tap:
        tap("norm", -1, h)
    logits = ops.linear(h, w.lm_head)  # (R, V)
    if tap:
        tap("logits", -1, logits)
    return logits
