"""tinyserve.quant: the quantized formats (docs/formats.md), their packing, files and GGUF blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tinyserve import quant
from tinyserve.checkpoint import Checkpoint, save_safetensors
from tinyserve.errors import TinyserveError

EPS = float(np.finfo(np.float32).eps)
FORMATS = [(8, False), (4, False), (4, True)]


def matrices(max_out=6, max_in=300):
    shapes = st.tuples(st.integers(1, max_out), st.integers(1, max_in))
    values = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
    return shapes.flatmap(lambda s: arrays(np.float32, s, elements=values))


@settings(max_examples=60, deadline=None)
@given(w=matrices(), fmt=st.sampled_from(FORMATS), group=st.sampled_from(quant.GROUP_SIZES))
def test_round_trip_error_is_at_most_half_a_step(w, fmt, group):
    bits, zp = fmt
    qt = quant.quantize(w, bits, group, zp)
    out, k = w.shape
    assert qt.shape == (out, k) and qt.n_groups == -(-k // group) and qt.format == f"int{bits}" + ("-asym" if zp else "")
    d = quant.dequantize(qt)
    assert d.dtype == np.float32 and d.shape == w.shape
    s = np.repeat(qt.scales, group, axis=1)[:, :k]  # each value's group scale
    # rounding to the nearest step: s/2; then the float32 product q * s rounds once more
    assert np.all(np.abs(w.astype(np.float64) - d) <= s / 2 + EPS * np.abs(d) + 1e-30)
    v = quant.integer_values(qt)
    if bits == 8:
        assert v.min() >= -127 and v.max() <= 127
        np.testing.assert_array_equal(qt.scales, (np.abs(np.pad(w, ((0, 0), (0, qt.padded_in - k)))).reshape(out, -1, group).max(-1) / 127).astype(np.float32))
    elif not zp:
        assert v.min() >= -8 and v.max() <= 7
    else:
        assert qt.zeros.max() <= 15
    # the padding past `in` holds the code of 0
    assert np.all(v[:, k:] == 0)


def test_zero_groups_and_exact_steps():
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = np.arange(32) - 16  # the integers -16..15
    for bits, zp in FORMATS:
        qt = quant.quantize(w, bits, 32, zp)
        assert qt.scales[0, 0] == 0 and qt.scales[1, 0] == 0
        np.testing.assert_array_equal(quant.dequantize(qt)[:, :32], 0)
    qt = quant.quantize(w, 4, 32, True)  # -16..15 in 15 steps of 31/15: zero point round(16 / 2.07) = 8
    assert qt.zeros[1, 1] == 8


def test_int4_packing_is_split_halves_per_group():
    rng = np.random.default_rng(1)
    for group in quant.GROUP_SIZES:
        n = rng.integers(0, 16, (3, 2 * group)).astype(np.uint8)
        packed = quant.pack_int4(n, group)
        assert packed.shape == (3, group)
        h = group // 2
        for g in range(2):
            for j in range(h):
                assert np.all(packed[:, g * h + j] == n[:, g * group + j] | (n[:, g * group + j + h] << 4))
        np.testing.assert_array_equal(quant.unpack_int4(packed, group), n)


@settings(max_examples=30, deadline=None)
@given(nibbles=arrays(np.uint8, st.tuples(st.integers(1, 4), st.sampled_from([64, 128, 256, 512])), elements=st.integers(0, 15)))
def test_unpack_inverts_pack(nibbles):
    for group in quant.GROUP_SIZES:
        if nibbles.shape[1] % group == 0:
            np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(nibbles, group), group), nibbles)


@pytest.mark.parametrize("bits,zp", FORMATS)
def test_file_round_trip(tmp_path, bits, zp):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((7, 100)).astype(np.float32)
    qt = quant.quantize(w, bits, 64, zp)
    tensors = quant.quantized_tensors("layer.weight", qt)
    tensors["other.weight"] = w
    save_safetensors(tensors, tmp_path / "model.safetensors", metadata=quant.checkpoint_metadata([qt]))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.metadata[quant.METADATA_KEY] == f"{qt.format} g64"
    back = quant.read_quantized(ckpt, "layer.weight", (7, 100))
    assert (back.bits, back.group_size, back.shape) == (bits, 64, (7, 100))
    np.testing.assert_array_equal(back.data, qt.data)
    np.testing.assert_array_equal(back.scales, qt.scales)
    if zp:
        np.testing.assert_array_equal(back.zeros, qt.zeros)
    else:
        assert back.zeros is None
    np.testing.assert_array_equal(quant.dequantize(back), quant.dequantize(qt))

    # make_read_linear: quantized tensors are read as they are (not re-quantized to the asked format),
    # float tensors are quantized while loading, or kept float with bits=None
    read = quant.make_read_linear(8 if bits == 4 else 4, 32)
    same = read(ckpt, "layer.weight", (7, 100))
    assert same.bits == bits and same.group_size == 64
    np.testing.assert_array_equal(same.data, qt.data)
    fresh = read(ckpt, "other.weight", (7, 100))
    assert isinstance(fresh, quant.QuantizedTensor) and fresh.bits == (8 if bits == 4 else 4) and fresh.group_size == 32
    assert isinstance(quant.make_read_linear(None, None, None)(ckpt, "other.weight", (7, 100)), np.ndarray)

    with pytest.raises(TinyserveError, match="layer.weight"):
        quant.read_quantized(ckpt, "layer.weight", (7, 200))  # the config disagrees with the file
    with pytest.raises(TinyserveError, match="not quantized"):
        quant.read_quantized(ckpt, "other.weight", (7, 100))


def test_bad_arguments_raise_one_line_errors():
    w = np.ones((4, 64), np.float32)
    for args, kwargs, msg in [
        ((w, 3, 32), {}, "bits"),
        ((w, 8, 48), {}, "group size"),
        ((w, 8, 32), {"zero_point": True}, "zero points"),
        ((np.ones(64, np.float32), 8, 32), {}, "2-D"),
        ((np.ones((2, 3, 64), np.float32), 4, 32), {}, "2-D"),
        ((np.full((2, 64), np.nan, np.float32), 4, 32), {}, "NaN"),
        ((np.ones((0, 64), np.float32), 4, 32), {}, "empty"),
    ]:
        with pytest.raises(TinyserveError, match=msg) as e:
            quant.quantize(*args, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(TinyserveError):
        quant.make_read_linear(5, 32)
    with pytest.raises(TinyserveError):  # data that does not fit the declared shape
        quant.QuantizedTensor(8, 32, (4, 64), np.zeros((4, 32), np.int8), np.ones((4, 2), np.float32))


# ---------------------------------------------------------------------------------- llama.cpp blocks
def _q4_0_reference(raw: np.ndarray, out: int, k: int) -> np.ndarray:
    """llama.cpp's dequantize_row_q4_0, written from its definition, value by value."""
    b = raw.reshape(out, k // 32, 18)
    w = np.empty((out, k), np.float32)
    for r in range(out):
        for i in range(k // 32):
            d = np.float32(b[r, i, :2].view(np.float16)[0])
            for j in range(16):
                w[r, i * 32 + j] = np.float32((int(b[r, i, 2 + j]) & 0x0F) - 8) * d
                w[r, i * 32 + j + 16] = np.float32((int(b[r, i, 2 + j]) >> 4) - 8) * d
    return w


def _q8_0_reference(raw: np.ndarray, out: int, k: int) -> np.ndarray:
    b = raw.reshape(out, k // 32, 34)
    w = np.empty((out, k), np.float32)
    for r in range(out):
        for i in range(k // 32):
            d = np.float32(b[r, i, :2].view(np.float16)[0])
            w[r, i * 32:(i + 1) * 32] = b[r, i, 2:].view(np.int8).astype(np.float32) * d
    return w


def _random_blocks(rng, out, k, block):
    raw = rng.integers(0, 256, out * (k // 32) * block, dtype=np.uint8).reshape(-1, block)
    raw[:, :2] = rng.standard_normal((raw.shape[0], 1)).astype(np.float16).view(np.uint8)  # finite scales
    return raw.reshape(-1)


def test_gguf_q8_0_and_q4_0_convert_exactly():
    rng = np.random.default_rng(3)
    out, k = 3, 96
    raw8 = _random_blocks(rng, out, k, quant.Q8_0_BLOCK)
    qt8 = quant.from_q8_0(raw8, (out, k))
    assert (qt8.bits, qt8.group_size) == (8, 32)
    np.testing.assert_array_equal(quant.dequantize(qt8), _q8_0_reference(raw8, out, k))
    np.testing.assert_array_equal(quant.to_q8_0(qt8), raw8)

    raw4 = _random_blocks(rng, out, k, quant.Q4_0_BLOCK)
    qt4 = quant.from_q4_0(raw4, (out, k))
    assert (qt4.bits, qt4.group_size, qt4.zeros) == (4, 32, None)
    np.testing.assert_array_equal(quant.dequantize(qt4), _q4_0_reference(raw4, out, k))
    np.testing.assert_array_equal(quant.to_q4_0(qt4), raw4)

    with pytest.raises(TinyserveError):
        quant.from_q4_0(raw4[:-1], (out, k))
    with pytest.raises(TinyserveError):
        quant.from_q8_0(raw8, (out, 100))


@settings(max_examples=40, deadline=None)
@given(x=matrices(max_out=3), group=st.sampled_from(quant.GROUP_SIZES), fmt=st.sampled_from(FORMATS))
def test_int8_activations_spec(x, group, fmt):
    """quantize_activations moves each value by at most half its group's step; linear_int8_activations is
    (dequantized x) @ dequantize(W).T and stays within activation_error_bound of the exact product."""
    n, k = x.shape
    xq, xs = quant.quantize_activations(x, group)
    ng = -(-k // group)
    assert xq.dtype == np.int8 and xq.shape == (n, ng * group) and xs.dtype == np.float32 and xs.shape == (n, ng)
    assert np.abs(xq.astype(np.int32)).max(initial=0) <= 127 and not xq[:, k:].any()
    step = np.repeat(xs, group, axis=1)
    xd = step.astype(np.float64) * xq
    assert np.all(np.abs(xd[:, :k] - x) <= step[:, :k] / 2 * (1 + 4 * EPS) + 1e-30)
    rng = np.random.default_rng(k)
    qt = quant.quantize(rng.standard_normal((4, k)).astype(np.float32), fmt[0], group, fmt[1])
    w = np.pad(quant.dequantize(qt).astype(np.float64), ((0, 0), (0, ng * group - k)))
    y = quant.linear_int8_activations(x, qt)
    ref = xd @ w.T
    np.testing.assert_allclose(y, ref, rtol=4 * EPS, atol=4 * EPS * (np.abs(xd) @ np.abs(w).T).max(initial=0) + 1e-30)
    exact = x.astype(np.float64) @ quant.dequantize(qt).T.astype(np.float64)
    bound = quant.activation_error_bound(x, qt)
    assert np.all(np.abs(y - exact) <= bound * (1 + 1e-6) + 4 * EPS * np.abs(xd) @ np.abs(w).T + 1e-30)
