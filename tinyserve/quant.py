"""Quantized weight formats: the specification, in NumPy.

A quantized matrix W (out, in) is stored as small integers plus one float32 scale per *group* of G
consecutive values of a row (G in 32, 64, 128, 256). The formats (docs/formats.md is the full spec):

    int8        q in [-127, 127] (int8), scale = max|w| / 127 per group,          w ~ q * scale
    int4        nibble n in [0, 15], scale = max|w| / 7 per group,                w ~ (n - 8) * scale
    int4-asym   nibble n in [0, 15], integer zero point z in [0, 15] per group,   w ~ (n - z) * scale

Layout, chosen for the speed of the CPU kernels (ops/cpu.py) and to make llama.cpp's Q8_0 / Q4_0 a copy:

- Rows are padded to whole groups: a row holds ng = ceil(in / G) groups; the values past `in` in the last
  group are padding (quantized as 0, ignored by every reader). So the padded width is Kp = ng * G.
- int8 data: int8 (out, Kp). int4 data: uint8 (out, Kp / 2), two values per byte, *split halves per
  group*: in each group, byte j holds value j in its low nibble and value j + G/2 in its high nibble.
  (With G = 32 this is exactly the byte layout of a llama.cpp Q4_0 block.) A kernel unpacks a byte with
  one AND and one shift and multiplies the two halves by two contiguous runs of x; the interleaved order
  (values 2j, 2j+1 in one byte) needs x de-interleaved and measured ~35% slower (docs/performance.md).
- scales: float32 (out, ng); zero points (int4-asym only): uint8 (out, ng).

`dequantize(qt)` is what a quantized matrix *means*: ops.linear(x, qt) is specified as
x @ dequantize(qt).T, whatever trick a kernel uses to compute it.

Files: `quantized_tensors(name, qt)` gives the plain tensors to write into a safetensors file
(name -> data, name + "_scale", name + "_zero"); `read_quantized(ckpt, name, shape)` reads them back;
`make_read_linear(...)` is the hook model.load_weights uses to quantize while loading, or to read a
checkpoint that is already quantized. `from_q8_0` / `from_q4_0` turn llama.cpp's GGUF blocks into
QuantizedTensors with exactly the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import TinyserveError, is_integer

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128, 256)
SCALE_SUFFIX = "_scale"
ZERO_SUFFIX = "_zero"
METADATA_KEY = "tinyserve_quant"  # safetensors metadata of a quantized checkpoint: a label, e.g. "int4 g128"

# quantize() works on this many rows at a time, so that quantizing a (128256, 2048) embedding table
# never holds more than a few float64 temporaries of this size.
_ROWS_PER_CHUNK = 2048


class QuantFormat:
    """What a quantized matrix's bits and zero points say about its format (shared by the host
    QuantizedTensor and the CUDA backend's device copy)."""

    @property
    def zero_point(self) -> bool:
        return self.zeros is not None

    @property
    def format(self) -> str:
        """'int8', 'int4' or 'int4-asym'."""
        return f"int{self.bits}" + ("-asym" if self.zeros is not None else "")


@dataclass(eq=False)
class QuantizedTensor(QuantFormat):
    """A quantized (out, in) matrix. See the module docstring and docs/formats.md for the layout."""

    bits: int  # 8 or 4
    group_size: int  # G: 32, 64, 128 or 256
    shape: tuple  # (out, in), the logical shape
    data: np.ndarray  # int8 (out, Kp) if bits == 8; uint8 (out, Kp // 2) if bits == 4; Kp = n_groups * G
    scales: np.ndarray  # float32 (out, n_groups)
    zeros: np.ndarray | None = None  # uint8 (out, n_groups), values 0..15: int4 asymmetric only

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        check_format(self.bits, self.group_size, self.zeros is not None)
        if len(self.shape) != 2:
            raise TinyserveError(f"a quantized tensor is 2-D (out, in), got shape {self.shape}")
        out, _ = self.shape
        ng, kp = self.n_groups, self.padded_in
        want = (np.int8, (out, kp)) if self.bits == 8 else (np.uint8, (out, kp // 2))
        if self.data.dtype != want[0] or self.data.shape != want[1]:
            raise TinyserveError(
                f"int{self.bits} data must be {np.dtype(want[0]).name} {want[1]} for shape {self.shape} group "
                f"{self.group_size}, got {self.data.dtype} {self.data.shape}"
            )
        if self.scales.dtype != np.float32 or self.scales.shape != (out, ng):
            raise TinyserveError(f"scales must be float32 {(out, ng)}, got {self.scales.dtype} {self.scales.shape}")
        if self.zeros is not None and (self.zeros.dtype != np.uint8 or self.zeros.shape != (out, ng)):
            raise TinyserveError(f"zero points must be uint8 {(out, ng)}, got {self.zeros.dtype} {self.zeros.shape}")

    @property
    def n_groups(self) -> int:
        """Groups per row: ceil(in / G) (the last one may be partly padding)."""
        return -(-self.shape[1] // self.group_size)

    @property
    def padded_in(self) -> int:
        """Kp = n_groups * G, the row length as stored."""
        return self.n_groups * self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads per pass over the matrix: data, scales and zero points."""
        return int(self.data.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.format}, group_size={self.group_size}, shape={self.shape})"


def check_format(bits, group_size, zero_point=False) -> None:
    """Raise a TinyserveError unless (bits, group_size, zero_point) is a format this module defines."""
    if not is_integer(bits) or bits not in BITS:
        raise TinyserveError(f"quantization bits must be 8 or 4, got {bits!r}")
    if not is_integer(group_size) or group_size not in GROUP_SIZES:
        raise TinyserveError(f"quantization group size must be one of 32, 64, 128, 256, got {group_size!r}")
    if zero_point and bits != 4:
        raise TinyserveError("zero points are only defined for int4 (int8 is symmetric)")


# ------------------------------------------------------------------------------------ int4 packing
def pack_int4(n: np.ndarray, group_size: int) -> np.ndarray:
    """Pack nibbles (rows, Kp) uint8 in 0..15 into bytes (rows, Kp/2): split halves per group.

    In each group of G values, byte j = n[j] | n[j + G/2] << 4.
    """
    rows, kp = n.shape
    h = group_size // 2
    g = n.reshape(rows, kp // group_size, 2, h)  # (rows, ng, [low half, high half], G/2)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).reshape(rows, kp // 2).astype(np.uint8)


def unpack_int4(data: np.ndarray, group_size: int) -> np.ndarray:
    """The inverse of pack_int4: bytes (rows, Kp/2) -> nibbles (rows, Kp) uint8 in 0..15."""
    rows, kb = data.shape
    h = group_size // 2
    b = data.reshape(rows, kb // h, h)  # (rows, ng, G/2)
    return np.concatenate([b & 15, b >> 4], axis=-1).reshape(rows, 2 * kb)


# ------------------------------------------------------------------------------- quantize / dequantize
def quantize(w, bits: int, group_size: int, zero_point: bool = False) -> QuantizedTensor:
    """Quantize a float matrix (out, in) to int8 or int4 with one scale per group of `group_size`.

    Rounding is to nearest, ties to even (np.rint), computed in float64 from the float32 scale, so every
    value satisfies |w - dequantized w| <= scale / 2 (up to float32 rounding of the product).
    A group of zeros gets scale 0 (and dequantizes to zeros).
    """
    check_format(bits, group_size, zero_point)
    w = np.asarray(w)
    if w.ndim != 2:
        raise TinyserveError(f"can only quantize a 2-D matrix (out, in), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating) and not np.issubdtype(w.dtype, np.integer):
        raise TinyserveError(f"can only quantize a numeric matrix, got dtype {w.dtype}")
    out, k = w.shape
    if out == 0 or k == 0:
        raise TinyserveError(f"cannot quantize an empty matrix of shape {w.shape}")
    ng = -(-k // group_size)
    kp = ng * group_size
    data = np.empty((out, kp if bits == 8 else kp // 2), np.int8 if bits == 8 else np.uint8)
    scales = np.empty((out, ng), np.float32)
    zeros = np.empty((out, ng), np.uint8) if zero_point else None
    for r0 in range(0, out, _ROWS_PER_CHUNK):
        r1 = min(out, r0 + _ROWS_PER_CHUNK)
        chunk = np.zeros((r1 - r0, kp), np.float32)  # padded with zeros to whole groups
        chunk[:, :k] = w[r0:r1]
        if not np.isfinite(chunk).all():
            raise TinyserveError("cannot quantize a matrix that holds NaN or infinite values")
        g = chunk.reshape(r1 - r0, ng, group_size).astype(np.float64)  # (rows, ng, G)
        if bits == 8:
            s = (np.abs(g).max(axis=-1) / 127).astype(np.float32)  # (rows, ng)
            q = np.clip(np.rint(_safe_div(g, s)), -127, 127)
            data[r0:r1] = q.astype(np.int8).reshape(r1 - r0, kp)
        elif not zero_point:
            s = (np.abs(g).max(axis=-1) / 7).astype(np.float32)
            q = np.clip(np.rint(_safe_div(g, s)), -8, 7)
            data[r0:r1] = pack_int4((q + 8).astype(np.uint8).reshape(r1 - r0, kp), group_size)
        else:
            lo = np.minimum(g.min(axis=-1), 0.0)  # the range always holds 0, so the zero point is in 0..15
            hi = np.maximum(g.max(axis=-1), 0.0)
            s = ((hi - lo) / 15).astype(np.float32)
            z = np.clip(np.rint(_safe_div(-lo[..., None], s)[..., 0]), 0, 15)  # (rows, ng)
            n = np.clip(np.rint(_safe_div(g, s)) + z[..., None], 0, 15)
            data[r0:r1] = pack_int4(n.astype(np.uint8).reshape(r1 - r0, kp), group_size)
            zeros[r0:r1] = z.astype(np.uint8)
        scales[r0:r1] = s
    return QuantizedTensor(bits, group_size, (out, k), data, scales, zeros)


def _safe_div(g: np.ndarray, s: np.ndarray) -> np.ndarray:
    """g / s[..., None] in float64, with 0 where the scale is 0 (a group of zeros)."""
    s64 = s.astype(np.float64)[..., None]
    return np.divide(g, s64, out=np.zeros(np.broadcast_shapes(g.shape, s64.shape)), where=s64 != 0)


def integer_values(qt: QuantizedTensor) -> np.ndarray:
    """The integers each value is stored as, zero point subtracted: (out, Kp) int16, padding included.

    int8: q; int4: n - 8; int4-asym: n - zero. Dequantized values are these times the group's scale.
    """
    out = qt.shape[0]
    if qt.bits == 8:
        return qt.data.astype(np.int16)
    n = unpack_int4(qt.data, qt.group_size).astype(np.int16)
    z = np.int16(8) if qt.zeros is None else np.repeat(qt.zeros.astype(np.int16), qt.group_size, axis=1)
    return (n - z).reshape(out, qt.padded_in)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 matrix (out, in) a quantized tensor stands for: integer value * group scale."""
    out, k = qt.shape
    v = integer_values(qt).astype(np.float32).reshape(out, qt.n_groups, qt.group_size)
    w = v * qt.scales[:, :, None]  # (out, ng, G) float32
    return np.ascontiguousarray(w.reshape(out, qt.padded_in)[:, :k])


# ---------------------------------------------------------------------------------------- file layout
def quantized_tensors(name: str, qt: QuantizedTensor) -> dict:
    """The plain arrays that store `qt` in a safetensors file under `name` (docs/formats.md).

    name -> data (int8 (out, Kp) or uint8 (out, Kp/2)), name + "_scale" -> float32 (out, ng), and for
    int4-asym name + "_zero" -> uint8 (out, ng). bits and G follow from these dtypes and shapes.
    """
    t = {name: qt.data, name + SCALE_SUFFIX: qt.scales}
    if qt.zeros is not None:
        t[name + ZERO_SUFFIX] = qt.zeros
    return t


def checkpoint_metadata(qts) -> dict:
    """safetensors metadata that marks a checkpoint as quantized: {"tinyserve_quant": "int4 g128"}.

    Readers do not need it (every tensor's format follows from its dtypes and shapes); it labels the
    checkpoint for people and tells the engine to read quantized tensors as they are.
    """
    labels = sorted({f"{qt.format} g{qt.group_size}" for qt in qts})
    return {METADATA_KEY: " + ".join(labels) if labels else "none"}


_LABEL = re.compile(r"int(8|4|4-asym) g(32|64|128|256)")


def check_label(label, where) -> str:
    """A checkpoint's tinyserve_quant metadata, checked: what checkpoint_metadata writes ("int4 g128",
    "int4 g128 + int8 g32" for mixed formats, or "none")."""
    if not isinstance(label, str) or (label != "none" and not all(_LABEL.fullmatch(p) for p in label.split(" + "))):
        raise TinyserveError(f"{where}: metadata {METADATA_KEY} is {label!r}, not a quantization label like 'int4 g128'")
    return label


def is_quantized(ckpt, name: str) -> bool:
    """Whether the checkpoint holds `name` in tinyserve's quantized layout (it has a `name_scale`)."""
    return name + SCALE_SUFFIX in ckpt


def read_quantized(ckpt, name: str, shape) -> QuantizedTensor:
    """Read the QuantizedTensor stored under `name` (see quantized_tensors) of logical shape (out, in).

    bits come from the data's dtype (int8: 8, uint8: 4); G = Kp / n_groups from the shapes; a `name_zero`
    tensor makes it int4-asym. Anything inconsistent is a TinyserveError naming the tensor.
    """
    where = getattr(ckpt, "dir", "checkpoint")
    out, k = (int(s) for s in shape)
    if name not in ckpt:
        raise TinyserveError(f"{where}: tensor {name} is missing from the checkpoint")
    if name + SCALE_SUFFIX not in ckpt:
        raise TinyserveError(f"{where}: tensor {name} has no {name + SCALE_SUFFIX}: it is not quantized")
    data = np.asarray(ckpt.get_raw(name))
    scales = np.asarray(ckpt.get(name + SCALE_SUFFIX, dtypes=("F32", "F16")))  # float16 widens to float32 exactly
    zeros = np.asarray(ckpt.get_raw(name + ZERO_SUFFIX)) if name + ZERO_SUFFIX in ckpt else None
    bad = f"{where}: quantized tensor {name}"
    if data.dtype == np.int8:
        bits, per_byte = 8, 1
    elif data.dtype == np.uint8:
        bits, per_byte = 4, 2
    else:
        raise TinyserveError(f"{bad} has dtype {data.dtype}; expected int8 (int8) or uint8 (int4)")
    if data.ndim != 2 or scales.ndim != 2 or scales.shape[0] != data.shape[0] or scales.shape[1] == 0:
        raise TinyserveError(f"{bad}: data {data.shape} and scales {scales.shape} do not fit together")
    ng = scales.shape[1]
    kp = data.shape[1] * per_byte
    if kp % ng:
        raise TinyserveError(f"{bad}: row length {kp} is not a whole number of {ng} groups")
    g = kp // ng
    if g not in GROUP_SIZES:
        raise TinyserveError(f"{bad}: group size {g} is not one of {GROUP_SIZES}")
    if data.shape[0] != out or -(-k // g) != ng:
        raise TinyserveError(f"{bad} holds a {data.shape[0]}x{kp} matrix in groups of {g}; the config says {out}x{k}")
    if zeros is not None and (
        bits != 4 or zeros.dtype != np.uint8 or zeros.shape != scales.shape or (zeros.size and zeros.max() > 15)
    ):
        raise TinyserveError(f"{bad}: bad zero points {zeros.dtype} {zeros.shape}")
    return QuantizedTensor(bits, g, (out, k), data, np.ascontiguousarray(scales, dtype=np.float32), zeros)


def make_read_linear(bits: int | None, group_size: int | None = 128, zero_point: bool | None = False):
    """A read_linear(ckpt, name, shape) for model.load_weights.

    A tensor the checkpoint already holds quantized is read as it is (never re-quantized). A float tensor
    is quantized with (bits, group_size, zero_point) while loading, or returned as float32 when bits is
    None (the setting for reading a quantized checkpoint whose other tensors stay float).
    """
    if bits is not None:
        check_format(bits, group_size, bool(zero_point))

    def read_linear(ckpt, name, shape):
        if is_quantized(ckpt, name):
            return read_quantized(ckpt, name, shape)
        w = ckpt.get_float(name, shape)
        if bits is None:
            return w
        try:
            return quantize(w, bits, group_size, bool(zero_point))
        except TinyserveError as e:
            raise TinyserveError(f"{name}: {e}") from None

    return read_linear


# ---------------------------------------------------------------------------- llama.cpp GGUF blocks
Q8_0_BLOCK = 32 + 2  # f16 d, then 32 int8 values
Q4_0_BLOCK = 16 + 2  # f16 d, then 16 bytes: byte j = value j (low nibble) | value j + 16 (high nibble)


def _blocks(raw, shape, block_bytes, kind) -> tuple[np.ndarray, int, int]:
    out, k = (int(s) for s in shape)
    if k % 32:
        raise TinyserveError(f"{kind}: rows of {k} values are not whole 32-value blocks")
    raw = np.frombuffer(np.ascontiguousarray(raw), dtype=np.uint8)
    if raw.size != out * (k // 32) * block_bytes:
        raise TinyserveError(f"{kind}: {raw.size} bytes do not hold a {out}x{k} matrix")
    return raw.reshape(out, k // 32, block_bytes), out, k


def from_q8_0(raw, shape) -> QuantizedTensor:
    """llama.cpp Q8_0 blocks (out * in/32 blocks of 34 bytes, row-major) -> int8, G = 32, same numbers.

    A Q8_0 block is d (float16) and 32 int8 values q, meaning q * d: exactly tinyserve's int8 with the
    scale widened to float32 (exact).
    """
    b, out, k = _blocks(raw, shape, Q8_0_BLOCK, "Q8_0")
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(out, k)
    return QuantizedTensor(8, 32, (out, k), q, d)


def from_q4_0(raw, shape) -> QuantizedTensor:
    """llama.cpp Q4_0 blocks (out * in/32 blocks of 18 bytes) -> int4 symmetric, G = 32, same numbers.

    A Q4_0 block is d (float16) and 16 bytes; byte j holds value j in its low nibble and value j + 16 in
    its high one, each meaning (nibble - 8) * d. That is byte for byte tinyserve's int4 with G = 32.
    """
    b, out, k = _blocks(raw, shape, Q4_0_BLOCK, "Q4_0")
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    data = np.ascontiguousarray(b[:, :, 2:]).reshape(out, k // 2)
    return QuantizedTensor(4, 32, (out, k), data, d)


def _f16_scales(qt: QuantizedTensor, kind: str) -> np.ndarray:
    d = qt.scales.astype(np.float16)
    if qt.group_size != 32 or qt.shape[1] % 32 or not np.array_equal(d.astype(np.float32), qt.scales):
        raise TinyserveError(f"{kind} needs group size 32, whole groups and scales exact in float16")
    return d


def to_q8_0(qt: QuantizedTensor) -> np.ndarray:
    """The inverse of from_q8_0 (bytes), for int8 tensors with G = 32 whose scales are float16 values."""
    if qt.bits != 8:
        raise TinyserveError("Q8_0 holds int8 tensors")
    d = _f16_scales(qt, "Q8_0")
    out, ng = d.shape
    b = np.empty((out, ng, Q8_0_BLOCK), np.uint8)
    b[:, :, :2] = d[:, :, None].view(np.uint8).reshape(out, ng, 2)
    b[:, :, 2:] = qt.data.view(np.uint8).reshape(out, ng, 32)
    return b.reshape(-1)


def to_q4_0(qt: QuantizedTensor) -> np.ndarray:
    """The inverse of from_q4_0 (bytes), for symmetric int4 tensors with G = 32 and float16 scales."""
    if qt.bits != 4 or qt.zeros is not None:
        raise TinyserveError("Q4_0 holds symmetric int4 tensors")
    d = _f16_scales(qt, "Q4_0")
    out, ng = d.shape
    b = np.empty((out, ng, Q4_0_BLOCK), np.uint8)
    b[:, :, :2] = d[:, :, None].view(np.uint8).reshape(out, ng, 2)
    b[:, :, 2:] = qt.data.reshape(out, ng, 16)
    return b.reshape(-1)



# ------------------------------------------------------------------- int8 activations (an option of ops)
def quantize_activations(x, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize activation rows x (N, in) to int8 per group of `group_size`: (xq int8 (N, Kp), scales float32 (N, ng)).

    The spec of the CPU backend's optional int8-activation path (ops/cpu.py, ACTIVATIONS = "int8"), the
    same scheme as llama.cpp's Q8_0 activations: x is padded with zeros to whole groups (Kp = ng * G, as the
    weights are); per group, scale = max|x| / 127 in float32, xq = rint(x / scale) (float32 division,
    ties to even) clipped to [-127, 127], and xq = 0 where the scale is 0. Then |x - scale * xq| <= scale / 2
    for every value (the max maps to +-127 up to float32 rounding).
    """
    x = np.asarray(x, dtype=np.float32)
    n, k = x.shape
    ng = -(-k // group_size)
    xp = np.zeros((n, ng * group_size), np.float32)
    xp[:, :k] = x
    g = xp.reshape(n, ng, group_size)
    s = np.abs(g).max(axis=-1) / np.float32(127)  # float32 (N, ng)
    safe = np.where(s > 0, s, np.float32(1))[..., None]
    q = np.where(s[..., None] > 0, np.clip(np.rint(g / safe), -127, 127), 0)
    return q.astype(np.int8).reshape(n, ng * group_size), s.astype(np.float32)


def linear_int8_activations(x, qt: QuantizedTensor) -> np.ndarray:
    """x @ W.T with x quantized by quantize_activations: the spec of cpu.linear with ACTIVATIONS = "int8".

    Per output, y[n, o] = sum_g (sum_j xq[n, g, j] * v[o, g, j]) * s[o, g] * xs[n, g], where v are the
    weights' integers (integer_values: q, n - 8 or n - z). The inner sums are exact integers (a kernel
    computes them in int32: |sum| <= 256 * 127 * 127 < 2^31); this reference sums the groups in float64,
    so a kernel differs from it only by float32 rounding. Against the exact dequantize(W) @ x it differs by
    at most the error of quantizing x: |y - y_exact| <= sum_g xs[n, g] / 2 * sum_j |w[o, g, j]|
    (activation_error_bound), plus float32 rounding.
    """
    x = np.asarray(x, dtype=np.float32)
    G, ng = qt.group_size, qt.n_groups
    xq, xs = quantize_activations(x, G)
    v = integer_values(qt).astype(np.int64).reshape(qt.shape[0], ng, G)
    d = np.einsum("ngj,ogj->nog", xq.astype(np.int64).reshape(x.shape[0], ng, G), v)  # exact integers
    y = (d * qt.scales.astype(np.float64)[None] * xs.astype(np.float64)[:, None, :]).sum(axis=-1)
    return y.astype(np.float32)


def activation_error_bound(x, qt: QuantizedTensor) -> np.ndarray:
    """(N, out) float64: sum_g xs[n, g] / 2 * sum_j |dequantize(W)[o, g, j]|, the largest change of each
    output that quantizing x per group (quantize_activations) can cause (each value moves by <= xs / 2)."""
    x = np.asarray(x, dtype=np.float32)
    G, ng = qt.group_size, qt.n_groups
    _, xs = quantize_activations(x, G)
    w = np.zeros((qt.shape[0], qt.padded_in), np.float64)
    w[:, : qt.shape[1]] = np.abs(dequantize(qt))
    wsum = w.reshape(qt.shape[0], ng, G).sum(axis=-1)  # (out, ng)
    return (xs.astype(np.float64) / 2) @ wsum.T
