"""The Numba CPU backend against the NumPy reference, op by op, on awkward shapes.

Tolerances, and why (eps = float32 machine epsilon, 1.19e-7):

- linear: a float32 dot product of K terms summed in any order is within K * eps * sum|w_k x_k| of the
  exact value, so two implementations that differ only in order are within 2 * K * eps * sum|w_k x_k|
  of each other. The int4 kernels sum (nibble * x) and subtract zero * sum(x), so their magnitudes are
  sum(nibble * |x|) + zero * sum|x| (times the scale), and the bound uses those. A kernel that used the
  wrong group's scale, dropped a value or misread a nibble would be off by about one whole term, far
  beyond these bounds (the weights' columns span very different magnitudes to make that visible).
- rmsnorm: the mean of D squares (D * eps relative), a square root and two roundings.
- rope, take_rows, kv_write, add: the same float32 operations in the same order: exact (rope to 2 ulp).
- swiglu: exp differs between NumPy's and LLVM's implementations by an ulp or two: 8 eps relative.
- attention: each score is a dot product of hd terms; an error d in a score changes its softmax weight
  by a factor (1 + d), so the output (a convex combination of values) moves by about max|v| times
  (2 * the largest score error + L * eps for the sums over L keys).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tinyserve import quant
from tinyserve.ops import ARRAY_NAMES, OP_NAMES, cpu, reference
import numba  # noqa: E402  (after tinyserve.ops.cpu, which sets GOMP_SPINCOUNT before numba loads)

EPS = float(np.finfo(np.float32).eps)


def rng_for(*key):
    """A generator seeded from the test's key, the same in every process (Python's hash of a string is not:
    a failure seen once in CI could not be run again)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def test_cpu_defines_every_op():
    for name in OP_NAMES + ARRAY_NAMES:
        assert callable(getattr(cpu, name, None)), name
    assert callable(cpu.warmup)


# ------------------------------------------------------------------------------------------------ linear
def _weights(rng, out, k):
    """Weights whose columns span very different magnitudes (per block of 16 columns)."""
    col = np.exp(2 * rng.standard_normal((k + 15) // 16)).repeat(16)[:k]
    return (rng.standard_normal((out, k)) * col).astype(np.float32)


def _magnitude(w) -> np.ndarray:
    """(out, in) magnitudes of the terms a kernel adds up (see the module docstring)."""
    if isinstance(w, np.ndarray):
        return np.abs(w)
    k = w.shape[1]
    s = np.repeat(w.scales, w.group_size, axis=1)
    if w.bits == 8:
        m = np.abs(w.data.astype(np.float32)) * s
    else:
        n = quant.unpack_int4(w.data, w.group_size).astype(np.float32)
        z = 8.0 if w.zeros is None else np.repeat(w.zeros.astype(np.float32), w.group_size, axis=1)
        m = (n + z) * s
    return m[:, :k]


FORMATS = [("f32", None, False), ("int8", 8, False), ("int4", 4, False), ("int4-asym", 4, True)]


@pytest.mark.parametrize("fmt,bits,zp", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("N", [1, 3, 4, 8, 17, 33, 65])  # both sides of GEMM_MIN_ROWS (4) and GEMM_MIN_ROWS_Q8/_Q4 (8-64)
@pytest.mark.parametrize("out,k,group", [(5, 32, 32), (37, 100, 32), (19, 200, 64), (33, 389, 128), (16, 300, 256)])
def test_linear_matches_reference(fmt, bits, zp, N, out, k, group):
    rng = rng_for("linear", fmt, N, out, k, group)
    w = _weights(rng, out, k)
    if bits is not None:
        w = quant.quantize(w, bits, group, zp)
    x = rng.standard_normal((N, k)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32) if N % 2 else None
    got = cpu.linear(x, w, bias)
    want = reference.linear(x, w, bias)
    assert got.dtype == np.float32 and got.shape == (N, out)
    mag = np.abs(x) @ _magnitude(w).T + (0 if bias is None else np.abs(bias))
    tol = 2 * (k + 2) * EPS * mag + 1e-30
    assert np.all(np.abs(got - want) <= tol), np.max(np.abs(got - want) / tol)


@pytest.mark.parametrize("one_row_max_in", [0, 1 << 30])  # _gemv_f32 (blocks of 4 rows) / _gemv_f32_rows
@pytest.mark.parametrize("out,k", [(1, 1), (5, 3), (37, 100), (33, 389), (130, 4099)])
def test_one_row_f32_kernels_match_reference(monkeypatch, one_row_max_in, out, k):
    """One row of x on float32 weights takes _gemv_f32_rows where k <= cpu.F32_ONE_ROW_MAX_IN (AMD Zen), the
    blocks of 4 rows elsewhere: both, on whatever machine this is, against the reference, parallel and serial."""
    monkeypatch.setattr(cpu, "F32_ONE_ROW_MAX_IN", one_row_max_in)
    rng = rng_for("one row f32", out, k)
    w = cpu.upload(_weights(rng, out, k))
    x = rng.standard_normal((1, k)).astype(np.float32)
    want = reference.linear(x, w)
    tol = 2 * (k + 2) * EPS * (np.abs(x) @ np.abs(w).T) + 1e-30
    for serial_below in (0, 2**62):
        monkeypatch.setattr(cpu, "SERIAL_BELOW", serial_below)
        got = cpu.linear(x, w)
        assert got.shape == (1, out) and np.all(np.abs(got - want) <= tol)
        assert cpu._gemv_f32_for(1, k) is (cpu._gemv_f32_rows if k <= one_row_max_in else cpu._gemv_f32)


@pytest.mark.parametrize("out,k", [(1, 1), (7, 71), (37, 100), (33, 389), (64, 2048), (130, 4099), (9, 8192)])
def test_one_row_f32_kernels_agree_bit_for_bit(out, k):
    """The choice between the two float32 kernels is tuning (per CPU) and stays out of the results: each row's
    sum is vectorized the same way in both (LLVM's lanes and partial sums), so they agree exactly."""
    rng = rng_for("f32 kernels", out, k)
    w, x = _weights(rng, out, k), rng.standard_normal((1, k)).astype(np.float32)
    a, b = np.empty((1, out), np.float32), np.empty((1, out), np.float32)
    cpu._gemv_f32(x, w, a)
    cpu._gemv_f32_rows(x, w, b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("out,k,G", [(4, 32, 32), (7, 100, 32), (37, 389, 64), (64, 512, 128), (130, 700, 256)])
@pytest.mark.parametrize("n", [4, 5, 7, 16, 31])
def test_int8_rows_of_a_batch_equal_each_row_alone(out, k, G, n, monkeypatch):
    """int8 weights, float activations: a batch's rows go through the register tile (_q8_tile4) four at a time
    and the rest through _q8_rows4, one row alone through _q8_rows4; both come from _q8_block, which does the
    same operations in the same order for each row of x, so each row gets the same bits in a batch as alone."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "float32")
    rng = rng_for("int8 batch rows", out, k, G, n)
    w = quant.quantize(_weights(rng, out, k), 8, G)
    x = rng.standard_normal((n, k)).astype(np.float32)
    batch = cpu.linear(x, w)
    alone = np.concatenate([cpu.linear(x[i:i + 1], w) for i in range(n)])
    np.testing.assert_array_equal(batch, alone)


def _x_in_digits(x: np.ndarray, G: int) -> tuple:
    """(x~, scales): x as _x_digits leaves it, rebuilt from its digits in float64 (rows padded to whole groups)."""
    N, Kp = x.shape
    xt, scales = np.empty((N, Kp)), np.empty((N, Kp // G))
    for n in range(N):
        xd, xs, xc = np.empty((3, Kp), np.int8), np.empty(Kp // G, np.float32), np.empty(Kp // G, np.float32)
        assert cpu._x_digits(x, n, G, xd, xs, xc)
        d = xd.astype(np.int64)
        v = d[0] + 256 * d[1] + 65536 * d[2]
        assert np.abs(v).max() <= cpu.X_DIGITS_MAX
        xt[n] = (v.reshape(-1, G) * xs[:, None].astype(np.float64)).reshape(-1)
        scales[n] = xs
        np.testing.assert_allclose(xc, xs.astype(np.float64) * v.reshape(-1, G).sum(1), rtol=2 * EPS)
    return xt, scales


def _outliers(rng, n, k):
    """Rows of x with a large value in some groups (as real activations have), a group of zeros, and values of
    ~1e-30 beside a large one in a group: what rounding x per group must survive."""
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[:, 3] = 3e5
    x[:, min(k - 1, 130)] *= -1e3
    x[:, 128:min(k, 160)] *= 1e-30
    x[:, max(0, k - 64):] = 0
    return x


@pytest.mark.parametrize("out,k,G,zp", [(4, 128, 128, False), (13, 256, 128, True), (37, 389, 128, False),
                                       (64, 512, 256, True), (130, 1000, 256, False), (9, 2048, 128, True)])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_int4_digits_kernel_computes_dequantized_w_times_x_rounded_per_group(out, k, G, zp, n):
    """int4, one row of x at a time through vpdpbusd (_q4_digits4): x is first rounded per group to a 24-bit
    integer times a scale (_x_digits: within half a float32 ulp of the group's largest |x|), then the product
    is exact integers, converted once per group. The kernel's result is dequantize(W) @ x~ up to float32
    rounding, and so within that rounding plus sum_g (x's scale_g / 2) sum|w_g| of dequantize(W) @ x. x has
    large values, zeros and tiny values. (Both bounds are worst cases of float32 sums, loose enough to hold the
    float kernel's result too, so the last check is that the result is not the float kernel's.)"""
    rng = rng_for("int4 digits", out, k, G, zp, n)
    w = quant.quantize(_weights(rng, out, k), 4, G, zp)
    x = _outliers(rng, n, k)
    xp = cpu._padded(x, w.padded_in)
    y = np.empty((n, out), np.float32)
    z, asym = cpu._quant_zeros(w)
    cpu._gemv_q4(xp, cpu._weight(w.data), cpu._weight(w.scales), z, asym, y, cpu.PREFETCH_Q4, True)
    wd = quant.dequantize(w).astype(np.float64)
    kp = w.padded_in
    mag = np.zeros((out, kp))
    mag[:, :k] = _magnitude(w)
    xt, scales = _x_in_digits(xp, G)
    rows = range(n - n % 4, n)  # rows of x four at a time take the float register tile; the others the digits
    want = xt[:, :k] @ wd.T
    tol = 2 * (kp + 2) * EPS * (np.abs(xt) @ mag.T) + 1e-30
    for i in rows:
        assert np.all(np.abs(y[i] - want[i]) <= tol[i]), np.max(np.abs(y[i] - want[i]) / tol[i])
    exact = x.astype(np.float64) @ wd.T
    rounding = (np.repeat(scales / 2, G, axis=1)[:, :k]) @ np.abs(wd).T
    for i in rows:
        assert np.all(np.abs(y[i] - exact[i]) <= tol[i] + rounding[i])
    y32 = np.empty((n, out), np.float32)  # the float kernels, on x itself: another result (so the digits ran)
    cpu._gemv_q4(xp, cpu._weight(w.data), cpu._weight(w.scales), z, asym, y32, cpu.PREFETCH_Q4, False)
    assert not np.array_equal(y[rows], y32[rows])
    np.testing.assert_array_equal(y[:n - n % 4], y32[:n - n % 4])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e-33])
def test_int4_digits_kernel_leaves_rows_it_cannot_hold_to_the_float_kernel(bad):
    """A row of x holding inf or nan has no integer form, and one with a group of values all below ~1e-31 would
    need a subnormal scale: _x_digits says so and that row takes _q4_rows4, which gives what the reference
    gives (inf / nan where IEEE arithmetic puts them); the other rows keep the digits."""
    rng = rng_for("int4 digits bad", str(bad))
    w = quant.quantize(_weights(rng, 12, 256), 4, 128)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    if bad == 1e-33:
        x[1, 128:] *= np.float32(bad)
    else:
        x[1, 200] = bad
    args = (cpu._weight(w.data), cpu._weight(w.scales), cpu._NO_ZEROS, False)
    y, y32 = np.empty((3, 12), np.float32), np.empty((3, 12), np.float32)
    cpu._gemv_q4(x, *args, y, 0, True)
    cpu._gemv_q4(x, *args, y32, 0, False)
    np.testing.assert_array_equal(y[1], y32[1])
    assert not np.array_equal(y[[0, 2]], y32[[0, 2]])  # the digits
    assert np.all(np.isfinite(y[[0, 2]]))
    if bad != 1e-33:
        assert not np.all(np.isfinite(y[1]))


def test_int4_linear_takes_the_digits_kernel_for_large_matrices_only(monkeypatch):
    """cpu._q4_call: the digits for int4 weights of G 128 or 256 and at least Q4_DIGITS_MIN_WEIGHTS weights, on
    CPUs with AVX512-VNNI (Q4_DIGITS); the prefetch distance a block of rows on Zen for rows over 2048 values."""
    rng = rng_for("q4 call")
    monkeypatch.setattr(cpu, "Q4_DIGITS", True)
    big = quant.quantize(rng.standard_normal((256, 8192)).astype(np.float32), 4, 128)
    assert cpu._q4_call(big) == (2 * 8192 if cpu.PREFETCH_Q4_LONG_ROWS else cpu.PREFETCH_Q4, True)
    assert not cpu._q4_call(quant.quantize(rng.standard_normal((256, 8192)).astype(np.float32), 4, 64))[1]
    assert not cpu._q4_call(quant.quantize(rng.standard_normal((16, 1024)).astype(np.float32), 4, 128))[1]
    monkeypatch.setattr(cpu, "Q4_DIGITS", False)
    assert not cpu._q4_call(big)[1]


def test_linear_keeps_leading_dims_and_readonly_weights():
    rng = rng_for("lead")
    w = quant.quantize(_weights(rng, 8, 64), 4, 32)
    w.data.setflags(write=False)  # as when memory-mapped from a file
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    got = cpu.linear(x, w)
    assert got.shape == (2, 3, 8)
    np.testing.assert_allclose(got, reference.linear(x.reshape(6, 64), w).reshape(2, 3, 8), rtol=1e-4, atol=1e-4)


MANY_THREADS = max(2, numba.get_num_threads())


def with_threads(n: int, fn):
    """fn() with Numba's thread count set to n, restored afterwards."""
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def test_results_do_not_depend_on_thread_count(monkeypatch):
    """Every kernel parallelizes over independent outputs only: 1 thread and 2 threads agree bit for bit.

    SERIAL_BELOW = 0 makes even these small inputs take the parallel launch.
    """

    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    rng = rng_for("threads")
    x = rng.standard_normal((33, 200)).astype(np.float32)
    ws = [_weights(rng, 50, 200)] + [quant.quantize(_weights(rng, 50, 200), b, 64, z) for b, z in ((8, False), (4, True))]
    kc = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
    q = rng.standard_normal((9, 4, 16)).astype(np.float32)
    slots, pos = np.array([0] * 8 + [1]), np.array(list(range(20, 28)) + [5])

    def run():
        out = [cpu.linear(x[:n], w) for w in ws for n in (1, 9, 33)]  # matrix-vector, register tiles, panels
        out += [cpu.rmsnorm(x, x[0], 1e-5), *cpu.add_rmsnorm(x, x, x[0], 1e-5), cpu.swiglu(x, x),
                cpu.attention(q, kc, kc, slots, pos, 6)]
        return out

    one, many = with_threads(1, run), with_threads(MANY_THREADS, run)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_linear_rejects_wrong_width():
    with pytest.raises(ValueError):
        cpu.linear(np.ones((1, 5), np.float32), np.ones((3, 4), np.float32))


# ------------------------------------------------------------------------------------------- other ops
@pytest.mark.parametrize("N,D", [(1, 7), (3, 64), (17, 300)])
def test_rmsnorm(N, D):
    rng = rng_for("rms", N, D)
    x = (rng.standard_normal((N, D)) * 3).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    np.testing.assert_allclose(cpu.rmsnorm(x, w, 1e-5), reference.rmsnorm(x, w, 1e-5), rtol=(D + 4) * EPS, atol=1e-30)


@pytest.mark.parametrize("N,D", [(1, 7), (3, 64), (17, 300), (40, 2049)])
def test_add_rmsnorm(N, D, monkeypatch):
    """The residual add and the norm after it, fused: bit for bit cpu.add then cpu.rmsnorm (serial and
    parallel builds), within rmsnorm's bound of the reference; other shapes fall back to the two ops."""
    rng = rng_for("addrms", N, D)
    x = (rng.standard_normal((N, D)) * 3).astype(np.float32)
    b = rng.standard_normal((N, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    for threshold in (0, 2**62):  # every call parallel, then every call serial
        monkeypatch.setattr(cpu, "SERIAL_BELOW", threshold)
        s, h = cpu.add_rmsnorm(x, b, w, 1e-5)
        np.testing.assert_array_equal(s, cpu.add(x, b))
        np.testing.assert_array_equal(h, cpu.rmsnorm(cpu.add(x, b), w, 1e-5))
    rs, rh = reference.add_rmsnorm(x, b, w, 1e-5)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_allclose(h, rh, rtol=(D + 4) * EPS, atol=1e-30)
    s3, h3 = cpu.add_rmsnorm(x[None], b[None], w, 1e-5)  # 3-D: through add and rmsnorm
    np.testing.assert_array_equal(s3[0], s)
    np.testing.assert_array_equal(h3[0], h)
    with pytest.raises(ValueError):
        cpu.add_rmsnorm(x, b, w[:-1], 1e-5)


@pytest.mark.parametrize("N,nh,hd", [(1, 1, 2), (3, 4, 16), (17, 2, 64)])
def test_rope(N, nh, hd):
    rng = rng_for("rope", N, nh, hd)
    x = rng.standard_normal((N, nh, hd)).astype(np.float32)
    pos = rng.integers(0, 5000, N)
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    np.testing.assert_allclose(cpu.rope(x, pos, inv), reference.rope(x, pos, inv), rtol=2 * EPS, atol=1e-6)


def test_rope_follows_its_positions_and_frequencies():
    """rope computes its cos/sin tables from the call's positions and frequencies, bit for bit the reference's:
    a positions array changed in place, another dtype or another frequency array give the reference's too."""
    rng = rng_for("rope-cache")
    x = rng.standard_normal((3, 2, 8)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    pos = np.array([1, 5, 9])
    np.testing.assert_array_equal(cpu.rope(x, pos, inv), reference.rope(x, pos, inv))
    pos[1] = 700  # same array, new content
    np.testing.assert_array_equal(cpu.rope(x, pos, inv), reference.rope(x, pos, inv))
    np.testing.assert_array_equal(cpu.rope(x, pos.astype(np.int32), inv), reference.rope(x, pos, inv))
    inv2 = inv * np.float32(0.5)
    np.testing.assert_array_equal(cpu.rope(x, pos, inv2), reference.rope(x, pos, inv2))


@pytest.mark.parametrize("hd,base", [(64, 10000.0), (128, 500000.0), (6, 1e6)])
def test_rope_tables_by_position_are_the_per_call_tables(hd, base):
    """rope_kv_write's tables by position (rows 0..n-1 computed at once) hold, in every row, the numbers the
    reference computes for a call holding that position alone or in a run: NumPy's float32 angles, cos and
    sin are elementwise. If a NumPy version ever computed a row differently by its neighbours, this fails."""
    inv = (1.0 / base ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    cos, sin = cpu._rope_tables(np.arange(20000), inv)
    for p in list(range(0, 64)) + list(range(64, 20000, 97)):
        c1, s1 = cpu._rope_tables(np.array([p]), inv)
        np.testing.assert_array_equal(c1[0], cos[p])
        np.testing.assert_array_equal(s1[0], sin[p])
    for start, n in ((5, 3), (999, 33), (19000, 129)):
        c, s = cpu._rope_tables(np.arange(start, start + n), inv)
        np.testing.assert_array_equal(c, cos[start:start + n])
        np.testing.assert_array_equal(s, sin[start:start + n])


def test_rope_kv_write_keeps_tables_for_read_only_frequencies():
    """A read-only frequency array (the model's) gets tables by position, kept and grown as positions grow
    (at most to the cache's length); a writable one, tables of its call (it may change in place). Either way
    q and the cache rows are the reference's, bit for bit."""
    rng = rng_for("rope-tables")
    hd, Tmax = 8, 3000
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    frozen = inv.copy()
    frozen.flags.writeable = False
    slots = np.array([0, 1])

    def check(freq, positions):
        pos = np.array(positions)
        q, k, v = (rng.standard_normal((2, n, hd)).astype(np.float32) for n in (2, 1, 1))
        got = [np.zeros((2, 1, Tmax, hd), np.float32) for _ in range(2)]
        want = [c.copy() for c in got]
        out = cpu.rope_kv_write(q, k, v, *got, slots, pos, freq)
        np.testing.assert_array_equal(out, reference.rope_kv_write(q, k, v, *want, slots, pos, np.array(freq)))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)

    for positions in ([0, 1], [70, 5], [200, 1000], [2999, 3]):  # in the table, then beyond it, to the cache's end
        check(frozen, positions)
        check(inv, positions)
    assert cpu._POSITION_TABLES[id(frozen)][0] is frozen
    assert cpu._POSITION_TABLES[id(frozen)][1].shape == (Tmax, hd // 2)  # grown, never past the cache
    assert id(inv) not in cpu._POSITION_TABLES
    inv[0] *= np.float32(0.5)  # a writable array changed in place: its next call sees the new values
    check(inv, [7, 8])


def test_fast_paths_are_the_general_paths():
    """swiglu, add_rmsnorm, rope_kv_write and attention take the forward pass's arrays (C-contiguous float32,
    read-only weights, int64 slots and positions) without conversions; anything else goes through the general
    path's conversions first. Both give the same numbers, bit for bit."""
    rng = rng_for("fast-paths")
    g, u, x, b = (rng.standard_normal((3, 40)).astype(np.float32) for _ in range(4))
    w = rng.standard_normal(40).astype(np.float32)
    frozen = w.copy()
    frozen.flags.writeable = False
    assert cpu._plain(g) and cpu._plain_weight(frozen, 40) and not cpu._plain_weight(w, 40)
    wide = np.concatenate([g, u], axis=1)  # column views: not C-contiguous, so the general path
    assert not cpu._plain(wide[:, :40])
    np.testing.assert_array_equal(cpu.swiglu(g, u), cpu.swiglu(wide[:, :40], wide[:, 40:]))
    np.testing.assert_array_equal(cpu.swiglu(g, u), cpu.swiglu(g.astype(np.float64), u))
    for got, want in zip(cpu.add_rmsnorm(x, b, frozen, 1e-5), cpu.add_rmsnorm(x, b, w, 1e-5)):
        np.testing.assert_array_equal(got, want)
    hd, Tmax = 8, 16
    q, k, v = (rng.standard_normal((2, n, hd)).astype(np.float32) for n in (4, 2, 2))
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    caches = [[np.zeros((2, 2, Tmax, hd), np.float32) for _ in range(2)] for _ in range(2)]
    fast = cpu.rope_kv_write(q, k, v, *caches[0], np.array([0, 1]), np.array([3, 9]), inv)
    slow = cpu.rope_kv_write(q.astype(np.float64), k, v, *caches[1], [0, 1], [3, 9], inv)  # float64 q: general
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(caches[0], caches[1])
    np.testing.assert_array_equal(cpu.attention(fast, *caches[0], np.array([0, 1]), np.array([3, 9])),
                                  cpu.attention(fast.astype(np.float64), *caches[1], [0, 1], [3, 9]))


def test_take_rows_swiglu_add():
    rng = rng_for("misc")
    table = rng.standard_normal((50, 9)).astype(np.float32)
    idx = np.array([3, 0, 49, 3, -1])
    np.testing.assert_array_equal(cpu.take_rows(table, idx), reference.take_rows(table, idx))
    np.testing.assert_array_equal(cpu.take_rows(table.astype(np.float16), idx), reference.take_rows(table.astype(np.float16), idx))
    g = (rng.standard_normal((17, 33)) * 30).astype(np.float32)
    g[0, :3] = [-200.0, 200.0, 0.0]  # exp overflows for the first: silu -> -0
    u = rng.standard_normal((17, 33)).astype(np.float32)
    np.testing.assert_allclose(cpu.swiglu(g, u), reference.swiglu(g, u), rtol=8 * EPS, atol=1e-37)
    np.testing.assert_array_equal(cpu.add(g, u), reference.add(g, u))
    a = rng.standard_normal((3, 40000)).astype(np.float32)  # several parallel chunks
    np.testing.assert_array_equal(cpu.add(a, a), a + a)


def _kv_case(rng, S, KVH, Tmax, hd, runs):
    """runs: list of (slot, first position, count): the tokens of one step, one run per sequence."""
    slots = np.concatenate([np.full(c, s) for s, _, c in runs]).astype(np.int64)
    positions = np.concatenate([np.arange(p, p + c) for _, p, c in runs]).astype(np.int64)
    return slots, positions


KV_CASES = [
    # S, KVH, G (queries per kv head), Tmax, hd, window, runs (slot, first position, count)
    (1, 1, 1, 8, 4, 0, [(0, 0, 1)]),
    (2, 2, 2, 40, 8, 0, [(1, 5, 3), (0, 0, 1)]),
    (3, 2, 4, 64, 16, 0, [(2, 0, 17), (0, 30, 1), (1, 9, 1)]),
    (2, 1, 8, 32, 8, 4, [(0, 3, 17), (1, 20, 1)]),
    (1, 4, 1, 50, 64, 7, [(0, 11, 3)]),
    (4, 1, 2, 30, 6, 1, [(3, 0, 5), (2, 12, 2)]),
    # hd a multiple of 16: blocks of 16 keys through the vector intrinsics, then 4 at a time, then singles
    (2, 2, 4, 80, 32, 0, [(0, 60, 2), (1, 0, 3)]),
    (1, 2, 2, 100, 48, 37, [(0, 70, 4)]),  # a window: the span starts mid-cache
    (3, 1, 8, 70, 64, 0, [(2, 33, 2), (0, 64, 1), (1, 15, 1)]),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])  # the KV cache's element type (kv_dtype)
@pytest.mark.parametrize("S,KVH,G,Tmax,hd,window,runs", KV_CASES)
def test_kv_write_and_attention(S, KVH, G, Tmax, hd, window, runs, dtype):
    """kv_write stores exactly what the reference stores (a float16 cache: each value rounded to nearest, ties
    to even, overflow to inf, as NumPy's assignment); attention reads the same cache values, widened exactly,
    so the float32 tolerance holds for both cache types."""
    rng = rng_for("attn", S, KVH, G, hd, window)
    slots, positions = _kv_case(rng, S, KVH, Tmax, hd, runs)
    N, H = slots.size, KVH * G
    kc = rng.standard_normal((S, KVH, Tmax, hd)).astype(dtype)  # stale values must stay invisible
    vc = rng.standard_normal((S, KVH, Tmax, hd)).astype(dtype)
    k = rng.standard_normal((N, KVH, hd)).astype(np.float32)
    v = rng.standard_normal((N, KVH, hd)).astype(np.float32)
    if dtype == np.float16:  # rounding cases apart: a tie, subnormals, overflow, NaN
        kc2 = np.zeros((1, 1, 1, 6), np.float16)
        edge = np.array([[[1 + 2**-11, 3e-6, -6e-8, 1e5, -1e5, np.nan]]], np.float32)
        cpu.kv_write(kc2, kc2.copy(), edge, edge, [0], [0])
        want = np.zeros_like(kc2)
        reference.kv_write(want, want.copy(), edge, edge, [0], [0])
        np.testing.assert_array_equal(kc2, want)  # nan == nan here (assert_array_equal)
    kc2, vc2 = kc.copy(), vc.copy()
    cpu.kv_write(kc, vc, k, v, slots, positions)
    reference.kv_write(kc2, vc2, k, v, slots, positions)
    np.testing.assert_array_equal(kc, kc2)
    np.testing.assert_array_equal(vc, vc2)

    q = (rng.standard_normal((N, H, hd)) * 2).astype(np.float32)
    got = cpu.attention(q, kc, vc, slots, positions, window)
    want = reference.attention(q, kc, vc, slots, positions, window)
    scale = 1 / np.sqrt(hd)
    kmax, vmax = float(np.max(np.abs(kc))), float(np.max(np.abs(vc)))
    score_err = 2 * hd * EPS * scale * np.max(np.abs(q)) * kmax * hd
    tol = vmax * (2 * score_err + 4 * Tmax * EPS)
    assert np.max(np.abs(got - want)) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("S,KVH,G,Tmax,hd,window,runs", KV_CASES)
def test_rope_kv_write_is_rope_then_kv_write(S, KVH, G, Tmax, hd, window, runs, dtype):
    """The fused op returns rope(q) and writes rope(k) and v, bit for bit what cpu.rope twice and cpu.kv_write
    give (the same products and roundings), and so the reference's values (rope and kv_write are exact
    against it here: test_rope, test_kv_write_and_attention)."""
    rng = rng_for("rope_kv_write", S, KVH, G, hd, window, np.dtype(dtype).itemsize)
    slots, positions = _kv_case(rng, S, KVH, Tmax, hd, runs)
    N, H = slots.size, KVH * G
    inv = (1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    kc = rng.standard_normal((S, KVH, Tmax, hd)).astype(dtype)
    vc = rng.standard_normal((S, KVH, Tmax, hd)).astype(dtype)
    q, k, v = (rng.standard_normal((N, n, hd)).astype(np.float32) for n in (H, KVH, KVH))
    caches = {name: (kc.copy(), vc.copy()) for name in ("fused", "apart", "reference")}
    got = cpu.rope_kv_write(q, k, v, *caches["fused"], slots, positions, inv)
    apart = cpu.rope(q, positions, inv)
    cpu.kv_write(*caches["apart"], cpu.rope(k, positions, inv), v, slots, positions)
    want = reference.rope_kv_write(q, k, v, *caches["reference"], slots, positions, inv)
    np.testing.assert_array_equal(got, apart)
    np.testing.assert_allclose(got, want, rtol=2 * EPS, atol=1e-6)
    for a, b, r in zip(caches["fused"], caches["apart"], caches["reference"]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a.astype(np.float32), r.astype(np.float32), rtol=2 * EPS, atol=1e-6)


def test_rope_kv_write_rejects_bad_input():
    kc, one = np.zeros((1, 1, 4, 2), np.float32), np.ones((1, 1, 2), np.float32)
    inv = np.ones(1, np.float32)
    with pytest.raises(IndexError):
        cpu.rope_kv_write(one, one, one, kc, kc.copy(), [0], [4], inv)
    with pytest.raises(ValueError, match="frequencies"):
        cpu.rope_kv_write(one, one, one, kc, kc.copy(), [0], [0], np.ones(2, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        cpu.rope_kv_write(one, np.ones((2, 1, 2), np.float32), one, kc, kc.copy(), [0], [0], inv)


def test_kv_write_rejects_out_of_range():
    kc = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(IndexError):
        cpu.kv_write(kc, kc.copy(), np.ones((1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32), [0], [4])


def test_warmup_compiles_everything():
    assert cpu.warmup() >= 0


# ------------------------------------------------------------------------- linear with int8 activations
# cpu.ACTIVATIONS = "int8" (off by default) quantizes x per group to int8 and uses integer dot products. Its
# spec is quant.linear_int8_activations (exact integer group sums, float64 scaling): the kernel may differ
# from it only by float32 rounding of the group terms it adds up. Against the exact dequantize(W) @ x it
# differs by at most quant.activation_error_bound (each value of x moves by <= its group's scale / 2) plus
# that rounding.
Q_FORMATS = [("int8", 8, False), ("int4", 4, False), ("int4-asym", 4, True)]


def _linear_int8act(x, w):
    saved, cpu.ACTIVATIONS = cpu.ACTIVATIONS, "int8"
    try:
        return cpu.linear(x, w)
    finally:
        cpu.ACTIVATIONS = saved


needs_pack = pytest.mark.skipif(not cpu.PACK, reason="no AVX-512 VNNI here (or TINYSERVE_PACK=0): weights stay row-major")
FORMS = ["rows", pytest.param("packed", marks=needs_pack)]  # QuantizedTensor as it is, or cpu.PackedWeights


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
@pytest.mark.parametrize("N", [1, 2, 3, 17])  # 17: a decode batch below cpu.A8_GEMM_MIN_ROWS
@pytest.mark.parametrize("out,k,group", [(5, 32, 32), (37, 100, 32), (19, 200, 64), (33, 389, 128), (16, 300, 256),
                                         (9, 1000, 256)])
def test_linear_int8_activations_within_bound(form, fmt, bits, zp, N, out, k, group):
    rng = rng_for("int8act", fmt, N, out, k, group)
    w = quant.quantize(_weights(rng, out, k), bits, group, zp)
    x = (rng.standard_normal((N, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    got = _linear_int8act(x, cpu.PackedWeights(w) if form == "packed" else w)
    assert got.dtype == np.float32 and got.shape == (N, out)
    spec = quant.linear_int8_activations(x, w)
    xq, xs = quant.quantize_activations(x, group)
    # float32 rounding of the ng group terms |d_g * s_g * xs_g| and of their sum
    terms = np.abs(np.repeat(xs, group, axis=1) * xq).astype(np.float64) @ np.abs(np.pad(
        quant.dequantize(w), ((0, 0), (0, w.padded_in - k)))).T.astype(np.float64)
    rounding = 4 * (w.n_groups + 2) * EPS * terms + 1e-30
    assert np.all(np.abs(got - spec) <= rounding), np.max(np.abs(got - spec) / rounding)
    exact = x.astype(np.float64) @ quant.dequantize(w).T.astype(np.float64)
    bound = quant.activation_error_bound(x, w) + rounding
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / bound)
    # the float path is unchanged by the option's existence (default: float32 activations), packed weights too
    assert cpu.ACTIVATIONS == "float32"
    np.testing.assert_allclose(cpu.linear(x, w), exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    if form == "packed":
        np.testing.assert_array_equal(cpu.linear(x, cpu.PackedWeights(w)), cpu.linear(x, w))


@needs_pack
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
@pytest.mark.parametrize("out,k,group", [(1, 32, 32), (37, 100, 32), (16, 256, 256), (33, 389, 128), (250, 1000, 64)])
def test_packed_weights_hold_the_same_numbers(fmt, bits, zp, out, k, group):
    """cpu.PackedWeights (the int8-activation kernels' layout) gives back exactly the tensor it packed, in as many
    bytes (plus the rows that fill its last block of 16), and its prefill path (float activations, panels
    dequantized from the blocks) computes bit for bit what the row-major tensor's does."""
    rng = rng_for("packed", fmt, out, k, group)
    w = quant.quantize(_weights(rng, out, k), bits, group, zp)
    p = cpu.PackedWeights(w)
    back = p.unpack()
    for a, b in ((back.data, w.data), (back.scales, w.scales), (back.zeros, w.zeros)):
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    assert p.format == w.format and p.shape == w.shape
    assert p.nbytes == w.nbytes * (-(-out // 16) * 16) // out
    x = rng.standard_normal((cpu.A8_GEMM_MIN_ROWS + 3, k)).astype(np.float32)
    np.testing.assert_array_equal(_linear_int8act(x, p), _linear_int8act(x, w))


@needs_pack
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
def test_packed_kernel_batch_is_rows_alone(fmt, bits, zp):
    """Rows of x go 16 (int8), 8 and 4 at a time through a packed block (_pk_rows16, 8, 4), the rest one by one
    (_pk_rows1): every output is the same sequence of operations either way, so a batch equals its rows run
    alone, bit for bit. 31 rows: 16 + 8 + 4 + 3 (int8), 8 + 8 + 8 + 4 + 3 (int4)."""
    rng = rng_for("packed batch", fmt)
    w = cpu.PackedWeights(quant.quantize(_weights(rng, 40, 300), bits, 32, zp))
    x = rng.standard_normal((31, 300)).astype(np.float32)
    assert cpu.A8_GEMM_MIN_ROWS > 31  # all 31 rows take the few-row kernel
    batch = _linear_int8act(x, w)
    for n in range(31):
        np.testing.assert_array_equal(batch[n], _linear_int8act(x[n:n + 1], w)[0])


def test_quantize_row_is_the_spec():
    """The packed kernel quantizes x itself (cpu._quantize_row): bit for bit quant.quantize_activations."""
    rng = rng_for("quantize_row")
    G, ng = 32, 7
    x = (rng.standard_normal((3, G * ng)) * 10).astype(np.float32)
    x[1, :G] = 0  # a group of zeros: scale 0, values 0
    x[2, G:2 * G] = np.float32(2.5) * np.arange(G, dtype=np.float32) / 127  # exact halves: ties to even
    x[0, 3 * G + 5] = np.nan  # a NaN: the group's scale is NaN and its values 0, as the spec has them
    x[0, 4 * G:5 * G] = -np.abs(x[0, 4 * G:5 * G])  # the largest magnitude a negative value
    xq, xs, xsum = np.empty(x.shape, np.int8), np.empty((3, ng), np.float32), np.empty((3, ng), np.int32)
    for n in range(3):
        cpu._quantize_row(x, n, G, xq, xs, xsum)
    want_q, want_s = quant.quantize_activations(x, G)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(xs, want_s)
    np.testing.assert_array_equal(xsum, want_q.astype(np.int32).reshape(3, ng, G).sum(-1))


def test_upload_packs_only_for_int8_activations(monkeypatch):
    w = quant.quantize(np.ones((20, 64), np.float32), 4, 32)
    assert isinstance(cpu.upload(w), quant.QuantizedTensor)  # default: float activations, row-major kernels
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    assert isinstance(cpu.upload(w), cpu.PackedWeights) == cpu.PACK
    monkeypatch.setattr(cpu, "PACK", False)
    assert isinstance(cpu.upload(w), quant.QuantizedTensor)


def test_upload_weight_copies_into_weight_memory(monkeypatch):
    """The model's weights are copied (read-only, C-contiguous, the same numbers) into WeightMemory: 64-byte
    boundaries, a large array on a 2 MiB boundary of its own mapping; without huge pages, upload's views."""
    rng = rng_for("upload_weight")
    monkeypatch.setattr(cpu, "HUGE_PAGES", True)
    small = rng.standard_normal((3, 5)).astype(np.float32)
    big = rng.standard_normal((cpu.WeightMemory.CHUNK // 8 + 3, 2)).astype(np.float32)  # over half a chunk
    for a in (small, big, small[:, 1:]):  # a strided view too
        b = cpu.upload_weight(a)
        np.testing.assert_array_equal(b, a)
        assert not b.flags.writeable and b.flags.c_contiguous and b.ctypes.data % 64 == 0
        assert not np.shares_memory(a, b)
    assert cpu.upload_weight(big).ctypes.data % cpu.HUGE_PAGE == 0
    for zp in (False, True):
        qt = quant.quantize(rng.standard_normal((20, 70)).astype(np.float32), 4, 32, zero_point=zp)
        up = cpu.upload_weight(qt)
        assert isinstance(up, quant.QuantizedTensor)
        for name in ("data", "scales", "zeros"):
            a, b = getattr(qt, name), getattr(up, name)
            if a is None:
                assert b is None
                continue
            np.testing.assert_array_equal(b, a)
            assert not b.flags.writeable and not np.shares_memory(a, b)
    stacked = cpu.upload_weight(cpu.Stacked(small, (1, 2)))
    assert stacked.parts == (1, 2)
    np.testing.assert_array_equal(stacked.weight, small)
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    packed = cpu.upload_weight(qt)
    assert isinstance(packed, cpu.PackedWeights) == cpu.PACK
    if cpu.PACK:
        back = packed.unpack()
        for name in ("data", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(back, name), getattr(qt, name))
    monkeypatch.setattr(cpu, "HUGE_PAGES", False)
    ro = cpu.upload(small)
    assert np.shares_memory(cpu.upload_weight(ro), small)


def test_upload_weights_consume_takes_the_layers_out():
    """upload_weights(consume=True), the loader's path: the same placed weights, and the host layers taken out
    of w as they are placed (so their arrays can go before the next layer is copied)."""
    from tinyserve.bench import random_weights, shape_config
    from tinyserve.model import upload_weights

    cfg = shape_config("stories260K")
    kept = upload_weights(random_weights(cfg, seed=3), cpu)
    host = random_weights(cfg, seed=3)
    placed = upload_weights(host, cpu, consume=True)
    assert all(layer is None for layer in host.layers)
    for a, b in zip(kept.layers, placed.layers):
        for name, v in vars(a).items():
            w = getattr(b, name)
            if v is None:
                assert w is None
            else:
                np.testing.assert_array_equal(getattr(v, "weight", v), getattr(w, "weight", w))
    np.testing.assert_array_equal(kept.embed_tokens, placed.embed_tokens)


def test_weight_memory_keeps_every_array():
    """Arrays placed one after another (filling mappings and starting new ones) never overlap, and each keeps
    its values while later ones are written."""
    mem = cpu.WeightMemory()
    mem.CHUNK = 2**16  # small mappings, to cross many of them
    rng = rng_for("arena")
    want, got = [], []
    for i in range(60):
        a = rng.standard_normal(int(rng.integers(1, 6000))).astype(np.float32)
        want.append(a)
        got.append(mem.copy(a))
    for i, (a, b) in enumerate(zip(want, got)):
        np.testing.assert_array_equal(b, a)
        assert b.ctypes.data % 64 == 0
        if i:
            assert not np.shares_memory(b, got[i - 1])
    assert mem.empty((0, 4), np.int8).shape == (0, 4)


def test_pack_and_huge_pages_env_variables():
    import os
    import subprocess
    import sys

    code = "from tinyserve.ops import cpu; print(cpu.PACK, cpu.HUGE_PAGES)"
    env = {**os.environ, "TINYSERVE_PACK": "0", "TINYSERVE_HUGE_PAGES": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _quantize_x(x, G, dtype=np.int8):
    """cpu._quantize_x on rows of x padded to whole groups: (xq, xs, xsum, lanes)."""
    N, ng = x.shape[0], x.shape[1] // G
    xq, xs, xsum = np.empty(x.shape, dtype), np.empty((N, ng), np.float32), np.empty((N, ng), np.int32)
    lanes = np.empty((N, ng * cpu.VNNI_LANES), np.int32)
    cpu._quantize_x(x, G, xq, xs, xsum, lanes)
    return xq, xs, xsum, lanes


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_quantize_x_kernel_is_the_spec(dtype):
    rng = rng_for("qx", np.dtype(dtype).name)
    G, ng = 64, 5
    x = (rng.standard_normal((3, G * ng)) * 10).astype(np.float32)
    x[1, :G] = 0  # a group of zeros: scale 0, values 0
    x[2, G:2 * G] = np.float32(2.5) * np.arange(G, dtype=np.float32) / 127  # exact halves: ties to even
    xq, xs, xsum, lanes = _quantize_x(x, G, dtype)
    want_q, want_s = quant.quantize_activations(x, G)
    np.testing.assert_array_equal(xq, want_q)
    np.testing.assert_array_equal(xs, want_s)
    np.testing.assert_array_equal(xsum, want_q.reshape(3, ng, G).sum(-1))
    # lane l of group g: the values at positions p of the group with p mod 32 in 4l .. 4l + 3 (vpdpbusd's lanes)
    want_lanes = want_q.astype(np.int64).reshape(3, ng, G // 32, 8, 4).sum(axis=(2, 4)).reshape(3, -1)
    np.testing.assert_array_equal(lanes, want_lanes)
    assert np.all(np.abs(x - want_s.repeat(G, axis=1) * want_q) <= want_s.repeat(G, axis=1) / 2 * (1 + 4 * EPS))


@pytest.mark.skipif(not cpu.AVX2, reason="the explicit-vector dot products need AVX2")
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
def test_avx2_group_dots_equal_the_portable_loops(group):
    """_dot_q8_avx2 / _dot_q4_avx2 (LLVM vector code) give the same int32 as the plain Numba loops, extremes
    included (all 127 * 127 products; nibble 15 against +-127)."""
    from numba import njit

    @njit
    def dots(q, x16, p, x8, G, ng):
        out = np.empty((ng, 4), np.int64)
        for g in range(ng):
            out[g, 0] = cpu._dot_q8_avx2(q, x16, g * G, G)
            out[g, 1] = cpu._dot_q8_loop(q, x16, g * G, G)
            out[g, 2] = cpu._dot_q4_avx2(p, g * (G // 2), x8, g * G, G // 2)
            out[g, 3] = cpu._dot_q4_loop(p, g * (G // 2), x8, g * G, G // 2)
        return out

    rng = rng_for("dots", group)
    ng = 3
    q = rng.integers(-127, 128, ng * group, dtype=np.int8)
    x8 = rng.integers(-127, 128, ng * group, dtype=np.int8)
    p = rng.integers(0, 256, ng * group // 2, dtype=np.uint8)
    q[:group], x8[:group], p[: group // 2] = -127, -127, 255  # the largest sums
    got = dots(q, x8.astype(np.int16), p, x8, group, ng)
    np.testing.assert_array_equal(got[:, 0], got[:, 1])
    np.testing.assert_array_equal(got[:, 2], got[:, 3])
    v = quant.unpack_int4(p[None], group)[0].astype(np.int64)
    np.testing.assert_array_equal(got[:, 1], (q.astype(np.int64) * x8).reshape(ng, group).sum(-1))
    np.testing.assert_array_equal(got[:, 3], (v * x8).reshape(ng, group).sum(-1))


@pytest.mark.skipif(not cpu.VNNI, reason="vpdpbusd needs AVX512-VNNI")
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
def test_vnni_kernel_at_the_extremes_is_the_spec(fmt, bits, zp, group):
    """_gemv_a8x4's int32 lanes at their largest: every weight at an end of its range (int8 -128 / -127 /
    127, nibbles 0 / 15, zero points 0 / 15) against x at +-127; the result is the spec's exact group sums up to
    float32 rounding of ng * 8 lane terms (nothing overflows or saturates)."""
    rng = rng_for("a8 extremes", fmt, group)
    out, ng = 6, 3
    k = ng * group
    w = quant.quantize(_weights(rng, out, k), bits, group, zp)
    if bits == 8:
        w.data = rng.choice(np.array([-128, -127, 127], np.int8), w.data.shape)  # Q8_0 from GGUF may hold -128
    else:
        w.data = np.where(rng.random(w.data.shape) < 0.5, 0x00, 0xFF).astype(np.uint8)
        w.data[0] = 0xFF  # a row of 15s
        if zp:
            w.zeros = np.where(rng.random(w.zeros.shape) < 0.5, 0, 15).astype(np.uint8)
    x = np.where(rng.random((2, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    x[0] = -1.0  # a row at -127 throughout
    xq, xs, xsum, lanes = _quantize_x(x, group)
    got = np.empty((2, out), np.float32)
    cpu._gemv_a8x4(xq, xs, lanes, w.data, w.scales, w.zeros if zp else cpu._NO_ZEROS, zp, got, 0, bits)
    want = quant.linear_int8_activations(x, w)
    terms = np.abs(np.repeat(xs, group, axis=1) * xq).astype(np.float64) @ np.abs(
        quant.dequantize(w)).T.astype(np.float64)
    assert np.all(np.abs(got - want) <= 2 * (8 * ng + 2) * EPS * terms), np.max(np.abs(got - want) / terms)


@pytest.mark.skipif(not cpu.VNNI, reason="vpdpbusd needs AVX512-VNNI")
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
@pytest.mark.parametrize("out,k,group,N", [(37, 100, 32, 1), (6, 389, 128, 3), (9, 1000, 256, 2), (4, 64, 64, 1)])
def test_vnni_int8_activation_kernel_equals_the_avx2_one(fmt, bits, zp, out, k, group, N):
    """_gemv_a8x4 (4 rows per step, VNNI, 8 lanes per group) and _gemv_q8a / _gemv_q4a compute the same
    exact int32 group sums and scale them: equal up to the float32 rounding of adding 8 ng lane terms
    against ng group terms, tail rows included."""
    rng = rng_for("a8x4", fmt, out, k, group, N)
    w = quant.quantize(_weights(rng, out, k), bits, group, zp)
    x = cpu._padded(rng.standard_normal((N, k)).astype(np.float32), w.padded_in)
    xq, xs, xsum, lanes = _quantize_x(x, group)
    z = w.zeros if zp else cpu._NO_ZEROS
    a, b = np.empty((N, out), np.float32), np.empty((N, out), np.float32)
    if bits == 8:
        cpu._gemv_q8a(xq.astype(np.int16), xs, w.data, w.scales, a, 2048)
    else:
        cpu._gemv_q4a(xq, xs, xsum, w.data, w.scales, z, zp, a, 2048)
    cpu._gemv_a8x4(xq, xs, lanes, w.data, w.scales, z, zp, b, 4096, bits)
    terms = np.abs(np.repeat(xs, group, axis=1) * xq).astype(np.float64) @ np.abs(np.pad(
        quant.dequantize(w), ((0, 0), (0, w.padded_in - k)))).T.astype(np.float64)
    assert np.all(np.abs(a - b) <= 2 * (8 * w.n_groups + 2) * EPS * terms + 1e-30)


@pytest.mark.skipif(not cpu.VNNI, reason="vpdpbusd needs AVX512-VNNI")
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
def test_vnni_kernel_rows_of_x_in_pairs_equal_each_alone(fmt, bits, zp):
    """_gemv_a8x4 takes rows of x two at a time (_a8_rows4x2) and an odd last one alone (_a8_rows4x1): every
    output is the same sequence of operations either way, so a batch equals its rows run one by one, bit for
    bit (a batch's results must not depend on its other sequences)."""
    rng = rng_for("a8 pairs", fmt)
    out, k, group, N = 11, 200, 64, 5
    w = quant.quantize(_weights(rng, out, k), bits, group, zp)
    x = cpu._padded(rng.standard_normal((N, k)).astype(np.float32), w.padded_in)
    xq, xs, xsum, lanes = _quantize_x(x, group)
    z = w.zeros if zp else cpu._NO_ZEROS
    batch = np.empty((N, out), np.float32)
    cpu._gemv_a8x4(xq, xs, lanes, w.data, w.scales, z, zp, batch, 4096, bits)
    for n in range(N):
        one = np.empty((1, out), np.float32)
        cpu._gemv_a8x4(xq[n:n + 1], xs[n:n + 1], lanes[n:n + 1], w.data, w.scales, z, zp, one, 4096, bits)
        np.testing.assert_array_equal(batch[n], one[0])


def test_int8_activations_do_not_depend_on_thread_count(monkeypatch):

    monkeypatch.setattr(cpu, "SERIAL_BELOW", 0)
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    rng = rng_for("int8act threads")
    x = rng.standard_normal((17, 300)).astype(np.float32)
    ws = [quant.quantize(_weights(rng, 50, 300), b, g, z) for b, g, z in ((8, 64, False), (4, 32, False), (4, 128, True))]
    if cpu.PACK:  # and the same weights packed (cpu.PackedWeights)
        ws += [cpu.PackedWeights(w) for w in ws]

    def run():  # 17 rows of int8 weights: the AMX kernel where the CPU has it
        return [cpu.linear(x[:n], w) for w in ws for n in (1, 3, 17)]

    one, many = with_threads(1, run), with_threads(MANY_THREADS, run)
    monkeypatch.setattr(cpu, "SERIAL_BELOW", 2**62)  # the serial twins: the same results
    serial = with_threads(MANY_THREADS, run)
    for a, b, c in zip(one, many, serial):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.skipif(not cpu.AMX, reason="no AMX int8 tiles on this CPU (or TINYSERVE_AMX=0)")
@pytest.mark.parametrize("N", [8, 16, 17, 31])
@pytest.mark.parametrize("out,k,group", [(37, 100, 32), (19, 200, 64), (33, 389, 128), (16, 300, 256), (50, 768, 128)])
def test_amx_kernel_matches_the_vnni_kernel(monkeypatch, N, out, k, group):
    """The AMX tiles (int8 weights, int8 activations, 8-31 rows) against the VNNI kernel on the same int8 x:
    the same exact integer group sums, scaled and added in another order (float32 rounding only)."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    rng = rng_for("amx", N, out, k, group)
    w = quant.quantize(_weights(rng, out, k), 8, group)
    x = (rng.standard_normal((N, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    amx = cpu.linear(x, w)
    monkeypatch.setattr(cpu, "AMX", False)
    vnni = cpu.linear(x, w)
    assert np.max(np.abs(amx - vnni)) <= 8 * (w.n_groups + 2) * EPS * np.max(np.abs(vnni)), np.max(np.abs(amx - vnni))


@pytest.mark.skipif(not (cpu.AMX and cpu.PACK), reason="no AMX int8 tiles or no AVX-512 VNNI here")
@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
@pytest.mark.parametrize("N", [8, 13, 16, 17, 31])
@pytest.mark.parametrize("out,k,group", [(37, 100, 32), (19, 200, 64), (33, 389, 128), (16, 300, 256), (50, 768, 128)])
def test_packed_tiles_equal_the_packed_vnni_kernel(monkeypatch, N, out, k, group, fmt, bits, zp):
    """Packed weights on AMX tiles (_gemv_pk_tiles, 8+ rows; int4 unpacked into a buffer the tile loads)
    against the packed VNNI kernel: the same exact sums, started, converted and multiply-added in the same
    order, so bit for bit the same outputs."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    rng = rng_for("packed tiles", N, out, k, group, fmt)
    w = cpu.PackedWeights(quant.quantize(_weights(rng, out, k), bits, group, zp))
    x = (rng.standard_normal((N, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    x[0, :group] = 0  # an all-zero group of x: scale 0
    tiles = cpu.linear(x, w)
    monkeypatch.setattr(cpu, "AMX", False)
    np.testing.assert_array_equal(tiles, cpu.linear(x, w))


@pytest.mark.skipif(not (cpu.AMX and cpu.PACK), reason="no AMX int8 tiles or no AVX-512 VNNI here")
@pytest.mark.parametrize("fmt,bits,zp", [Q_FORMATS[0], Q_FORMATS[-1]], ids=[Q_FORMATS[0][0], Q_FORMATS[-1][0]])
@pytest.mark.parametrize("runs", [1, 2, 3, 100])
def test_packed_tiles_do_not_depend_on_how_blocks_are_split(monkeypatch, runs, fmt, bits, zp):
    """The tile kernel splits the blocks into runs (one per thread, each loading the tile configuration
    once): any split, more runs than blocks too, gives the packed VNNI kernel's outputs bit for bit (17 rows
    of x: a pass of 16 and one of a single row, padded)."""
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    monkeypatch.setattr(cpu, "TILE_RUNS", runs)
    rng = rng_for("packed tile runs", runs, fmt)
    w = cpu.PackedWeights(quant.quantize(_weights(rng, 83, 256), bits, 64, zp))
    x = rng.standard_normal((17, 256)).astype(np.float32)
    tiles = cpu.linear(x, w)
    monkeypatch.setattr(cpu, "AMX", False)
    np.testing.assert_array_equal(tiles, cpu.linear(x, w))


@pytest.mark.parametrize("N,k,group", [(1, 32, 32), (5, 100, 32), (16, 384, 128), (3, 512, 256)])
def test_amx_x_is_quantize_x_in_the_tile_layout(N, k, group):
    """_amx_x quantizes x exactly as _quantize_x does (the VNNI path's x), only laid out for tdpbssd."""
    rng = rng_for("amx_x", N, k, group)
    kp = -(-k // group) * group
    xp = np.zeros((N, kp), np.float32)
    xp[:, :k] = rng.standard_normal((N, k)) * np.exp(rng.standard_normal(k))
    xp[0, :group] = 0  # an all-zero group: scale 0, values 0
    xq, xs, _, _ = _quantize_x(xp, group)
    xv = np.empty((kp // 4, N, 4), np.int8)
    xsT = np.empty((kp // group, N), np.float32)
    cpu._amx_x(xp, 0, group, xv, xsT)
    np.testing.assert_array_equal(xv.transpose(1, 0, 2).reshape(N, kp), xq)
    np.testing.assert_array_equal(xsT.T, xs)


def test_amx_env_variable():
    import os
    import subprocess
    import sys

    code = "from tinyserve.ops import cpu; print(cpu.AMX)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TINYSERVE_AMX": "0"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_activations_setting_is_checked(monkeypatch):
    monkeypatch.setattr(cpu, "ACTIVATIONS", "int4")
    w = quant.quantize(np.ones((4, 32), np.float32), 8, 32)
    with pytest.raises(ValueError, match="ACTIVATIONS"):
        cpu.linear(np.ones((1, 32), np.float32), w)


def test_int8_activations_env_variable():
    import subprocess
    import sys

    code = "from tinyserve.ops import cpu; print(cpu.ACTIVATIONS)"
    for env, want in (("1", "int8"), ("0", "float32"), ("", "float32")):
        import os

        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TINYSERVE_INT8_ACTIVATIONS": env},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == want, (env, out)


@pytest.mark.parametrize("fmt,bits,zp", Q_FORMATS, ids=[f[0] for f in Q_FORMATS])
def test_linear_int8_activations_within_table_limits(fmt, bits, zp):
    """The rows ("op", "linear_int8_act", int8 / int4) of tinyserve/tolerances.py, on a Llama-like width."""
    from tinyserve.tolerances import op_limits

    rng = rng_for("int8act table", fmt)
    w = quant.quantize((rng.standard_normal((64, 2048)) * 0.02).astype(np.float32), bits, 128, zp)
    x = rng.standard_normal((2, 2048)).astype(np.float32)
    got = _linear_int8act(x, w).astype(np.float64)
    ref = x.astype(np.float64) @ quant.dequantize(w).T.astype(np.float64)
    lim = op_limits("linear_int8_act", fmt.split("-")[0])
    assert ((got - ref) ** 2).sum() / (ref ** 2).sum() <= lim["nmse"]
    assert np.abs(got - ref).max() / np.abs(ref).max() <= lim["max_rel"]


PORTABLE_CHECK = """
import numpy as np
from tinyserve import quant
from tinyserve.ops import cpu
assert not (cpu.AVX2 or cpu.AVX512 or cpu.FMA or cpu.VNNI), "the generic CPU was not selected"
rng = np.random.default_rng(5)
worst = 0.0
for bits, G, zp in ((8, 32, False), (4, 64, False), (4, 128, True)):
    w = quant.quantize(rng.standard_normal((13, 300)).astype(np.float32), bits, G, zp)
    for N in (1, 3, 6):  # 6: the register tiles (4 rows of x) and two rows alone
        x = rng.standard_normal((N, 300)).astype(np.float32)
        exact = x.astype(np.float64) @ quant.dequantize(w).T.astype(np.float64)
        terms = np.abs(x).astype(np.float64) @ np.abs(quant.dequantize(w)).T.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(cpu.linear(x, w) - exact) / terms)))
        cpu.ACTIVATIONS = "int8"
        spec = quant.linear_int8_activations(x, w)
        worst = max(worst, float(np.max(np.abs(cpu.linear(x, w) - spec) / terms)))
        cpu.ACTIVATIONS = "float32"
        if bits == 4 and G == 128:  # the int4 digits kernel (vpdpbusd's generic form here), called directly
            xp, y = cpu._padded(x, w.padded_in), np.empty((N, 13), np.float32)
            z, asym = cpu._quant_zeros(w)
            cpu._gemv_q4(xp, cpu._weight(w.data), cpu._weight(w.scales), z, asym, y, 0, True)
            worst = max(worst, float(np.max(np.abs(y - exact) / terms)))
print(worst)
"""


def test_portable_kernels_on_a_cpu_without_avx(tmp_path):
    """The forms of the matrix-vector kernels for CPUs without AVX2, AVX-512, FMA or VNNI (the explicit-vector
    intrinsics' generic branches, the plain integer loops, the int4 digits kernel's generic vpdpbusd) give the
    reference's results: compiled for LLVM's generic x86-64 CPU in a subprocess (NUMBA_CPU_NAME=generic; its
    own kernel cache)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    # float32 rounding of ~75-300 terms (sums of |x w|): far below 1e-5 of them
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("fmt,bits,zp", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("N", [1, 5, 33])
def test_stacked_linear_equals_its_parts(fmt, bits, zp, N):
    """ops.Stacked (model.stack_projections): one product over the stacked matrix gives, for each part, exactly
    what the part alone gives on the cpu backend (each output is the same dot product, on the same kernel
    path), as contiguous arrays. The reference backend's BLAS blocks a product by its shape, so there the
    parts agree up to float32 rounding."""
    from tinyserve.model import LayerWeights, layer_matrix, stack_projections
    from tinyserve.ops import Stacked

    rng = rng_for("stacked", fmt, N)
    k = 200
    mats = [_weights(rng, o, k) for o in (24, 8, 8)]
    if bits is not None:
        mats = [quant.quantize(m, bits, 64, zp) for m in mats]
    biases = [rng.standard_normal(m.shape[0]).astype(np.float32) for m in mats]
    d = np.ones(k, np.float32)
    layer = LayerWeights(d, *mats, o_proj=mats[0], post_attention_layernorm=d, gate_proj=mats[1], up_proj=mats[2],
                         down_proj=mats[0], q_bias=biases[0], k_bias=None, v_bias=biases[2])
    stacked = stack_projections(layer)
    assert isinstance(stacked.qkv_proj, Stacked) and stacked.q_proj is None and stacked.qkv_proj.parts == (24, 8, 8)
    for n, m in zip(("q_proj", "k_proj", "v_proj"), mats):  # the parts are still there, as views
        got = layer_matrix(stacked, n)
        np.testing.assert_array_equal(got if bits is None else got.data, m if bits is None else m.data)
    x = rng.standard_normal((N, k)).astype(np.float32)
    for ops in (cpu, reference):
        parts = ops.linear(x, ops.upload(stacked.qkv_proj), stacked.qkv_bias)
        want = [ops.linear(x, m, b) for m, b in zip(mats, (biases[0], None, biases[2]))]
        assert len(parts) == 3
        for got, w, m in zip(parts, want, mats):
            assert got.flags.c_contiguous
            if ops is cpu:
                np.testing.assert_array_equal(got, w)
            else:
                tol = 2 * (k + 2) * EPS * (np.abs(x) @ _magnitude(m).T) + 1e-30
                assert np.all(np.abs(got - w) <= tol)


@needs_pack
@pytest.mark.parametrize("bits,zp", [(8, False), (4, False), (4, True)])
@pytest.mark.parametrize("N", [2, 5, 16, 17])
def test_packed_stacked_parts_written_in_place(monkeypatch, bits, zp, N):
    """Stacked packed weights with the int8-activation option and a batch: each part is written straight into
    its own C-contiguous array (cpu._packed_parts, parts multiples of 16), bit for bit the split of the whole
    product and the part alone, biases included."""
    from tinyserve.ops import Stacked, split_columns

    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    rng = rng_for("packed parts", bits, zp, N)
    k, parts = 300, (48, 16, 32)
    whole = quant.quantize(_weights(rng, sum(parts), k), bits, 64, zp)
    stacked = Stacked(cpu.PackedWeights(whole), parts)
    bias = rng.standard_normal(sum(parts)).astype(np.float32)
    x = rng.standard_normal((N, k)).astype(np.float32)
    got = cpu.linear(x, stacked, bias)
    assert cpu._packed_parts(x, stacked, bias) is not None  # the in-place path ran
    want = split_columns(cpu.linear(x, cpu.PackedWeights(whole), bias), parts)
    for g, w in zip(got, want):
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(g, w)


@needs_pack
@pytest.mark.parametrize("bits,zp", [(8, False), (4, False), (4, True)])
@pytest.mark.parametrize("k,group", [(256, 64), (300, 64)])
def test_one_packed_row_is_the_general_path(monkeypatch, bits, zp, k, group):
    """One row through packed weights (cpu._one_row, the decode step's short path; k = 300 is not whole
    groups, so it falls back to the general path): bit for bit linear's general path, alone and stacked,
    with and without biases; stacked parts are C-contiguous."""
    from tinyserve.ops import Stacked, split_columns

    monkeypatch.setattr(cpu, "ACTIVATIONS", "int8")
    rng = rng_for("one packed row", bits, zp, k)
    parts = (48, 16, 37)
    whole = quant.quantize(_weights(rng, sum(parts), k), bits, group, zp)
    pw = cpu.PackedWeights(whole)
    bias = rng.standard_normal(sum(parts)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    assert (cpu._one_row(x, pw, None) is None) == (k % group != 0)
    general = np.empty((1, sum(parts)), np.float32)
    cpu._linear_packed(cpu._padded(x, pw.padded_in), pw, general)
    for b in (None, bias):
        want = general if b is None else general + b
        np.testing.assert_array_equal(cpu.linear(x, pw, b), want)
        got = cpu.linear(x, Stacked(pw, parts), b)
        for g, w in zip(got, split_columns(want, parts)):
            assert g.flags.c_contiguous
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("fmt", ["float32", "int8", "int4", "int4-asym"])
@pytest.mark.parametrize("k,group", [(256, 64), (300, 64)])
def test_one_row_is_the_general_path(monkeypatch, fmt, k, group):
    """One row through row-major weights with float activations (cpu._one_row): bit for bit linear's general
    path (which a row of x that is not C-contiguous takes, to the same kernel), alone and stacked, with a bias."""
    from tinyserve.ops import Stacked, split_columns

    monkeypatch.setattr(cpu, "ACTIVATIONS", "float32")
    rng = rng_for("one row", fmt, k)
    parts = (48, 16, 37)
    w = _weights(rng, sum(parts), k)
    if fmt != "float32":
        w = quant.quantize(w, 8 if fmt == "int8" else 4, group, fmt == "int4-asym")
    w = cpu.upload(w)
    bias = rng.standard_normal(sum(parts)).astype(np.float32)
    x = rng.standard_normal((1, k)).astype(np.float32)
    assert (cpu._one_row(x, w, None) is None) == (fmt != "float32" and k % group != 0)
    general = cpu.linear(np.repeat(x, 2, axis=1)[:, ::2], w)  # not C-contiguous: the general path, same kernel
    np.testing.assert_array_equal(cpu.linear(x, w, bias), general + bias)
    for g, want in zip(cpu.linear(x, Stacked(w, parts), bias), split_columns(general + bias, parts)):
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(g, want)


def test_stacking_keeps_different_formats_apart():
    """A GGUF file may hold q, k and v in different formats: those stay separate matrices."""
    from tinyserve.model import LayerWeights, stack_projections

    rng = rng_for("stack formats")
    q8 = quant.quantize(_weights(rng, 16, 64), 8, 32)
    q4 = quant.quantize(_weights(rng, 16, 64), 4, 32)
    d = np.ones(64, np.float32)
    layer = stack_projections(LayerWeights(d, q8, q4, q8, q8, d, q4, q4, q8))
    assert layer.qkv_proj is None and layer.q_proj is q8  # int8 and int4 mixed: apart
    assert layer.gate_up_proj is not None and layer.gate_proj is None  # both int4: stacked


def test_exp_within_one_ulp():
    """cpu._exp (swiglu, attention's softmax) against the exact exp on 2e6 values over its whole range."""
    from numba import njit

    @njit
    def apply(a, out):
        for i in range(a.shape[0]):
            out[i] = cpu._exp(a[i])

    x = np.linspace(float(cpu.EXP_LO), float(cpu.EXP_HI), 2_000_001, dtype=np.float32)
    got = np.empty_like(x)
    apply(x, got)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 1.0, ulps.max()  # measured 0.99 (NumPy's float32 exp: 2.54)
    special = np.array([np.nan, np.inf, -np.inf, 89.0, -88.0, -1e30, 0.0, -0.0], np.float32)
    got = np.empty_like(special)
    apply(special, got)
    np.testing.assert_array_equal(got, [np.nan, np.inf, 0.0, np.inf, 0.0, 0.0, 1.0, 1.0])
