"""The CPU backend: Numba kernels with the names and signatures of ops/reference.py.

Each op is two pieces:

- a kernel, `@njit(parallel=True, cache=True)`, that takes only arrays and scalars. It parallelizes with
  `prange` over independent outputs (weight rows, tokens, (token, kv head) pairs) and never splits a sum
  across threads, so its result does not depend on the number of threads;
- a thin public wrapper that checks dtypes and shapes, allocates the output and picks the kernel.

Linear layers (the time of a step) have two paths:

- few rows (decode, batches of up to 31 for quantized weights, 63 on AMD Zen): a matrix-vector product per
  weight row, reading each weight byte once. Memory bandwidth is the ceiling; the kernels stream the weights' own
  format (float32, int8, packed int4) and never materialize a dequantized matrix. The quantized ones take
  4 weight rows at a time through intrinsics that write LLVM vector code (_q8_rows4, _q4_rows4, _a8_block;
  helpers in _Gen): on this hardware the speed from memory follows the instructions issued per byte
  (docs/performance.md). Batches go four rows of x at a time through register tiles (_q8_tile4,
  _q4_tile4) that convert each weight once for the four.
- many rows (prefill, big batches): weight rows are dequantized a panel at a time into a small float32
  buffer that stays in cache, then multiplied with register-tiled 4x4 blocks (4 tokens x 4 weight rows
  share every load). float32 weights use the same tiled kernel without the dequantization (NumPy's BLAS
  is an option, GEMM_F32).

Numerics: every quantized kernel computes dequantize(W) @ x in float32 (the same products, summed in
another order), so results match ops/reference.py to float32 rounding (tests/test_ops_cpu.py gives the
tolerances and why). The one exception is an option, off by default: ACTIVATIONS = "int8" (or
TINYSERVE_INT8_ACTIVATIONS=1) rounds x to int8 per group in the few-row path of quantized layers (decode,
batches below A8_GEMM_MIN_ROWS) and uses integer dot products (faster; bounded error, see _gemv_q8a,
_gemv_a8x4 and quant.linear_int8_activations); weights loaded with the option are packed (PackedWeights) and,
on CPUs with AMX, batches of 8 or more rows (int4: 12) run on its tiles (_gemv_pk_tiles, bit for bit the
packed VNNI kernel's results; row-major int8 weights: _gemm_a8_amx). Kernels allow reassociation and FMA
contraction so that LLVM can vectorize their sums; nothing else is relaxed (no approximate reciprocals, NaN
and inf as in NumPy; see REDUCE). exp is computed by _exp, within 1 ulp of the exact value (NumPy's own
float32 exp: 2.5 ulp). The KV cache may be float16 (kv_dtype): kv_write and attention take it as uint16 bits.

Weights: the model's weights are copied at load into memory of 2 MiB pages (upload_weight, WeightMemory;
TINYSERVE_HUGE_PAGES=0 keeps them in place), where a decode step's stream of them costs fewer TLB misses.

docs/performance.md has the measured speeds and the alternatives that were tried; NUMBA_NOTES.md (shared)
has the facts about Numba on these machines that shaped the code (int32 casts, slicing before loops,
runtime group sizes, GOMP_SPINCOUNT).
"""

from __future__ import annotations

import functools
import mmap
import os

# How long libgomp's worker threads spin, waiting for the next parallel region, before they sleep. The
# default (very long) spin starves OpenBLAS's threads (alternating Numba and BLAS calls ran ~7x slower,
# NUMBA_NOTES); too short a spin lets them fall asleep in the few microseconds of Python between two
# kernels of a decode step, and waking them costs 15-30 us per parallel call. Measured 2026-11-28, quiet
# machine, stories110M int8 decode at batch 1: 1000 spins 84.7 tok/s, 10000 spins 165.5 (llama-1b: the
# same, its calls are long). This backend does not call BLAS. Must precede numba's import.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import time  # noqa: E402
import types as pytypes  # noqa: E402

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from llvmlite.binding import llvm_version_info  # noqa: E402
from numba import config as numba_config, njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from ..quant import QuantizedTensor, pack_int4, unpack_int4  # noqa: E402
from . import Stacked, split_columns  # noqa: E402

# Reassociation (and FMA contraction) lets LLVM split a float sum into vector lanes. Results then depend on
# the vector width of the machine, never on the number of threads. Not "nsz" (ignore the sign of zero),
# although it is in the usual set: with it, some kernels freshly compiled and the same kernels loaded from
# Numba's cache rounded differently (LLVM optimized them differently: seen in attention and in the int4
# matrix-vector kernel), so the first run of a program and the later ones differed in the last bit.
# Without it every kernel agrees with its cached self (tests/test_determinism.py, docs/performance.md).
REDUCE = {"reassoc", "contract"}
f32 = np.float32
i32 = np.int32
# dtype objects, for the wrappers' fast paths: comparing a dtype with a dtype is cheap, with a type (np.float32)
# it builds a dtype first
F32_DTYPE, I64_DTYPE = np.dtype(np.float32), np.dtype(np.int64)
CACHE_DTYPES = (F32_DTYPE, np.dtype(np.float16))

# A linear layer with at least this many rows (tokens) uses the tiled matrix-matrix kernels; fewer rows
# use the matrix-vector kernels, which read each weight once per row of x and never unpack a panel.
# float32 weights:
GEMM_MIN_ROWS = 4
# Quantized weights stay on the matrix-vector kernels up to 31 rows (63 on AMD Zen): they take rows of x four at
# a time through a register tile (_q8_tile4, _q4_tile4: each weight converted once for 4 rows of x), which
# beats the tiled panel kernel up to ~32 rows (fourth session, 2 threads, GFLOP/s tile / panel):
#   int8, stories110M 2048 x 768: 4 rows 158 / 87, 8 rows 166 / 114, 16 rows 178 / 149, 24 rows 183 / 165,
#         32 rows 169 / 173, 64 rows 167 / 184 (Llama-3.2-1B 2048 x 8192 and 8192 x 2048 alike);
#   int4, 2048 x 768: 4 rows 179 / 68, 8 rows 190 / 98, 16 rows 186 / 122, 32 rows 136-192 / 118-151, 64 rows
#         188 / 170; 8192 x 2048: 4 rows 181 / 62, 16 rows 171 / 122, 32 rows 179-188 / 147-153.
# (Before the tiles, int4 crossed over at 8 rows and int8 at 4.) Prefill takes the panel kernels: with
# hundreds of rows, x no longer stays in cache while a block of weights meets all of it. That is with
# AVX-512; on CPUs without it the tiles cross over at 8 rows, on AMD Zen at ~96 (see where AVX512 is set below).
GEMM_MIN_ROWS_Q8 = GEMM_MIN_ROWS_Q4 = 32
# With int8 activations (ACTIVATIONS = "int8") the integer matrix-vector kernels stay faster than the tiled
# float kernels up to ~32 rows (stories110M shapes, 2 threads, GFLOP/s tiled / integer: 4 rows 84-96 /
# 147-181, 16 rows 142-168 / 168-202, 32 rows 170-189 / 187-191; int4 alike), so a decode batch of up to 31
# sequences takes them too. Prefill (more rows) stays on the tiled kernels, in float.
A8_GEMM_MIN_ROWS = 32


def panel_rows(kp: int) -> int:
    """Weight rows the tiled kernels dequantize together: a panel of rows x Kp float32 stays in L2 (here
    2 MiB) while every 4-token block of x passes over it. Taller panels mean fewer passes over x (each
    panel reads all of x once); 64 rows up to 1 MiB, else 32 (measured best, docs/performance.md)."""
    return 64 if kp * 4 * 64 <= 2**20 else 32


# Calls that touch fewer bytes than this (weights and activations read) run their kernel's serial twin on
# the calling thread.
# During decode the other threads fall asleep between parallel calls (GOMP_SPINCOUNT is short on purpose),
# and waking them costs 15-30 us, more than the whole of a small op: an int8 288x768 GEMV (221K values)
# takes ~10 us on one thread. Measured 2026-11-28 on the quiet machine (decode tokens/s), with the
# threshold counted in values (one value = one weight of any format, or one float32 activation):
#   threshold (values)   16K    64K   128K   256K   512K
#   stories260K f32     1722   2963   3204   3155   2804
#   stories15M int8      309    328    431    683    694
# but float32 stories15M fell from 558 to 433 at 256K values (its 288x768 GEMV, 885 KB, is faster on two
# threads): the cost is the bytes read, so the threshold counts bytes, 256 KiB.
# stories110M (768-wide matrices, 590K+ weights) did not change. Results do not depend on the threshold.
SERIAL_BELOW = 2**18  # bytes


def _run(kernel, work, *args):
    """kernel(*args), or its serial twin when `work` (bytes the call reads) is below SERIAL_BELOW.

    The choice depends on the size of the work only, never on the thread count, so a given call runs the
    same compiled code whatever the number of threads (deterministic mode, docs/validation.md).
    """
    return (kernel if work >= SERIAL_BELOW else kernel.serial)(*args)


def parallel_kernel(fastmath=False):
    """@njit(parallel=True, cache=True) plus a serial twin compiled from the same function (kernel.serial).

    A parallel launch costs a few microseconds even on one thread (and 15-30 us when another process
    holds the second core); the serial twin of a small op costs ~0.3 us. Both compute every output the
    same way (the kernels parallelize over independent outputs), prange simply runs as range.
    """

    def deco(fn):
        kernel = njit(parallel=True, cache=True, fastmath=fastmath)(fn)
        # The twin is a copy of the function under another name: Numba's on-disk cache is keyed by the
        # function's qualified name, and two builds of one name would overwrite each other's cache entry.
        twin = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        # error_model="numpy": a float division by zero gives inf or nan as in NumPy, as it does in the
        # parallel build (Numba's default there). Python's model (the default of a serial njit) checks every
        # divisor and raises, and that branch keeps LLVM from vectorizing any loop that divides: the serial
        # swiglu ran a value at a time, 14x slower than the same loop in the parallel build.
        kernel.serial = njit(cache=True, fastmath=fastmath, error_model="numpy")(twin)
        return kernel

    return deco


# ----------------------------------------------------------------------------------------------- arrays
def upload(a):
    """Arrays are used where they are (no copy); float32 arrays and quantized tensors become read-only views,
    the form every kernel takes weights in (see _weight), so no call has to make the view again. The model's
    weights go through upload_weight instead."""
    return _placed(a, None)


def upload_weight(a):
    """A weight of the model (model.upload_weights), in the form upload gives, placed in weight memory: a
    read-only copy in 2 MiB pages (WeightMemory; without huge pages, upload's views). With int8 activations
    (ACTIVATIONS = "int8" when the model loads) on AVX-512 VNNI machines, quantized tensors are repacked
    (PackedWeights): the same numbers in the layout those kernels stream fastest."""
    return _placed(a, _WEIGHTS if HUGE_PAGES else None)


def _placed(a, memory):
    """upload's and upload_weight's work: a in the form the kernels take it, its arrays kept where they are
    (memory None: read-only views, _weight) or copied into memory (a WeightMemory)."""
    if isinstance(a, Stacked):
        return Stacked(_placed(a.weight, memory), a.parts)
    keep = _weight if memory is None else memory.copy
    if isinstance(a, np.ndarray) and a.dtype == np.float32:
        return keep(a)
    if isinstance(a, QuantizedTensor) and PACK and ACTIVATIONS == "int8":
        return PackedWeights(a, memory)  # the int8-activation kernels' own layout
    if isinstance(a, QuantizedTensor):
        return QuantizedTensor(a.bits, a.group_size, a.shape, keep(a.data), keep(a.scales),
                               None if a.zeros is None else keep(a.zeros))
    return a


# A decode step streams every weight once from memory, and each 4 KiB page of it costs a TLB miss and a page
# walk (two-dimensional in a virtual machine); 2 MiB pages ("transparent huge pages", Linux) cost 512x fewer.
# NumPy asks for them (madvise) only for allocations of 4 MiB and up, and even then the first and last partial
# 2 MiB of an array that does not start on a 2 MiB boundary stay in small pages: the 1B shape's q/k/v and
# o matrices in int4 (2-3 MiB) got none, its 17 MiB gate/up ~85%. Read with the plain read kernel, one call
# per array (2026-11-29): 150 arrays of 4 MiB 18.5 GB/s as NumPy allocates them, 25.6 GB/s on 2 MiB
# boundaries in 2 MiB pages, against 30.2 for one 600 MB array; 37 of 16 MiB 26.4 -> 29.5. So the model's
# weights are copied at load into memory mapped for 2 MiB pages (docs/performance.md, "Ninth session").
# TINYSERVE_HUGE_PAGES=0 keeps them where they are (a memory-mapped checkpoint then stays shared, unread
# until used); on machines without transparent huge pages the copy would gain nothing and is not made.
def _huge_pages_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode and hasattr(mmap, "MADV_HUGEPAGE")


HUGE_PAGES = os.environ.get("TINYSERVE_HUGE_PAGES", "1") != "0" and _huge_pages_available()
HUGE_PAGE = 2**21


def _huge_mapping(nbytes: int) -> np.ndarray:
    """A writable uint8 array of nbytes (rounded up to whole cache lines) starting on a 2 MiB boundary of an
    anonymous mapping marked for 2 MiB pages; the mapping lives as long as any array made from it."""
    n = -(-nbytes // 64) * 64
    # private: a shared anonymous mapping (mmap's default) is shmem, which transparent huge pages do not serve
    m = mmap.mmap(-1, n + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # a kernel without it: small pages, still correct
        pass
    raw = np.frombuffer(m, np.uint8)
    off = (-raw.ctypes.data) % HUGE_PAGE
    return raw[off:off + n]


class WeightMemory:
    """Where upload_weight puts the model's weights: one after the other (each on a 64-byte boundary) in
    64 MiB mappings of 2 MiB pages, an array of more than half that in a mapping of its own. Weights are
    never freed one by one: a mapping goes when the last array in it does (and the one still being filled
    when it is full)."""

    CHUNK = 2**26

    def __init__(self):
        self._rest = np.empty(0, np.uint8)  # the unused end of the mapping being filled

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        step = -(-n // 64) * 64
        if step > self.CHUNK // 2:
            raw = _huge_mapping(n)
        else:
            if step > self._rest.size:
                self._rest = _huge_mapping(self.CHUNK)
            raw, self._rest = self._rest[:step], self._rest[step:]
        return raw[:n].view(dtype).reshape(shape)

    def copy(self, a: np.ndarray) -> np.ndarray:
        """A read-only C-contiguous copy of a in weight memory."""
        out = self.empty(a.shape, a.dtype)
        out[...] = a
        out.flags.writeable = False
        return out


_WEIGHTS = WeightMemory()


def download(a) -> np.ndarray:
    return np.asarray(a)


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


# =========================================================================== linear: matrix-vector kernels
def _host_has(*features: str) -> bool:
    """Whether the CPU Numba compiles for has every one of these LLVM features (e.g. "avx2")."""
    from llvmlite import binding as ll
    from numba.core import config

    if config.CPU_NAME or config.CPU_FEATURES:  # NUMBA_CPU_NAME / NUMBA_CPU_FEATURES: compiling for another CPU
        return all("+" + f in (config.CPU_FEATURES or "") for f in features)
    try:
        host = ll.get_host_cpu_features()
        return all(host.get(f, False) for f in features)
    except Exception:  # not x86, or features unknown
        return False


def _host_cpu_name() -> str:
    """LLVM's name for the CPU Numba compiles for (e.g. "sapphirerapids", "znver4"); "" if unknown."""
    from llvmlite import binding as ll
    from numba.core import config

    if config.CPU_NAME:  # NUMBA_CPU_NAME: compiling for another CPU
        return config.CPU_NAME
    try:
        return ll.get_host_cpu_name()
    except Exception:
        return ""


# AMD Zen CPUs (LLVM's znver*; znver4 measured): their hardware prefetchers serve some streams better than
# the software prefetches tuned on the Intel machine (PREFETCH_PK4_ONE_ROW, ATTENTION_PREFETCH).
ZEN = _host_cpu_name().startswith("znver")

# What the explicit-vector kernels may use: FMA (their multiply-adds, _Gen.muladd), AVX-512 (_q4_rows4's
# table lookup), AVX2 (vpmaddwd / vpmaddubsw on 256-bit registers in the int8-activation kernels) and
# AVX512-VNNI with its 256-bit forms (vpdpbusd); elsewhere generic forms or the portable loops.
AVX2 = _host_has("avx2")
AVX512 = _host_has("avx512f")
FMA = _host_has("fma")
VNNI = AVX2 and _host_has("avx512vnni", "avx512vl")
if not AVX512:
    # The register tiles' 16 accumulators of 16 float32 lanes fill AVX-512's 32 registers; with 16 256-bit
    # registers they spill. Compiled for Haswell (AVX2, FMA; NUMBA_CPU_NAME=haswell with its features, run on
    # the Sapphire Rapids machine), 2048 x 768, GFLOP/s tile / panel: int8 4 rows 70 / 59, 8 rows 75 / 74,
    # 16 rows 72 / 84; int4 4 rows 65 / 61, 8 rows 66 / 82, 16 rows 67 / 97.
    GEMM_MIN_ROWS_Q8 = GEMM_MIN_ROWS_Q4 = 8
elif ZEN:
    # On AMD Zen 4 the tiles stay ahead of the panel kernel further (fifteenth session, after the int8 tile
    # began summing groups before scaling; 1B shapes, copies past the caches, 2 threads, ms tile / panel):
    # int8 8192 x 2048 32 rows 5.67 / 6.54, 48 rows 8.70 / 9.34, 64 rows 11.42 / 12.29, 96 rows 18.7 / 19.8,
    # 128 rows 27.5 / 27.0, 256 rows 52.3 / 49.9; 2048 x 8192 32 rows 5.67 / 6.66, 64 rows 12.47 / 13.06;
    # int4 8192 x 2048 32 rows 5.69 / 6.47, 48 rows 8.05 / 9.44, 64 rows 12.39 / 13.91, 96 rows 17.4 / 16.5.
    GEMM_MIN_ROWS_Q8 = GEMM_MIN_ROWS_Q4 = 64


# LLVM IR for the explicit-vector kernels (intrinsics): types and helpers.
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _llvm_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


class _Gen:
    """What the code generators of the explicit-vector kernels share: loads from Numba arrays, splats,
    multiply-adds, prefetches, and the sum of a vector's lanes in one fixed order.

    Used inside an @intrinsic's codegen(context, builder, sig, args); `T` is the integer type of the
    kernel's indices.
    """

    def __init__(self, context, builder, T):
        self.context, self.b, self.T = context, builder, T

    def const(self, v):
        return ir.Constant(self.T, v)

    def data(self, aty, arr):
        """The element pointer of a Numba array (aty: its Numba type)."""
        return self.context.make_array(aty)(self.context, self.b, arr).data

    def load(self, aty, arr, idx, ety, align=1):
        """arr[idx] read as ety (a vector starting there, or a scalar); no bounds check."""
        ptr = self.b.gep(self.data(aty, arr), [idx])
        return self.b.load(self.b.bitcast(ptr, ety.as_pointer()), align=align)

    def block_rows(self, start, stride, srow, ng, sstride=None):
        """The 4 weight rows of a block: where row r starts in the data, start + r * stride, and in the flat
        (O * ng) scales and zero points, (srow + r * sstride) * ng (sstride 1 unless given; a stride of 0
        repeats one row, for the last rows of a matrix)."""
        b, r4 = self.b, [self.const(r) for r in range(4)]
        rows = [b.add(start, b.mul(stride, r)) for r in r4]
        srows = [b.mul(b.add(srow, r if sstride is None else b.mul(sstride, r)), ng) for r in r4]
        return rows, srows

    def splat(self, v, vty):
        """A vector of type vty with every lane v."""
        u = self.b.insert_element(ir.Constant(vty, None), v, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(u, u, ir.Constant(_vec(_I32, vty.count), [0] * vty.count))

    def sum_starts(self, asym, is8, zero_points, body):
        """Emit body(start_of) for the packed kernels' integer sums, which start at -zero * xsum to take off
        what the stored bytes carry on top of the weight integers: start_of(-xsum) is that start as 16 int32
        lanes, one per weight row. With zero points (asym) a vector multiply by zero_points() (the rows'
        zeros as 16 int32); else one zero for all rows, 128 (int8: w + 128 stored) or 8 (int4: n - 8), as a
        scalar multiply then broadcast: a vector multiply per row of x and group (vpmulld, two micro-ops, 10
        cycles) was the slow part of the AMX kernel's scaling (docs/performance.md, "Eleventh session")."""
        b, vi = self.b, _vec(_I32, 16)
        with b.if_else(asym) as (with_zeros, symmetric):
            with with_zeros:
                zrow = zero_points()
                body(lambda neg_xsum: b.mul(zrow, self.splat(neg_xsum, vi)))
            with symmetric:
                zero = b.select(is8, ir.Constant(_I32, 128), ir.Constant(_I32, 8))
                body(lambda neg_xsum: self.splat(b.mul(neg_xsum, zero), vi))

    def muladd(self, a, b, c):
        """a * b + c on float32 vectors: fused where the CPU has FMA (elsewhere llvm.fma would become a
        slow library call, so a multiply and an add)."""
        if not FMA:
            return self.b.fadd(self.b.fmul(a, b), c)
        vty = a.type
        fn = _llvm_fn(self.b, f"llvm.fma.v{vty.count}f32", vty, [vty, vty, vty])
        return self.b.call(fn, [a, b, c])

    def dpbusd(self, acc, u8, s8):
        """acc + (per int32 lane l: the sum of the 4 products of bytes 4l .. 4l + 3 of u8, unsigned, and of s8,
        signed): one 512-bit vpdpbusd with AVX512-VNNI; elsewhere the same arithmetic in generic vectors
        (widened to 64 int32 products, summed in fours), which LLVM lowers for any CPU. All three <16 x i32>."""
        b, vi = self.b, acc.type
        if VNNI and AVX512:
            return b.call(_llvm_fn(b, "llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi]), [acc, u8, s8])
        v64 = _vec(_I32, 64)
        prod = b.mul(b.zext(b.bitcast(u8, _vec(_I8, 64)), v64), b.sext(b.bitcast(s8, _vec(_I8, 64)), v64))
        for m in range(4):
            acc = b.add(acc, b.shuffle_vector(prod, prod, ir.Constant(_vec(_I32, 16), [4 * i + m for i in range(16)])))
        return acc

    def prefetch(self, base, at, nbytes, locality, far=0):
        """Prefetch the nbytes (a multiple of 64) from byte `at` of the int8 pointer base, every cache line:
        locality 3 into L1 (PREFETCHT0), 2 into L2 (PREFETCHT1); with far > 0, also each line `far` bytes
        further on into L2, so that a line is asked for twice on its way (the second time from L2). Addresses
        past the end are harmless."""
        with cgutils.for_range(self.b, self.b.udiv(nbytes, self.const(64))) as line:
            p = self.b.gep(base, [self.b.add(at, self.b.mul(line.index, self.const(64)))])
            self.prefetch_line(p, locality)
            if far:
                self.prefetch_line(self.b.gep(p, [self.const(far)]), 2)

    def prefetch_ahead(self, aty, arr, start, g, group_bytes, ahead, locality, far=0):
        """A block of weight rows' bytes of group g (group_bytes of them from byte start + g * group_bytes of the
        int8 array arr), `ahead` bytes on, with prefetch(); nothing when ahead is 0 (the later passes)."""
        b = self.b
        with b.if_then(b.icmp_signed(">", ahead, self.const(0))):
            at = b.add(b.add(start, b.mul(g, group_bytes)), ahead)
            self.prefetch(self.data(aty, arr), at, group_bytes, locality, far)

    def prefetch_line(self, ptr, locality):
        """llvm.prefetch of the cache line at ptr (read; locality 3 = all levels, 2 = L2 and out; data)."""
        i8p = _I8.as_pointer()
        name = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"  # opaque pointers
        pf = _llvm_fn(self.b, name, ir.VoidType(), [i8p, _I32, _I32, _I32])
        self.b.call(pf, [self.b.bitcast(ptr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, locality),
                         ir.Constant(_I32, 1)])

    def total(self, v):
        """The sum of v's lanes: halves added pairwise (16 -> 8 -> 4 -> 2 -> 1), one fixed order."""
        n = v.type.count
        while n > 1:
            n //= 2
            lo = self.b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n))))
            hi = self.b.shuffle_vector(v, v, ir.Constant(_vec(_I32, n), list(range(n, 2 * n))))
            v = self.b.fadd(lo, hi)
        return self.b.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def _prefetch(typingctx, arr, i):
    """Ask the memory system for the cache line holding arr[i] (1-D array), without waiting for it.

    LLVM's llvm.prefetch (read, keep in all cache levels): an x86 PREFETCHT0. The quantized matrix-vector
    kernels read 4 weight rows side by side, 4 streams the hardware prefetcher follows poorly (it restarts
    at every 4 KiB page); asking a few KiB ahead made them 1.4x (int8) to 1.8x (int4) faster from memory.
    A prefetch never faults, so an address past the end of the array is harmless.
    """

    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        a = context.make_array(aty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aty, a, [args[1]], wraparound=False, boundscheck=False)
        _Gen(context, builder, args[1].type).prefetch_line(ptr, 3)
        return context.get_dummy_value()

    return types.void(arr, i), codegen


# How far ahead (bytes) the int8 and int4 matrix-vector kernels prefetch their weights: measured best.
PREFETCH_Q8 = 4096  # _q8_rows4: 2 KiB 18.4-19.5, 4 KiB 18.6-19.2, 6 KiB 16.1-16.6, 8 KiB 15.4-16.5, none 14.0-14.3 GB/s
PREFETCH_Q4 = 2048  # _q4_rows4: 2 KiB 15.4-16.5, 4 KiB 15.1-15.5, 8 KiB 13.9-16.0, none 8.2-11.6 GB/s
# ...and each line once more, PREFETCH_FAR bytes further on, into L2 (_Gen.prefetch). Through linear(), 8192 x
# 2048, G 128, 2 threads, GB/s, without / with 4, 8, 16 KiB: int8 17.9-18.6 / 21.2-21.6, 20.1-21.4, 16.5-22.0;
# int8 activations 19.8-20.8 / 23.5-24.0, 22.2-23.9, 23.1-24.5; int4 14.6-16.0 / 16.1-16.5, 15.9-17.0,
# 16.6-17.3. In the model (llama-1b decode, alternating runs of the trees with and without): int8 13.2-14.1 ->
# 16.3 tok/s, int4 21.9-22.6 -> 23.0-25.1. Not for the int8-activation kernel: alone it gained as above, in
# the model it lost (15.8-16.3 -> 14.9-15.7 tok/s); int4 with int8 activations prefetches into L2 already.
# Prefetching every other line only (the adjacent-line prefetcher pairs them) was 10-30% slower.
PREFETCH_FAR = 8192
# On AMD Zen CPUs (znver4 measured) rows of more than 2048 int8 values (the 1B shape's down projection: 8192)
# are prefetched a whole block ahead: _q8_rows4's prefetches sweep the block's 4 rows as one range while the
# rows are read 4 at a time, so `ahead` = 4 rows' bytes asks for the next block in step with the current
# one, where PREFETCH_Q8 (4 KiB) is half a row there. 2048 x 8192 alone, GB/s as a fraction of the read pass
# in the same rounds (fourteenth session, rounds grouped by the read's speed: ~33 GB/s, and a fast minute's
# ~52): 4 KiB ahead 0.84 / 0.64, 16 KiB 0.91 / 0.81, 32 KiB (a block) 0.90 / 0.88. llama-1b int8 decode
# steps, on against off step by step (medians of ratios [quartiles]): every row a block ahead 0.946 [0.920,
# 0.977] and 0.961 [0.909, 1.012] the time in fast minutes, 1.000 [0.981, 1.023] in a slow one (30 GB/s); as
# here, only rows over 2048, 0.983 [0.955, 1.013] in a slow one. Rows of 2048 keep 4 KiB (8 KiB alone: 0.94 /
# 0.94 against 0.96 / 0.93; stories110M steps 1.013 [0.980, 1.030] with it). On the Intel
# machine 8 KiB cost 15-20% at rows of 2048 (third session, above) and longer rows were not measured: there,
# PREFETCH_Q8 for every row.
PREFETCH_Q8_LONG_ROWS = ZEN


def _q8_ahead(Kp: int) -> int:
    """_gemv_q8's prefetch distance (bytes) for rows of Kp int8 values."""
    return 4 * Kp if PREFETCH_Q8_LONG_ROWS and Kp > 2048 else PREFETCH_Q8


# The same for int4 on Zen (sixteenth session): the 1B shape's 2048 x 8192 from memory, 2 threads, GB/s best /
# median of 3 rounds, float kernel / digits kernel: 2 KiB ahead 21.2 / 21.0 and 21.0 / 20.4, 8 KiB 24.9 /
# 21.6 and 24.5 / 23.8, 16 KiB (a block of 4 rows) 24.6 / 21.5 and 24.3 / 24.0; 16384 x 2048 alike at 1-16 KiB.
PREFETCH_Q4_LONG_ROWS = ZEN


def _q4_call(w) -> tuple:
    """_gemv_q4's last two arguments for an int4 weight: the prefetch distance (bytes) and `digits`."""
    O, K = w.shape
    Kp = w.padded_in
    ahead = 2 * Kp if PREFETCH_Q4_LONG_ROWS and Kp > 2048 else PREFETCH_Q4  # 2 Kp bytes: 4 rows of Kp / 2
    return ahead, Q4_DIGITS and w.group_size % 128 == 0 and O * K >= Q4_DIGITS_MIN_WEIGHTS


@intrinsic
def _as_f32(typingctx, i):
    """The float32 whose bits are the int32 i (a bitcast, no conversion)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f32_of(typingctx, v):
    """A cache value as float32: itself when float32; when uint16, the bits of a float16 (a float16 KV cache
    goes to the kernels viewed as uint16, Numba having no float16 on CPUs), widened exactly (vcvtph2ps)."""
    if v == types.float32:
        return types.float32(v), lambda context, builder, sig, args: args[0]
    if v == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(v), codegen
    return None


@intrinsic
def _cache_value(typingctx, v, like):
    """float32 v as an element of the cache `like` (an array): itself for a float32 cache; for a float16 one
    (uint16 bits), rounded to the nearest float16, ties to even, as NumPy's astype(float16) rounds."""
    if like.dtype == types.float32:
        return types.float32(v, like), lambda context, builder, sig, args: args[0]
    if like.dtype == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return types.uint16(v, like), codegen
    return None


EXP_HI = f32(88.72283)  # exp(x) overflows float32 above this
EXP_LO = f32(-87.33654)  # and falls below the smallest normal float32 (1.2e-38) below this


@njit(cache=True, fastmath=False, inline="always")
def _exp(x):
    """exp(x) in float32 by arithmetic alone, so that a loop calling it vectorizes (LLVM's exp is a call per
    value here: Numba has no SVML on these machines). Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in
    two parts, so n ln2 is exact enough), exp(r) by its degree-7 polynomial, times 2^n built from the
    exponent bits (in two halves, so that n = 128 and n = -126 stay in range).

    Within 1 ulp of the exact value over [EXP_LO, EXP_HI] (measured 0.99 ulp on 2e7 values, NumPy's float32 exp
    2.54; tests/test_ops_cpu.py sweeps 2e6), +inf above, 0 below (where NumPy gives subnormals under 1.2e-38, which no
    sum of a softmax or silu can see next to its 1), NaN for NaN. swiglu and attention's softmax use it.
    """
    xc = min(max(x, EXP_LO), EXP_HI)
    n = np.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = xc - n * f32(0.693359375)  # ln2 = 0.693359375 - 2.12194440e-4 + ...; n * 0.693359375 (9 bits) is exact
    r = r - n * f32(-2.12194440e-4)
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    y = p * (r * r) + r + f32(1)
    ni = np.int32(n)
    half = ni >> np.int32(1)
    y = y * _as_f32((half + np.int32(127)) << np.int32(23)) * _as_f32((ni - half + np.int32(127)) << np.int32(23))
    if x > EXP_HI:
        y = f32(np.inf)
    if x < EXP_LO:
        y = f32(0)
    if x != x:
        y = x
    return y


@njit(cache=True, fastmath=REDUCE, inline="always")
def _dot(a, b, K):
    """a . b over the first K values (float32; b may be a float16 cache row as uint16 bits)."""
    acc = f32(0)
    for k in range(K):
        acc += a[k] * _f32_of(b[k])
    return acc


@njit(cache=True, inline="always")
def _put_block(y, n, o0, t, nx):
    """y[n + c, o0 + r] = t[4c + r] for c < nx, r < 4: a block intrinsic's results (4 weight rows against
    nx rows of x) into the output."""
    for c in range(nx):
        y[n + c, o0], y[n + c, o0 + 1], y[n + c, o0 + 2], y[n + c, o0 + 3] = (
            t[4 * c], t[4 * c + 1], t[4 * c + 2], t[4 * c + 3])


@njit(cache=True, fastmath=REDUCE, inline="always")
def _sum(a, K):
    """The sum of the first K values of a (float32)."""
    acc = f32(0)
    for k in range(K):
        acc += a[k]
    return acc


@njit(cache=True, fastmath=REDUCE, inline="always")
def _dot4_f32(r0, r1, r2, r3, x, K):
    """(r0 . x, r1 . x, r2 . x, r3 . x) over the first K values: 4 accumulators, each load of x serving the
    4 rows (one row at a time needs a load of x per multiply-add)."""
    a0 = a1 = a2 = a3 = f32(0)
    for k in range(K):  # (_f32_of: rows of a float16 KV cache come as uint16 bits; float32 rows as they are)
        v = x[k]
        a0 += _f32_of(r0[k]) * v
        a1 += _f32_of(r1[k]) * v
        a2 += _f32_of(r2[k]) * v
        a3 += _f32_of(r3[k]) * v
    return a0, a1, a2, a3


@parallel_kernel(fastmath=REDUCE)
def _gemv_f32(x, w, y):
    """y[n, o] = w[o] . x[n] for a few rows n. Parallel over blocks of 4 weight rows.

    Each thread streams a contiguous range of weight rows. The 4 rows of a block go through x together:
    every vector of x loaded serves 4 multiply-adds (4 accumulators), where one row at a time needs a load
    of x per multiply-add. From memory that is 1.3-1.4x faster (2 threads, Llama-3.2-1B shapes: 83-90% of
    the read bandwidth against 60-65%; docs/performance.md). A block (4 rows) stays in L1/L2 while the
    other rows of x pass over it. (On AMD Zen CPUs one row of x over rows of up to 4096 values goes through
    _gemv_f32_rows instead: F32_ONE_ROW_MAX_IN.)
    """
    N, K = x.shape
    O = w.shape[0]
    for blk in prange((O + 3) // 4):
        o0 = 4 * blk
        if o0 + 4 > O:  # the last rows, one at a time
            for o in range(o0, O):
                for n in range(N):
                    y[n, o] = _dot(w[o], x[n], K)
            continue
        r0, r1, r2, r3 = w[o0], w[o0 + 1], w[o0 + 2], w[o0 + 3]
        for n in range(N):
            y[n, o0], y[n, o0 + 1], y[n, o0 + 2], y[n, o0 + 3] = _dot4_f32(r0, r1, r2, r3, x[n], K)


@parallel_kernel(fastmath=REDUCE)
def _gemv_f32_rows(x, w, y):
    """y[n, o] = w[o] . x[n], one weight row at a time: what _gemv_f32 computes, with each thread reading its
    range of rows front to back as a single stream, where _gemv_f32's blocks read 4 streams a row apart. On
    AMD Zen CPUs that reads short rows faster (F32_ONE_ROW_MAX_IN); x is reloaded for every row, from L1 when
    a row of x fits there. Each row's sum is vectorized as in _gemv_f32, so the two agree bit for bit (a test
    checks it): the choice is tuning and stays out of the results."""
    N, K = x.shape
    for o in prange(w.shape[0]):
        r = w[o]
        for n in range(N):
            y[n, o] = _dot(r, x[n], K)


# One row of x against float32 weights of at most this many inputs goes through _gemv_f32_rows on AMD Zen
# CPUs (znver4 measured; 0: never). There a 16384 x 2048 matrix read one row at a time keeps pace with the
# plain read pass (0.93-1.03 of it), in blocks of 4 rows 0.65-0.82; at 2048 x 8192 a row of x (32 KiB) fills
# L1 and is reloaded for every weight row, and the blocks win (0.82-0.96 against 0.67-0.92). Decode steps,
# old and new trees alternating (fourteenth session, medians of step-time ratios): llama-1b float32 at
# position 512 0.909, stories110M 0.822 (with every matrix one row at a time, llama-1b 0.916 against 0.864
# for this limit). On the Intel machine the 4-row blocks read the 1B shapes at 83-90% of the bandwidth
# against 60-65% for a row at a time (third session), so elsewhere nothing changes.
F32_ONE_ROW_MAX_IN = 4096 if ZEN else 0


def _gemv_f32_for(N: int, K: int):
    """The float32 matrix-vector kernel for N rows of x of K values."""
    return _gemv_f32_rows if N == 1 and K <= F32_ONE_ROW_MAX_IN else _gemv_f32


@njit(cache=True, fastmath=REDUCE, inline="always")
def _q8_dot(qrow, srow, xr, G, ng):
    """One int8 row . x: per group, the dot product of the int8 values (converted to float32, exact)
    with x, times the group's scale. The int32 cast keeps the conversion in 32-bit lanes."""
    acc = f32(0)
    for g in range(ng):
        qg = qrow[g * G:(g + 1) * G]
        xg = xr[g * G:(g + 1) * G]
        t = f32(0)
        for j in range(G):
            t += f32(i32(qg[j])) * xg[j]
        acc += t * srow[g]
    return acc


def _q8_block(nx):
    """An intrinsic for four int8 weight rows (o = srow .. srow + 3, bytes from q[start], rows Kp = ng * G
    bytes apart) against nx rows of float32 x (n0 .. n0 + nx - 1 of the C-contiguous (N, Kp) x):

        _q8_rowsN(q, start, x, n0, s, srow, ng, G, ahead) -> UniTuple(float32, 4 nx)

    item 4c + r = sum_g s[srow + r, g] * sum_j float(q[o, g, j]) * x[n0 + c, g, j]; s is flat (O * ng).
    Exactly dequantize(W) @ x up to float32 rounding, like _q8_dot.

    Per step, 16 weights of each row are widened and converted to float32 (vpmovsxbd + vcvtdq2ps, exact) and
    multiply-added with 16 values of each row of x into a 16-lane sum of the group per (row, row of x); at
    the group's end each is multiply-added by the row's scale into 16 float32 lanes, and only the end adds
    lanes together. Written as a Numba loop, the same sum ends every group with a horizontal sum per row
    (what LLVM makes of `t += ...` then `a += t * s`), which cost ~20% of the work; here 16 lanes are 512-bit
    vectors where the CPU has them (two 256-bit halves elsewhere). From memory (8192 x 2048, G 128, 2
    threads), one row of x: 18.5-19.5 GB/s against 14.3-15.8 for the Numba loop. Each value of x loaded
    serves the 4 weight rows, and with nx = 4 (_q8_tile4, a register tile for batches) each weight converted
    serves 4 rows of x. Every (row, row of x) goes through the same operations in the same order whatever
    nx, so a row of x gets the same bits in a batch as alone (tested). At nx = 4 the 16 group sums and 16
    totals are more than the registers hold: the totals, touched once a group, wait in L1. (Until the
    fifteenth session the tile multiplied each weight by its scale per step, 16 accumulators: one multiply
    more per 4 multiply-adds, and on the AMD Zen 4 machine 84 against 92 G multiply-adds/s at 16 rows,
    stories110M's matrices, 2 threads. With it, stories110M and Llama-3.2-1B shapes, 2 threads, GFLOP/s
    against the tiled panel kernel, docs/performance.md: 4 rows 158-188 / 81-100, 16 rows 163-178 / 133-156,
    32 rows 169-205 / 155-182.) The 4 rows' bytes `ahead` on are prefetched once per group into L1, and
    PREFETCH_FAR further on into L2 (0: none).
    """
    V = 16

    @intrinsic
    def block(typingctx, q, start, x, n0, s, srow, ng, G, ahead):
        def codegen(context, builder, sig, args):
            qa, st, xa, n0v, sa, sr, ngv, Gv, ah = args
            gen = _Gen(context, builder, st.type)
            qty, xty, sty = sig.args[0], sig.args[2], sig.args[4]
            vb, vf = _vec(_I8, V), _vec(_F32, V)
            Kp = builder.mul(ngv, Gv)
            R = [(r, c) for c in range(nx) for r in range(4)]  # item 4c + r of the result
            sums = {rc: cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for rc in R}
            parts = {rc: cgutils.alloca_once(builder, vf) for rc in R}  # the group's unscaled sums
            rows, srows = gen.block_rows(st, Kp, sr, ngv)
            xrows = [builder.mul(builder.add(n0v, gen.const(c)), Kp) for c in range(nx)]  # x[n0 + c, 0]
            four_groups = builder.mul(Gv, gen.const(4))
            with cgutils.for_range(builder, ngv) as group:
                g = group.index
                gbase = builder.mul(g, Gv)
                gen.prefetch_ahead(qty, qa, st, g, four_groups, ah, 3, PREFETCH_FAR)  # 4 G bytes per group
                for rc in R:
                    builder.store(ir.Constant(vf, None), parts[rc])
                with cgutils.for_range(builder, builder.udiv(Gv, gen.const(V))) as step:
                    o = builder.add(gbase, builder.mul(step.index, gen.const(V)))
                    xv = [gen.load(xty, xa, builder.add(xrows[c], o), vf, 4) for c in range(nx)]
                    for r in range(4):
                        w = builder.sitofp(gen.load(qty, qa, builder.add(rows[r], o), vb), vf)  # exact
                        for c in range(nx):
                            builder.store(gen.muladd(w, xv[c], builder.load(parts[r, c])), parts[r, c])
                for r in range(4):  # the group's scale
                    scale = gen.splat(gen.load(sty, sa, builder.add(srows[r], g), _F32, 4), vf)
                    for c in range(nx):
                        builder.store(gen.muladd(builder.load(parts[r, c]), scale, builder.load(sums[r, c])),
                                      sums[r, c])
            return context.make_tuple(builder, sig.return_type, [gen.total(builder.load(sums[rc])) for rc in R])

        return types.UniTuple(types.float32, 4 * nx)(q, start, x, n0, s, srow, ng, G, ahead), codegen

    return block


_q8_rows4 = _q8_block(1)  # one row of x: the matrix-vector form of register tiling
_q8_tile4 = _q8_block(4)  # four rows of x: the register tile for batches


@parallel_kernel(fastmath=REDUCE)
def _gemv_q8(x, q, s, y, ahead):
    """int8 weights, few rows: y[n, o] = sum_g s[o, g] * (q[o, group g] . x[n, group g]).

    Parallel over blocks of 4 weight rows. The block (4 rows, a few KiB) stays in L1 while the rows of x
    pass over it: four at a time through the register tile _q8_tile4 (batches), the last N mod 4 one at a
    time through _q8_rows4, whose 4 rows go through each group together so that every vector of x loaded
    from L1 serves 4 rows (the matrix-vector form of register tiling). The weights `ahead` bytes further on
    (_q8_ahead) are prefetched during the first pass. x is padded to whole groups (Kp = ng * G columns, zeros past
    `in`); G is a multiple of 16 (quant.GROUP_SIZES). The last O mod 4 rows take _q8_dot.
    """
    N, Kp = x.shape
    O, ng = s.shape
    G = Kp // ng
    N4 = N - N % 4
    flat, sf = q.reshape(-1), s.reshape(-1)
    for blk in prange((O + 3) // 4):
        o0 = 4 * blk
        if o0 + 4 > O:  # the last rows, one at a time
            for o in range(o0, O):
                for n in range(N):
                    y[n, o] = _q8_dot(q[o], s[o], x[n], G, ng)
            continue
        for n in range(0, N4, 4):
            t = _q8_tile4(flat, o0 * Kp, x, n, sf, o0, ng, G, ahead if n == 0 else 0)
            _put_block(y, n, o0, t, 4)
        for n in range(N4, N):
            y[n, o0], y[n, o0 + 1], y[n, o0 + 2], y[n, o0 + 3] = _q8_rows4(flat, o0 * Kp, x, n, sf, o0, ng, G,
                                                                            ahead if n == 0 else 0)


@njit(cache=True, fastmath=REDUCE, inline="always")
def _q4_dot(prow, srow, zrow, asym, xr, xs, G, ng):
    """One int4 row . x (see _gemv_q4): per group sum(n_j x_j) - zero * sum(x), times the scale."""
    H = G // 2
    acc = f32(0)
    for g in range(ng):
        pg = prow[g * H:(g + 1) * H]
        xl = xr[g * G:g * G + H]
        xh = xr[g * G + H:(g + 1) * G]
        t = f32(0)
        for j in range(H):
            b = i32(pg[j])
            t += f32(i32(b & 15)) * xl[j] + f32(i32(b >> 4)) * xh[j]
        zero = f32(zrow[g]) if asym else f32(8)
        acc += (t - zero * xs[g]) * srow[g]
    return acc


@intrinsic
def _q4_rows4(typingctx, p, start, x, xsum, s, z, asym, srow, ng, G, ahead):
    """Four int4 weight rows (o = srow .. srow + 3; split halves, G / 2 bytes per group, from p[start],
    rows ng * G / 2 bytes apart) against float32 x: UniTuple(float32, 4), row r = sum_g s[o, g] *
    (sum_j n_j x_j - zero * xsum[g]) with the nibbles n_j as stored (0..15) and zero = z[o, g] (asym) or 8.
    s and z are flat (O * ng); xsum[g] is the group's sum of x. Exactly dequantize(W) @ x up to float32
    rounding, like _q4_dot.

    _q8_rows4's structure: per step, 16 bytes of each row give 16 low nibbles (facing x[j]) and 16 high
    ones (facing x[j + G/2]), converted to float32 and multiply-added into a 16-lane partial sum that
    starts the group at -zero * xsum[g] (in lane 0); the group's scale multiply-adds it into 16 lanes per
    row, summed at the row's end. With AVX-512 a nibble becomes a float by a table lookup: the 16 bytes
    widened to 16 int32 lanes (vpmovzxbd), and vpermps, which reads only the low 4 bits of each index,
    picks float(nibble) from a 16-entry table; the high nibbles after a shift by 4. Two instructions per
    16 weights where masking and converting take three. From memory (8192 x 2048, G 128, 2 threads):
    15.4-16.5 GB/s against 11.7-14.3 for the Numba loop (_q4_dot's, 4 rows at a time).
    """
    V = 16

    def codegen(context, builder, sig, args):
        pa, st, xa, xsa, sa, za, asy, sr, ngv, Gv, ah = args
        gen = _Gen(context, builder, st.type)
        pty, xty, xsty, sty, zty = (sig.args[i] for i in (0, 2, 3, 4, 5))
        vb, vf = _vec(_I8, V), _vec(_F32, V)
        H = builder.udiv(Gv, gen.const(2))
        Kb = builder.mul(ngv, H)
        sums = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(4)]
        part = [cgutils.alloca_once(builder, vf) for _ in range(4)]
        zero = cgutils.alloca_once(builder, _F32)
        rows, srows = gen.block_rows(st, Kb, sr, ngv)
        four_groups = builder.mul(H, gen.const(4))
        m15, s4 = ir.Constant(vb, [15] * V), ir.Constant(vb, [4] * V)
        if AVX512:  # vpermps: lane i of the result = table[index i mod 16], here the nibble's value as a float
            perm = _llvm_fn(builder, "llvm.x86.avx512.permvar.sf.512", vf, [vf, _vec(_I32, V)])
            table = ir.Constant(vf, [float(i) for i in range(16)])
        with cgutils.for_range(builder, ngv) as group:
            g = group.index
            gen.prefetch_ahead(pty, pa, st, g, four_groups, ah, 3, PREFETCH_FAR)  # 4 G/2 bytes per group
            c = gen.load(xsty, xsa, g, _F32, 4)
            for r in range(4):
                builder.store(ir.Constant(_F32, 8.0), zero)
                with builder.if_then(asy):
                    builder.store(builder.uitofp(gen.load(zty, za, builder.add(srows[r], g), _I8), _F32), zero)
                correction = builder.fneg(builder.fmul(builder.load(zero), c))  # -zero * xsum[g], in lane 0
                start_lanes = builder.insert_element(ir.Constant(vf, None), correction, ir.Constant(_I32, 0))
                builder.store(start_lanes, part[r])
            xg = builder.mul(g, Gv)
            with cgutils.for_range(builder, builder.udiv(H, gen.const(V))) as step:
                o = builder.mul(step.index, gen.const(V))
                xl = gen.load(xty, xa, builder.add(xg, o), vf, 4)
                xh = gen.load(xty, xa, builder.add(builder.add(xg, H), o), vf, 4)
                for r in range(4):
                    b = gen.load(pty, pa, builder.add(builder.add(rows[r], builder.mul(g, H)), o), vb)
                    if AVX512:
                        wide = builder.zext(b, _vec(_I32, V))
                        lo = builder.call(perm, [table, wide])
                        hi = builder.call(perm, [table, builder.lshr(wide, ir.Constant(_vec(_I32, V), [4] * V))])
                    else:
                        lo = builder.uitofp(builder.and_(b, m15), vf)
                        hi = builder.uitofp(builder.lshr(b, s4), vf)
                    builder.store(gen.muladd(hi, xh, gen.muladd(lo, xl, builder.load(part[r]))), part[r])
            for r in range(4):
                scale = gen.splat(gen.load(sty, sa, builder.add(srows[r], g), _F32, 4), vf)
                builder.store(gen.muladd(builder.load(part[r]), scale, builder.load(sums[r])), sums[r])
        return context.make_tuple(builder, sig.return_type, [gen.total(builder.load(a)) for a in sums])

    return types.UniTuple(types.float32, 4)(p, start, x, xsum, s, z, asym, srow, ng, G, ahead), codegen


@intrinsic
def _q4_tile4(typingctx, p, start, x, n0, s, z, asym, srow, ng, G, ahead):
    """Four int4 weight rows (as _q4_rows4's) against four rows of float32 x (n0 .. n0 + 3 of the C-contiguous
    (N, Kp) x): UniTuple(float32, 16), item 4c + r = sum_k ((n_k - zero) * s[o, k // G]) * x[n0 + c, k], with
    zero = z[o, g] (asym) or 8.

    The register tile of _q8_tile4 for int4. Per group and row, a 16-entry table holds (i - zero) * scale for
    the 16 nibble values i (exactly quant.dequantize's values: an exact difference, one rounding); per
    step, 16 bytes of each row give 16 low and 16 high nibbles, each turned into its dequantized weight by
    one table lookup (vpermps, which reads the low 4 bits of each index; without AVX-512 a mask, a
    conversion, a subtraction and a multiply), multiply-added with 16 values of each of the 4 rows of x.
    Each weight unpacked serves 4 rows of x. stories110M and Llama-3.2-1B shapes, 2 threads, GFLOP/s
    against the tiled panel kernel: docs/performance.md ("Fourth session").
    """
    V = 16

    def codegen(context, builder, sig, args):
        pa, st, xa, n0v, sa, za, asy, sr, ngv, Gv, ah = args
        gen = _Gen(context, builder, st.type)
        pty, xty, sty, zty = (sig.args[i] for i in (0, 2, 4, 5))
        vb, vf, vi = _vec(_I8, V), _vec(_F32, V), _vec(_I32, V)
        H = builder.udiv(Gv, gen.const(2))
        Kb = builder.mul(ngv, H)
        Kp = builder.mul(ngv, Gv)
        R = [(r, c) for c in range(4) for r in range(4)]  # item 4c + r of the result
        sums = {rc: cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for rc in R}
        tables = [cgutils.alloca_once(builder, vf) for _ in range(4)]
        zeros = [cgutils.alloca_once(builder, vf) for _ in range(4)]  # without AVX-512: zero and scale, splat
        scales = [cgutils.alloca_once(builder, vf) for _ in range(4)]
        zero = cgutils.alloca_once(builder, _F32)
        rows, srows = gen.block_rows(st, Kb, sr, ngv)
        xrows = [builder.mul(builder.add(n0v, gen.const(c)), Kp) for c in range(4)]  # x[n0 + c, 0]
        four_groups = builder.mul(H, gen.const(4))
        iota = ir.Constant(vf, [float(i) for i in range(16)])
        if AVX512:
            perm = _llvm_fn(builder, "llvm.x86.avx512.permvar.sf.512", vf, [vf, vi])
        with cgutils.for_range(builder, ngv) as group:
            g = group.index
            gen.prefetch_ahead(pty, pa, st, g, four_groups, ah, 3, PREFETCH_FAR)  # 4 G/2 bytes per group
            for r in range(4):  # table[i] = (i - zero) * scale: the dequantized value of nibble i
                builder.store(ir.Constant(_F32, 8.0), zero)
                with builder.if_then(asy):
                    builder.store(builder.uitofp(gen.load(zty, za, builder.add(srows[r], g), _I8), _F32), zero)
                scale = gen.splat(gen.load(sty, sa, builder.add(srows[r], g), _F32, 4), vf)
                zv = gen.splat(builder.load(zero), vf)
                if AVX512:
                    builder.store(builder.fmul(builder.fsub(iota, zv), scale), tables[r])
                else:
                    builder.store(zv, zeros[r])
                    builder.store(scale, scales[r])
            xg = builder.mul(g, Gv)
            with cgutils.for_range(builder, builder.udiv(H, gen.const(V))) as step:
                o = builder.mul(step.index, gen.const(V))
                xl = [gen.load(xty, xa, builder.add(builder.add(xrows[c], xg), o), vf, 4) for c in range(4)]
                xh = [gen.load(xty, xa, builder.add(builder.add(builder.add(xrows[c], xg), H), o), vf, 4)
                      for c in range(4)]
                for r in range(4):
                    b = gen.load(pty, pa, builder.add(builder.add(rows[r], builder.mul(g, H)), o), vb)
                    wide = builder.zext(b, vi)
                    if AVX512:
                        table = builder.load(tables[r])
                        lo = builder.call(perm, [table, wide])
                        hi = builder.call(perm, [table, builder.lshr(wide, ir.Constant(vi, [4] * V))])
                    else:  # what the table would hold, computed: (nibble - zero) * scale
                        zv, sv = builder.load(zeros[r]), builder.load(scales[r])
                        lo = builder.uitofp(builder.and_(wide, ir.Constant(vi, [15] * V)), vf)
                        hi = builder.uitofp(builder.lshr(wide, ir.Constant(vi, [4] * V)), vf)
                        lo, hi = (builder.fmul(builder.fsub(v, zv), sv) for v in (lo, hi))
                    for c in range(4):
                        acc = gen.muladd(lo, xl[c], builder.load(sums[r, c]))
                        builder.store(gen.muladd(hi, xh[c], acc), sums[r, c])
        return context.make_tuple(builder, sig.return_type, [gen.total(builder.load(sums[rc])) for rc in R])

    return types.UniTuple(types.float32, 16)(p, start, x, n0, s, z, asym, srow, ng, G, ahead), codegen


# One row of x against int4 weights (G a multiple of 128) in integer digits through vpdpbusd (_q4_digits4)
# where the CPU has AVX512-VNNI; False: in float32 (_q4_rows4). Both compute dequantize(W) @ x to about float32
# rounding; the digits count x's precision from each group's largest value (_x_digits; docs/tolerances.md).
Q4_DIGITS = VNNI and AVX512 and os.environ.get("TINYSERVE_Q4_DIGITS", "") != "0"
# ... for matrices of at least this many weights: x's digits cost ~1 ns a value on the calling thread before
# the parallel part starts, too much for the smallest (stories110M's 768 x 768: 1.20x the time, 2304 x 768
# 1.17x; 4096 x 768 0.97x, the 1B shape's 0.84-0.88x; sixteenth session).
Q4_DIGITS_MIN_WEIGHTS = 2**21
# x as three signed int8 digits per group (_x_digits): the largest integer they hold, 127 * (1 + 256 + 65536).
X_DIGITS_MAX = 8355711
F32_TINY = f32(np.finfo(np.float32).tiny)  # the smallest normal float32


@njit(cache=True, fastmath=REDUCE, error_model="numpy")
def _x_digits(x, n, G, xd, xs, xc):
    """Row n of x (padded to whole groups) as _q4_digits4 takes it, or False where it holds inf or nan, or a
    group whose largest |x| is below X_DIGITS_MAX smallest normal floats (~1e-31: its scale would be subnormal).

    Per group g: scale xs[g] = max|x| / X_DIGITS_MAX (float32); the integers v = x / xs[g] rounded to the
    nearest (|v| <= X_DIGITS_MAX; 0 where the scale is 0), as three signed base-256 digits, v = d0 + 256 d1 +
    65536 d2 (xd[t, k] = d_t of x[n, k], each in -128..127); and xc[g] = xs[g] * sum(v), with which the
    zero points come off (_zero_part). x's values become xs[g] * v: each within xs[g] / 2 (~2^-24 of the
    group's largest |x|, half a float32 ulp of that value) of the original, a float32 precision counted from
    the group's largest value.
    """
    for g in range(x.shape[1] // G):
        at = g * G  # slices, indexed from 0: LLVM then knows no index is negative, and vectorizes the loops
        xg, d0, d1, d2 = x[n, at:at + G], xd[0, at:at + G], xd[1, at:at + G], xd[2, at:at + G]
        m = f32(0)
        bad = f32(0)
        for j in range(G):
            m = max(m, abs(xg[j]))
            bad += xg[j] * f32(0)  # nan where a value is inf or nan
        if bad != 0:  # inf and nan (whatever max made of them) made bad nan
            return False
        sg = f32(np.float64(m) / X_DIGITS_MAX)
        if m > 0 and sg < F32_TINY:  # a scale below float32's normal range would lose its own precision
            return False
        inv = 1.0 / np.float64(sg) if sg > 0 else 0.0
        t = 0
        for j in range(G):  # no branches, so that it vectorizes
            y = np.float64(xg[j]) * inv
            v = min(max(np.int32(y + (0.5 if y >= 0 else -0.5)), -X_DIGITS_MAX), X_DIGITS_MAX)  # nearest
            t += v
            u = np.uint32(v + 8421504)  # + 128 * (1 + 256 + 65536): byte k of u is digit k + 128
            d0[j] = np.int8(np.int32(u & np.uint32(255)) - 128)
            d1[j] = np.int8(np.int32((u >> np.uint32(8)) & np.uint32(255)) - 128)
            d2[j] = np.int8(np.int32(u >> np.uint32(16)) - 128)
        xs[g] = sg
        xc[g] = f32(np.float64(sg) * t)
    return True


@intrinsic
def _q4_digits4(typingctx, p, start, xd, xs, s, srow, ng, G, ahead):
    """Four int4 weight rows (as _q4_rows4's; G a multiple of 128) against one row of x in _x_digits' form
    (xd flat, 3 * Kp int8 digits; xs per group): UniTuple(float32, 4), row r = sum_g s[o, g] * xs[g] *
    sum_j n_j v_j, with the nibbles n_j as stored (0..15). The caller takes the zero point's part off
    (_zero_part: sum_g zero * s[o, g] * xc[g]), which leaves dequantize(W) @ x~, x~ = x rounded to xs[g] * v
    (_x_digits: within half a float32 ulp of the group's largest |x|); each group's sum_j n_j v_j is exact
    (integers), then converted to float32 once.

    Why: the float kernel (_q4_rows4) needs three vector instructions per 16 weights (a widening or shift,
    a table lookup or conversion, a multiply-add), and Zen 4 runs two 512-bit instructions a cycle whatever
    they are (docs/performance.md, "Sixteenth session"): ~25 G weights/s a thread, under what memory
    delivers at batch 1. Here one vpdpbusd multiplies 64 nibbles with 64 digits and sums them in fours into
    16 int32 lanes: per 64 bytes of a row (128 weights) a load, three instructions that split the nibbles
    (low: the first 64 weights of a 128-block, high: the next 64), six vpdpbusd (a digit each); at the
    group's end the three digits' lanes are combined (a0 + a1 << 8 + a2 << 16: at most 16 * 15 * 8421504 <
    2^31 for G <= 256), converted and multiply-added with s[o, g] * xs[g]. (The zero point's part, a scalar
    per group and row in here, cost 5% of the speed; starting each digit's lanes at -zero * its lane sums of
    x's digits, to take it off in the integers, was slower: a second copy of the group loop for zero
    points, or a vector multiply per digit.)
    """
    V = 16

    def codegen(context, builder, sig, args):
        pa, st, xa, xsa, sa, sr, ngv, Gv, ah = args
        gen = _Gen(context, builder, st.type)
        pty, xty, xsty, sty = (sig.args[i] for i in (0, 2, 3, 4))
        vi, vf = _vec(_I32, V), _vec(_F32, V)
        H = builder.udiv(Gv, gen.const(2))
        Kb = builder.mul(ngv, H)
        Kp = builder.mul(ngv, Gv)
        sums = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(4)]
        ints = [[cgutils.alloca_once(builder, vi) for _ in range(3)] for _ in range(4)]  # [row][digit]
        rows, srows = gen.block_rows(st, Kb, sr, ngv)
        four_groups = builder.mul(H, gen.const(4))
        nibble = ir.Constant(vi, [0x0F0F0F0F] * V)
        with cgutils.for_range(builder, ngv) as group:
            g = group.index
            gen.prefetch_ahead(pty, pa, st, g, four_groups, ah, 3, PREFETCH_FAR)  # 4 G/2 bytes per group
            for r in range(4):
                for t in range(3):
                    builder.store(ir.Constant(vi, None), ints[r][t])
            xg = builder.mul(g, Gv)
            with cgutils.for_range(builder, builder.udiv(H, gen.const(64))) as step:
                o = builder.mul(step.index, gen.const(64))
                lo_at = [builder.add(builder.add(builder.mul(gen.const(t), Kp), xg), o) for t in range(3)]
                xl = [gen.load(xty, xa, a, vi) for a in lo_at]  # digit t of the values facing the low nibbles
                xh = [gen.load(xty, xa, builder.add(a, H), vi) for a in lo_at]  # ... the high ones
                for r in range(4):
                    b = gen.load(pty, pa, builder.add(builder.add(rows[r], builder.mul(g, H)), o), vi)
                    lo = builder.and_(b, nibble)
                    hi = builder.and_(builder.lshr(b, ir.Constant(vi, [4] * V)), nibble)
                    for t in range(3):
                        builder.store(gen.dpbusd(gen.dpbusd(builder.load(ints[r][t]), lo, xl[t]), hi, xh[t]),
                                      ints[r][t])
            sx = gen.load(xsty, xsa, g, _F32, 4)
            for r in range(4):
                a0, a1, a2 = (builder.load(ints[r][t]) for t in range(3))
                total = builder.add(builder.add(a0, builder.shl(a1, ir.Constant(vi, [8] * V))),
                                    builder.shl(a2, ir.Constant(vi, [16] * V)))
                sw = gen.load(sty, sa, builder.add(srows[r], g), _F32, 4)
                builder.store(gen.muladd(builder.sitofp(total, vf), gen.splat(builder.fmul(sw, sx), vf),
                                         builder.load(sums[r])), sums[r])
        return context.make_tuple(builder, sig.return_type, [gen.total(builder.load(a)) for a in sums])

    return types.UniTuple(types.float32, 4)(p, start, xd, xs, s, srow, ng, G, ahead), codegen


@njit(cache=True, fastmath=REDUCE, inline="always")
def _zero_part(s, z, asym, o, xc, ng):
    """What the zero points add to row o of _q4_digits4's result: sum_g zero * s[o, g] * xc[g], zero = z[o, g]
    (asym) or 8. A loop LLVM vectorizes, once per row, where the kernel would take a few scalar operations
    per group and row."""
    acc = f32(0)
    if asym:
        for g in range(ng):
            acc += f32(z[o, g]) * s[o, g] * xc[g]
        return acc
    for g in range(ng):
        acc += s[o, g] * xc[g]
    return f32(8) * acc


@parallel_kernel(fastmath=REDUCE)
def _gemv_q4(x, p, s, z, asym, y, ahead, digits):
    """int4 weights (split halves per group), few rows: y[n, o] = sum_g s[o,g] * (sum_j n_j x_j - zero * xsum[n,g]).

    Byte j of a group holds nibble j (low) and nibble j + G/2 (high), so one pass over the G/2 bytes
    multiplies the low nibbles with the first half of the group's x and the high nibbles with the second
    half: two contiguous runs, no shuffling. The zero point (8, or z[o, g] when asym) is not subtracted
    per value: sum (n - zero) x = sum n x - zero * xsum[n, g], with xsum (the group sums of x) computed
    once per call, here on the calling thread (in NumPy it cost more than a small layer's kernel: 1.4 us).
    The 4 rows of a block go through each group together, as in _gemv_q8, and the weights `ahead` bytes
    further on are prefetched; rows of x four at a time go through the register tile _q4_tile4 (which
    subtracts the zero point per value, in its table), the others one at a time: with `digits` (the caller
    passes Q4_DIGITS, and G a multiple of 128) through _q4_digits4 on x in _x_digits' form, made here once
    per call (x's values rounded to a float32 precision counted from each group's largest value), else, or
    where a row cannot be held so (inf, nan, a group all below ~1e-31), through _q4_rows4 in float32. The
    last O mod 4 rows take _q4_dot.
    p: (O, Kp/2) uint8, x: (N, Kp) padded with zeros, z: (O, ng) uint8, or a dummy (1, 1) when not asym.
    """
    N, Kp = x.shape
    O, ng = s.shape
    G = Kp // ng
    N4 = N - N % 4
    xsum = np.empty((N, ng), np.float32)
    for n in range(N):
        for g in range(ng):
            xsum[n, g] = _sum(x[n, g * G:(g + 1) * G], G)
    nd = N - N4 if digits and G % 128 == 0 else 0  # the last N mod 4 rows of x in digits, where they can be
    xd = np.empty((nd, 3, Kp), np.int8)
    xs = np.empty((nd, ng), np.float32)
    xc = np.empty((nd, ng), np.float32)
    in_digits = np.zeros(N - N4, np.bool_)
    if nd > 0:
        for n in range(N4, N):
            in_digits[n - N4] = _x_digits(x, n, G, xd[n - N4], xs[n - N4], xc[n - N4])
    flat, sf, zf = p.reshape(-1), s.reshape(-1), z.reshape(-1)
    for blk in prange((O + 3) // 4):
        o0 = 4 * blk
        if o0 + 4 > O:  # the last rows, one at a time
            for o in range(o0, O):
                for n in range(N):
                    y[n, o] = _q4_dot(p[o], s[o], z[o if asym else 0], asym, x[n], xsum[n], G, ng)
            continue
        for n in range(0, N4, 4):
            t = _q4_tile4(flat, o0 * (Kp // 2), x, n, sf, zf, asym, o0, ng, G, ahead if n == 0 else 0)
            _put_block(y, n, o0, t, 4)
        for n in range(N4, N):
            if in_digits[n - N4]:
                t = _q4_digits4(flat, o0 * (Kp // 2), xd[n - N4].reshape(-1), xs[n - N4], sf, o0, ng, G,
                                ahead if n == 0 else 0)
                for r in range(4):
                    y[n, o0 + r] = t[r] - _zero_part(s, z, asym, o0 + r, xc[n - N4], ng)
            else:
                y[n, o0], y[n, o0 + 1], y[n, o0 + 2], y[n, o0 + 3] = _q4_rows4(
                    flat, o0 * (Kp // 2), x[n], xsum[n], sf, zf, asym, o0, ng, G, ahead if n == 0 else 0)


# ============================================================ linear: int8 activations (an option, off by default)
# ACTIVATIONS = "int8" (or TINYSERVE_INT8_ACTIVATIONS=1 in the environment at import) makes quantized
# linear layers with fewer than A8_GEMM_MIN_ROWS rows (decode, batches up to 31) quantize each row of x to
# int8 per group of the weight's G (one float32 scale per group: quant.quantize_activations) and compute
# integer dot products, as llama.cpp does. It is a different function from dequantize(W) @ x: each output
# moves by at most sum_g xs_g / 2 * sum |w_g| (quant.linear_int8_activations is the spec,
# quant.activation_error_bound the bound; tinyserve/tolerances.py has its rows). float32 weights and the
# tiled many-row path (prefill) are unchanged. "float32" (the default) keeps every result exactly dequantize(W) @ x up to float32 rounding.
ACTIVATIONS = "int8" if os.environ.get("TINYSERVE_INT8_ACTIVATIONS", "") not in ("", "0") else "float32"
ACTIVATION_MODES = ("float32", "int8")


def set_activations(mode: str) -> str:
    """Set ACTIVATIONS ("float32" or "int8") for the models loaded from now on (quantized weights are packed
    at load for the mode: set it before loading) and the calls they make; returns the mode it replaces."""
    global ACTIVATIONS
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"unknown activation mode {mode!r} (choose {', '.join(ACTIVATION_MODES)})")
    old, ACTIVATIONS = ACTIVATIONS, mode
    return old



@intrinsic
def _dot_q8_avx2(typingctx, w, x, start, n):
    """sum_{k < n} w[start + k] * x[start + k] as int32: w int8 (weights), x int16 (quantized activations,
    values -127..127, stored widened once per call), n a multiple of 16.

    Why an intrinsic: written as a Numba loop, LLVM vectorizes this sum with one int32 lane per value
    (vpmaddwd on registers half empty: ~19 G values/s, no faster than float). Here each step loads 16
    weights, widens them to int16 (vpmovsxbw) and multiplies with 16 values of x, adding neighbouring
    products into 8 int32 lanes (vpmaddwd; LLVM fuses it with the add into vpdpwssd where VNNI exists):
    ~33 G values/s. |w * x| <= 127 * 127, so the pairs and the int32 sums never overflow (G <= 256).
    """

    def codegen(context, builder, sig, args):
        wa, xa, st, cnt = args
        gen = _Gen(context, builder, cnt.type)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_vec(_I32, 8), None))
        madd = _llvm_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16), _vec(_I16, 16)])
        sixteen = ir.Constant(cnt.type, 16)
        with cgutils.for_range(builder, builder.udiv(cnt, sixteen)) as loop:
            off = builder.add(st, builder.mul(loop.index, sixteen))
            wv = gen.load(sig.args[0], wa, off, _vec(_I8, 16))
            xv = gen.load(sig.args[1], xa, off, _vec(_I16, 16))
            prod = builder.call(madd, [builder.sext(wv, _vec(_I16, 16)), xv])
            builder.store(builder.add(builder.load(acc), prod), acc)
        total = _llvm_fn(builder, "llvm.vector.reduce.add.v8i32", _I32, [_vec(_I32, 8)])
        return builder.call(total, [builder.load(acc)])

    return types.int32(w, x, start, n), codegen


@intrinsic
def _dot_q4_avx2(typingctx, p, pstart, x, xstart, H):
    """sum_{j < H} lo(p[pstart + j]) * x[xstart + j] + hi(p[pstart + j]) * x[xstart + H + j] as int32:
    one int4 group (split halves: byte j holds value j low and value j + H high, H = G/2) against int8 x.
    The nibbles are used as they are stored (0..15; the zero point is subtracted by the caller through the
    group sum of x). H is 16 or a multiple of 32.

    Per 32 bytes (64 weights): AND 15 gives 32 low nibbles, a shift right by 4 the 32 high ones, each an
    unsigned byte; vpmaddubsw multiplies them with the signed bytes of x and adds neighbouring pairs into
    int16 (at most 2 * 15 * 127 per pair, and the two halves' sum at most 4 * 15 * 127 = 7620: no
    saturation), vpmaddwd with ones widens to 8 int32 lanes. No int->float conversion per value: ~40 G
    values/s against ~15 for the float kernel. With H = 16 (G = 32) the 16 low and 16 high nibbles of a
    group are joined into one 32-byte vector facing the group's 32 contiguous values of x.
    """

    def codegen(context, builder, sig, args):
        pa, ps, xa, xs_, h = args
        T = h.type
        v32, v16 = _vec(_I8, 32), _vec(_I8, 16)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_vec(_I32, 8), None))
        mubs = _llvm_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [v32, v32])
        madd = _llvm_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [_vec(_I16, 16), _vec(_I16, 16)])
        ones = ir.Constant(_vec(_I16, 16), [1] * 16)

        load = _Gen(context, builder, T).load

        def accumulate(s16):
            builder.store(builder.add(builder.load(acc), builder.call(madd, [s16, ones])), acc)

        c32 = ir.Constant(T, 32)
        with cgutils.for_range(builder, builder.udiv(h, c32)) as loop:  # 32 bytes at a time
            o = builder.mul(loop.index, c32)
            b = load(sig.args[0], pa, builder.add(ps, o), v32)
            xl = load(sig.args[2], xa, builder.add(xs_, o), v32)
            xh = load(sig.args[2], xa, builder.add(builder.add(xs_, h), o), v32)
            lo = builder.and_(b, ir.Constant(v32, [15] * 32))
            hi = builder.lshr(b, ir.Constant(v32, [4] * 32))
            accumulate(builder.add(builder.call(mubs, [lo, xl]), builder.call(mubs, [hi, xh])))
        with builder.if_then(builder.icmp_unsigned("==", h, ir.Constant(T, 16))):  # G = 32: one 16-byte group
            b = load(sig.args[0], pa, ps, v16)
            lo = builder.and_(b, ir.Constant(v16, [15] * 16))
            hi = builder.lshr(b, ir.Constant(v16, [4] * 16))
            nib = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32))))  # values 0..31
            accumulate(builder.call(mubs, [nib, load(sig.args[2], xa, xs_, v32)]))
        total = _llvm_fn(builder, "llvm.vector.reduce.add.v8i32", _I32, [_vec(_I32, 8)])
        return builder.call(total, [builder.load(acc)])

    return types.int32(p, pstart, x, xstart, H), codegen


@njit(cache=True, inline="always")
def _dot_q8_loop(w, x, start, n):
    """The portable form of _dot_q8_avx2 (same result: an exact int32 sum). The int32 casts keep Numba from
    widening to int64 (NUMBA_NOTES)."""
    wg = w[start:start + n]
    xg = x[start:start + n]
    t = i32(0)
    for j in range(n):
        t = i32(t + i32(wg[j]) * i32(xg[j]))
    return t


@njit(cache=True, inline="always")
def _dot_q4_loop(p, pstart, x, xstart, H):
    """The portable form of _dot_q4_avx2 (same result: an exact int32 sum)."""
    pg = p[pstart:pstart + H]
    xl = x[xstart:xstart + H]
    xh = x[xstart + H:xstart + 2 * H]
    t = i32(0)
    for j in range(H):
        b = i32(pg[j])
        t = i32(t + i32(b & 15) * i32(xl[j]) + i32(b >> 4) * i32(xh[j]))
    return t


VNNI_LANES = 8  # int32 lanes of one 256-bit vpdpbusd: lane l sums the products of bytes 4l .. 4l + 3


def _a8_block(nx):
    """An intrinsic for a block of four rows of int8 (bits 8) or int4 (bits 4) weights against nx rows of int8
    activations, on VNNI machines:

        _a8_rows4xN(data, start, stride, xq, n0, lanes, s, srow, sstride, xs, z, asym, zero, ng, gb, bits, ahead)

    returns UniTuple(float32, 4 * nx): item 4c + r = sum_g s[srow + r * sstride, g] * xs[n0 + c, g] * (the
    exact int32 group sum of weight row r with x row n0 + c). Row r's ng groups of gb bytes start at
    data[start + r * stride] (stride 0 repeats one row, for the last rows of a matrix); s and z are flat
    (O * ng) arrays; xq (N, ng * G), lanes (N, 8 ng) and xs (N, ng) are _quantize_x's outputs, C-contiguous.

    The integer part is _dot_q8_avx2's / _dot_q4_avx2's: vpdpbusd multiplies 32 unsigned bytes with 32
    signed bytes of x and adds each 4 neighbouring products into 8 int32 lanes. The weights go in as
    unsigned bytes: int8 w + 128 (an XOR with 0x80), int4 the nibbles as stored (0..15); the zero (128,
    8, or the stored zero point when asym) comes off through `lanes`, the lane sums of x from _quantize_x
    (lanes[n, 8g + l] = sum of x[n, g * G + p] over p mod 32 in 4l .. 4l + 3): each lane of each group
    starts at -zero * lanes[n, 8g + l], so after the group every lane holds an exact int32 sum of
    (w - zero) * x.

    What makes it fast: a group's 8 lanes are never added together. They are converted to float32 once
    per group (exact: |lane| < 2^24) and multiply-added into 8 float32 lanes by the group's scale
    product, so a row costs one horizontal sum at its end, not one per group (a per-group sum costs most
    at G = 32). Each load of x serves the 4 rows, and each load of weights (with its XOR or nibble split)
    the nx rows of x: with nx = 2, 6 loads and 4 XORs per 8 vpdpbusd instead of 10 and 8 (_gemv_a8x4 uses
    it for batches). 4 x nx int32 and 4 x nx float32 vectors stay in registers (nx = 4 would need all 32).
    In cache (1 thread, 256 x 2048, G 128, nx = 1): 37-46 GB/s of weights against 34-37 for the per-group-
    sum kernel; from memory (docs/performance.md) +5-10% (int8) and +10% (int4). The weights are prefetched
    `ahead` bytes on, per group (0: no prefetch): int8 into L1, int4 into L2 (measured best: PREFETCH_A8_4,
    PREFETCH_A4_4).

    No overflow: a lane adds G / 32 steps of 4 products, each at most 255 * 127, and starts at
    -128 * (G / 8) * 127 at most; G <= 256.
    """
    W = VNNI_LANES

    @intrinsic
    def block(typingctx, data, start, stride, xq, n0, lanes, s, srow, sstride, xs, z, asym, zero, ng, gb, bits,
              ahead):
        def codegen(context, builder, sig, args):
            (da, st, strd, xa, n0v, la, sa, sr, sst, xsa, za, asy, zr, ngv, gbv, bitsv, ah) = args
            gen = _Gen(context, builder, st.type)
            const, load = gen.const, gen.load
            v32, v16, vi, vf = _vec(_I8, 32), _vec(_I8, 16), _vec(_I32, W), _vec(_F32, W)
            dp = _llvm_fn(builder, "llvm.x86.avx512.vpdpbusd.256", vi, [vi, vi, vi])
            dty, xty, lty, sty, xsty, zty = (sig.args[i] for i in (0, 3, 5, 6, 9, 10))

            def dot(acc, u8, s8):  # acc += 4-product sums of u8 (unsigned) and s8 (signed), per lane
                builder.store(builder.call(dp, [builder.load(acc), builder.bitcast(u8, vi), builder.bitcast(s8, vi)]),
                              acc)

            R = [(r, c) for c in range(nx) for r in range(4)]  # item 4c + r of the result
            sums = {rc: cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for rc in R}  # float32 lanes
            ints = {rc: cgutils.alloca_once(builder, vi) for rc in R}  # the current group's int32 lanes
            rows, srows = gen.block_rows(st, strd, sr, ngv, sst)
            is8 = builder.icmp_unsigned("==", bitsv, ir.Constant(bitsv.type, 8))
            G = builder.select(is8, gbv, builder.mul(gbv, const(2)))  # values per group
            xn = [builder.add(n0v, const(c)) for c in range(nx)]  # the rows of x
            xrows = [builder.mul(n, builder.mul(ngv, G)) for n in xn]  # xq[n, 0]
            lrows = [builder.mul(n, builder.mul(ngv, const(W))) for n in xn]  # lanes[n, 0]
            xsrows = [builder.mul(n, ngv) for n in xn]  # xs[n, 0]
            c32 = const(32)
            four_groups = builder.mul(gbv, const(4))
            with cgutils.for_range(builder, ngv) as group:
                g = group.index
                gbase = builder.mul(g, gbv)  # the group's first byte in a row
                with builder.if_else(is8) as (int8, int4):  # the block's bytes, `ahead` on
                    with int8:
                        gen.prefetch_ahead(dty, da, st, g, four_groups, ah, 3)
                    with int4:
                        gen.prefetch_ahead(dty, da, st, g, four_groups, ah, 2)
                for c in range(nx):  # each lane starts at -zero * (its lane sum of x)
                    L = load(lty, la, builder.add(lrows[c], builder.mul(g, const(W))), vi, 4)
                    with builder.if_else(asy) as (per_row, shared):
                        with per_row:
                            for r in range(4):
                                zv = builder.zext(load(zty, za, builder.add(srows[r], g), _I8), _I32)
                                builder.store(builder.mul(L, gen.splat(builder.neg(zv), vi)), ints[r, c])
                        with shared:
                            start_lanes = builder.mul(L, gen.splat(builder.neg(builder.trunc(zr, _I32)), vi))
                            for r in range(4):
                                builder.store(start_lanes, ints[r, c])
                xg = [builder.add(xr, builder.mul(g, G)) for xr in xrows]  # the group's first value of x
                with builder.if_else(is8) as (int8, int4):
                    with int8:  # 32 weights per step: w XOR 0x80 = w + 128 as an unsigned byte
                        flip = ir.Constant(v32, [-128] * 32)
                        with cgutils.for_range(builder, builder.udiv(gbv, c32)) as step:
                            o = builder.mul(step.index, c32)
                            xv = [load(xty, xa, builder.add(xg[c], o), v32) for c in range(nx)]
                            for r in range(4):
                                w = builder.xor(load(dty, da, builder.add(builder.add(rows[r], gbase), o), v32), flip)
                                for c in range(nx):
                                    dot(ints[r, c], w, xv[c])
                    with int4:  # 32 bytes (64 weights) per step: low nibbles face x[j], high ones x[j + gb]
                        with cgutils.for_range(builder, builder.udiv(gbv, c32)) as step:
                            o = builder.mul(step.index, c32)
                            xl = [load(xty, xa, builder.add(xg[c], o), v32) for c in range(nx)]
                            xh = [load(xty, xa, builder.add(builder.add(xg[c], gbv), o), v32) for c in range(nx)]
                            for r in range(4):
                                b = load(dty, da, builder.add(builder.add(rows[r], gbase), o), v32)
                                lo = builder.and_(b, ir.Constant(v32, [15] * 32))
                                hi = builder.lshr(b, ir.Constant(v32, [4] * 32))
                                for c in range(nx):
                                    dot(ints[r, c], lo, xl[c])
                                    dot(ints[r, c], hi, xh[c])
                        with builder.if_then(builder.icmp_unsigned("==", gbv, const(16))):  # G = 32: one 16-byte group
                            xv = [load(xty, xa, xg[c], v32) for c in range(nx)]
                            for r in range(4):
                                b = load(dty, da, builder.add(rows[r], gbase), v16)
                                lo = builder.and_(b, ir.Constant(v16, [15] * 16))
                                hi = builder.lshr(b, ir.Constant(v16, [4] * 16))  # joined: values 0..31 of the group
                                joined = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 32), list(range(32))))
                                for c in range(nx):
                                    dot(ints[r, c], joined, xv[c])
                for c in range(nx):  # float32 lanes += float(int32 lanes) * (s[row, g] * xs[n, g])
                    sx = load(xsty, xsa, builder.add(xsrows[c], g), _F32, 4)
                    for r in range(4):
                        scale = builder.fmul(load(sty, sa, builder.add(srows[r], g), _F32, 4), sx)
                        f = builder.sitofp(builder.load(ints[r, c]), vf)
                        builder.store(gen.muladd(f, gen.splat(scale, vf), builder.load(sums[r, c])), sums[r, c])
            return context.make_tuple(builder, sig.return_type, [gen.total(builder.load(sums[rc])) for rc in R])

        sig = types.UniTuple(types.float32, 4 * nx)(data, start, stride, xq, n0, lanes, s, srow, sstride, xs, z, asym,
                                                    zero, ng, gb, bits, ahead)
        return sig, codegen

    return block


_a8_rows4x1 = _a8_block(1)  # one row of x (decode)
_a8_rows4x2 = _a8_block(2)  # two rows of x per pass over the block's weights (batches)


@parallel_kernel(fastmath=False)
def _gemv_a8x4(xq, xs, lanes, data, s, z, asym, y, ahead, bits):
    """int8 (bits 8) or int4 (bits 4) weights x int8 activations on VNNI machines: y[n, o] = sum_g
    (exact int32 group sum) * s[o, g] * xs[n, g], parallel over blocks of 4 weight rows (the last O mod 4
    rows one at a time). The block (4 rows, a few KiB) stays in L1 while the N rows of x pass over it, two
    at a time (_a8_rows4x2; an odd last one through _a8_rows4x1); it is prefetched (`ahead` bytes on) for
    the first pass. xq: (N, Kp) int8; lanes: (N, 8 ng) from _quantize_x; z: (O, ng) uint8, or a dummy
    (1, 1) when not asym. Results do not depend on the thread count, nor on how rows of x are paired: each
    output is the same sequence of operations in either intrinsic.
    """
    N = xq.shape[0]
    O, ng = s.shape
    G = xq.shape[1] // ng
    gb = G if bits == 8 else G // 2  # bytes per group
    Kb = gb * ng  # bytes per row
    zero = 128 if bits == 8 else 8  # what the unsigned form adds to each weight (asym: z instead)
    flat, sf, zf = data.reshape(-1), s.reshape(-1), z.reshape(-1)
    for blk in prange((O + 3) // 4):
        o0 = 4 * blk
        if o0 + 4 <= O:
            for n in range(0, N - 1, 2):
                t = _a8_rows4x2(flat, o0 * Kb, Kb, xq, n, lanes, sf, o0, 1, xs, zf, asym, zero, ng, gb, bits,
                                ahead if n == 0 else 0)
                _put_block(y, n, o0, t, 2)
            if N % 2:
                n = N - 1
                y[n, o0], y[n, o0 + 1], y[n, o0 + 2], y[n, o0 + 3] = _a8_rows4x1(
                    flat, o0 * Kb, Kb, xq, n, lanes, sf, o0, 1, xs, zf, asym, zero, ng, gb, bits,
                    ahead if n == 0 else 0)
        else:
            for o in range(o0, O):
                for n in range(N):
                    y[n, o] = _a8_rows4x1(flat, o * Kb, 0, xq, n, lanes, sf, o, 0, xs, zf, asym, zero, ng, gb,
                                          bits, 0)[0]


_dot_q8 = _dot_q8_avx2 if AVX2 else _dot_q8_loop
_dot_q4 = _dot_q4_avx2 if AVX2 else _dot_q4_loop
PREFETCH_A8 = 2048  # bytes ahead the int8-activation kernels prefetch their weights
# _a8_block's distances, GB/s from memory (8192 x 2048, G 128, 2 threads), first with the per-group-sum kernel
# it replaced, then re-measured with it (third session): int4, into L2: T0 2 KiB 18.7, T1 8 KiB 20.0, 16 KiB
# 19.7, none 11.5; now T1 4 KiB 20.9-21.2, 8 KiB 20.8-21.6, none 12.9-13.5. int8, into L1: 1 KiB 19.4, 2 KiB
# 20.3, 4 KiB 21.2, none 15.6; now 4 KiB 22.5-23.0, 8 KiB 17.2-21.8, none 18.1-18.9.
PREFETCH_A4_4 = 8192
PREFETCH_A8_4 = 4096


@intrinsic
def _bits_of(typingctx, v):
    """The int32 whose bits are the float32 v (a bitcast, no conversion)."""

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(cache=True, fastmath=False, inline="always")
def _x_scale(xg, G):
    """The int8 step of a group of x: max|x| / 127 (float32), as quant.quantize_activations (NaN if a value is).

    |x| as its bits with the sign cleared: for floats that are not NaN the integer order of those bits is
    the order of the values, and a NaN's bits are above all of them, so the integer maximum is max|x| (or a
    NaN, as NumPy's max gives). A float max cannot be vectorized (the reduction does not reassociate with
    NaN) and waits for each compare: with it, the packed kernel on a 16 x 768 matrix and 16 rows of x took
    20.7 us, 9.9 with this (docs/performance.md, "Tenth session")."""
    m = i32(0)
    for j in range(G):
        m = max(m, _bits_of(xg[j]) & i32(0x7FFFFFFF))
    return _as_f32(m) / f32(127)


@njit(cache=True, fastmath=False, inline="always")
def _x_int8(v, s):
    """A value of x on its group's int8 grid: rint(v / s) clipped to +-127 (s > 0)."""
    return i32(min(max(np.rint(v / s), f32(-127)), f32(127)))


@njit(cache=True, fastmath=False, inline="always")
def _quantize_row(x, n, G, xq, xs, xsum):
    """Row n of x (padded to whole groups) quantized: xq[n], xs[n] and xsum[n] as _quantize_x describes them
    (which calls it, then adds the lane sums); the packed kernel calls it for its rows of x."""
    for g in range(x.shape[1] // G):
        xg = x[n, g * G:(g + 1) * G]
        s = _x_scale(xg, G)
        xs[n, g] = s
        t = i32(0)
        for j in range(G):
            v = i32(0)
            if s > 0:
                v = _x_int8(xg[j], s)
            xq[n, g * G + j] = v
            t += v
        xsum[n, g] = t


@parallel_kernel(fastmath=False)
def _quantize_x(x, G, xq, xs, xsum, lanes):
    """quant.quantize_activations for rows of x already padded to whole groups, bit for bit: per group,
    scale = max|x| / 127 (float32), xq = rint(x / scale) clipped to +-127 (0 where the scale is 0).
    xq is int8 (int4 weights) or int16 (int8 weights: widened here once, not in the inner loop); xsum[n, g]
    is the group's sum of xq (int32), which the int4 kernel needs for the zero point, and lanes[n, 8g + l]
    the part of it that lane l of a 256-bit vpdpbusd adds up (the values at p mod 32 in 4l .. 4l + 3 of
    the group; _a8_block takes the zero points off with it). Parallel over rows.
    """
    N, Kp = x.shape
    for n in prange(N):
        _quantize_row(x, n, G, xq, xs, xsum)
        for g in range(Kp // G):
            for l in range(VNNI_LANES):
                lanes[n, g * VNNI_LANES + l] = 0
            for j in range(G):
                lanes[n, g * VNNI_LANES + (j % 32) // 4] += i32(xq[n, g * G + j])


@parallel_kernel(fastmath=REDUCE)
def _gemv_q8a(xq, xs, q, s, y, ahead):
    """int8 weights x int8 activations, few rows: y[n, o] = sum_g (q[o, g] . xq[n, g]) * s[o, g] * xs[n, g].

    Each group's dot product is an exact int32 (_dot_q8: vpmaddwd), converted to float32 once per group and
    scaled by the product of the two scales. Parallel over weight rows; a thread walks its rows in order
    (one stream, prefetched `ahead` bytes on: the hardware prefetcher stops at every 4 KiB page), and the N
    rows of x meet each weight row while it is in L1. xq: (N, Kp) int16 (values -127..127).
    """
    N, Kp = xq.shape
    O, ng = s.shape
    G = Kp // ng
    flat = q.reshape(-1)
    for o in prange(O):
        qr = q[o]
        for n in range(N):
            xr = xq[n]
            acc = f32(0)
            for g in range(ng):
                if n == 0:
                    at = o * Kp + g * G + ahead
                    for c in range(0, G, 64):
                        if at + c < flat.shape[0]:
                            _prefetch(flat, at + c)
                acc += f32(_dot_q8(qr, xr, g * G, G)) * (s[o, g] * xs[n, g])
            y[n, o] = acc


@parallel_kernel(fastmath=REDUCE)
def _gemv_q4a(xq, xs, xsum, p, s, z, asym, y, ahead):
    """int4 weights x int8 activations, few rows: y[n, o] = sum_g (sum_j n_j xq_j - zero * xsum[n, g]) *
    s[o, g] * xs[n, g], zero = z[o, g] (asym) or 8.

    The nibbles n_j (0..15) multiply x as unsigned bytes (_dot_q4: vpmaddubsw), so nothing is converted to
    float per value and the zero point costs one integer multiply per group: sum (n - zero) xq =
    sum n xq - zero * sum xq, with the group sums of xq made when x was quantized. Parallel over weight rows
    as _gemv_q8a. xq: (N, Kp) int8; z: (O, ng) uint8, or a dummy (1, 1) when not asym.
    """
    N, Kp = xq.shape
    O, ng = s.shape
    G = Kp // ng
    H = G // 2
    flat = p.reshape(-1)
    for o in prange(O):
        pr = p[o]
        for n in range(N):
            xr = xq[n]
            acc = f32(0)
            for g in range(ng):
                if n == 0:
                    at = o * H * ng + g * H + ahead
                    for c in range(0, H, 64):
                        if at + c < flat.shape[0]:
                            _prefetch(flat, at + c)
                zero = i32(z[o, g]) if asym else i32(8)
                t = i32(_dot_q4(pr, g * H, xr, g * G, H) - zero * xsum[n, g])
                acc += f32(t) * (s[o, g] * xs[n, g])
            y[n, o] = acc


def _linear_int8_activations(xp, w, y, data, scales, z, asym):
    """The few-row quantized product with x quantized to int8 (ACTIVATIONS = "int8"): xp (N, Kp) padded."""
    N, Kp = xp.shape
    G, ng = w.group_size, w.n_groups
    xq = np.empty((N, Kp), np.int16 if w.bits == 8 and not VNNI else np.int8)
    xs = np.empty((N, ng), np.float32)
    xsum = np.empty((N, ng), np.int32)
    lanes = np.empty((N, ng * VNNI_LANES), np.int32)
    work = N * w.shape[0] * w.shape[1] * w.bits // 8  # bytes of weights read
    _run(_quantize_x, work, xp, G, xq, xs, xsum, lanes)
    if VNNI:
        ahead = PREFETCH_A8_4 if w.bits == 8 else PREFETCH_A4_4
        _run(_gemv_a8x4, work, xq, xs, lanes, data, scales, z, asym, y, ahead, w.bits)
    elif w.bits == 8:
        _run(_gemv_q8a, work, xq, xs, data, scales, y, PREFETCH_A8)
    else:
        _run(_gemv_q4a, work, xq, xs, xsum, data, scales, z, asym, y, PREFETCH_A8)


# ---------------------------------------------------------------- int8 activations on AMX tiles
# Sapphire Rapids and later have AMX: eight tile registers of up to 16 rows x 64 bytes and tdpbssd, which
# multiplies a 16 x 64 int8 tile by a 64 x 16 one into 16 x 16 int32 sums (16K multiply-adds) in one
# instruction. With int8 activations, a batch of up to 16 rows of x is such a tile: y.T = W . x.T per group,
# A = 16 weight rows x 64 bytes of a group (loaded as they are stored), B = x.T in the "VNNI" layout tdpbssd
# wants (row r holds, for each token t, its 4 values 4r..4r+3: _amx_x repacks x once per call), C the group's
# exact integer sums, which the kernel then scales: acc += float(C) * (s[o, g] * xs[t, g]), as _gemv_q8a
# does. Numba has no AMX: the intrinsics are inline assembly (llvmlite needs its assembly parser for that),
# and Linux hands the tile registers to a process only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM).
# Used for int8 weights with ACTIVATIONS = "int8", AMX_MIN_ROWS <= N < A8_GEMM_MIN_ROWS; TINYSERVE_AMX=0
# switches it off. Measured in docs/performance.md ("Fifth session: AMX tiles for int8 activations").
# From 8 rows: streaming a model's matrices, 4 rows ran at 0.95x the VNNI kernel, 8 rows 1.22x, 12 rows 1.36x,
# 16 rows 1.27x.
AMX_MIN_ROWS = 8
# int4 weights (packed) first go through an unpacking buffer: stories110M int4 decode steps, AMX against VNNI,
# alternating in one process (seventh session): 8 rows 1.05x the time, 12 rows 0.97x, 16 rows 0.93x
AMX_MIN_ROWS_Q4 = 12


def _amx_setup() -> bool:
    """Whether AMX int8 tiles can be used here: the CPU has them, Linux grants them to this process, and
    llvmlite can assemble the instructions."""
    if os.environ.get("TINYSERVE_AMX", "") == "0" or not _host_has("amx-int8", "amx-tile"):
        return False
    try:
        import ctypes

        from llvmlite import binding as ll

        libc = ctypes.CDLL(None, use_errno=True)
        arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18  # x86-64 Linux: syscall number, op, feature
        if libc.syscall(arch_prctl, req_xcomp_perm, xtiledata) != 0:
            return False
        ll.initialize_native_asmparser()
        return True
    except Exception:  # not Linux, no libc: no tiles
        return False


AMX = _amx_setup()
# How many runs of blocks the tile kernels split a matrix into: one per thread at most (set_num_threads may
# lower the count in use; a thread then takes several runs, each loading the tile configuration once).
TILE_RUNS = numba_config.NUMBA_NUM_THREADS
_I64 = ir.IntType(64)


def _amx_ptr(context, builder, ty, array, offset):
    """i8* to element `offset` of a 1-D Numba array."""
    data = _Gen(context, builder, offset.type).data(ty, array)
    return builder.bitcast(builder.gep(data, [offset]), _I8.as_pointer())


def _amx_asm(builder, text, args=(), constraints=""):
    """Inline assembly `text` with operands args ($0, $1, ... in registers: constraints "r,r,..."), which may
    read and write memory."""
    fnty = ir.FunctionType(ir.VoidType(), [a.type for a in args])
    clobbers = ",".join(c for c in (constraints, "~{memory}") if c)
    builder.call(ir.InlineAsm(fnty, text, clobbers, side_effect=True), list(args))


@intrinsic
def _tile_config(typingctx, cfg):
    """Load the tile shapes (cfg: the 64-byte tile configuration, _amx_config)."""

    def codegen(context, builder, sig, args):
        _amx_asm(builder, "ldtilecfg ($0)", [_amx_ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))],
                 "r")
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def _tile_zero(typingctx):
    """Zero the sums tile tmm0."""

    def codegen(context, builder, sig, args):
        _amx_asm(builder, "tilezero %tmm0")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _tile_dot(typingctx, w, woff, wstride, xv, xoff, xstride):
    """tmm0 += tmm1 . tmm2 (tdpbssd) after loading tmm1 from w at woff (rows wstride bytes apart) and tmm2
    from xv at xoff (rows xstride bytes apart)."""

    def codegen(context, builder, sig, args):
        pw = _amx_ptr(context, builder, sig.args[0], args[0], args[1])
        px = _amx_ptr(context, builder, sig.args[3], args[3], args[4])
        _amx_asm(builder, "tileloadd ($0,$1,1), %tmm1\n\ttileloadd ($2,$3,1), %tmm2\n\ttdpbssd %tmm2, %tmm1, %tmm0",
                 [pw, args[2], px, args[5]], "r,r,r,r")
        return context.get_dummy_value()

    return types.void(w, woff, wstride, xv, xoff, xstride), codegen


@intrinsic
def _tile_store(typingctx, c, cstride):
    """Store the sums tile tmm0 to c (rows cstride bytes apart)."""

    def codegen(context, builder, sig, args):
        _amx_asm(builder, "tilestored %tmm0, ($0,$1,1)",
                 [_amx_ptr(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0)), args[1]], "r,r")
        return context.get_dummy_value()

    return types.void(c, cstride), codegen


@functools.lru_cache(maxsize=None)
def _amx_config(rows: int, T: int, kc: int) -> np.ndarray:
    """The 64-byte tile configuration (palette 1): tmm0 sums rows x T int32, tmm1 weights rows x kc bytes,
    tmm2 x.T (kc / 4) x 4T bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t, (r, colsb) in enumerate(((rows, 4 * T), (rows, kc), (kc // 4, 4 * T))):
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, r
    return cfg


# Bytes ahead in the run of 16 weight rows a tile block reads (the packed tile kernel: into L2 per chunk, 4-32
# KiB measured, 8-16 best; the row-major one: into L1 per group, 2-16 KiB, 8-16 best)
PREFETCH_AMX = 8192


@parallel_kernel(fastmath=False)  # no FMA contraction: the parallel and serial builds must round alike
def _gemm_a8_amx(data, s, xv, xsT, G, cfg, cfg_tail, y, ahead):
    """y[t, o] = sum_g s[o, g] * xsT[g, t] * (sum over the group of data[o, j] * xq[t, j]) for T <= 16 rows of
    x given as xv (Kp / 4, T, 4) int8 (x.T in tdpbssd's layout) and xsT (ng, T) their scales; data (M, Kp)
    int8. Blocks of 16 weight rows in parallel; per group one tile of sums, scaled into 16 x T floats."""
    M, Kp = data.shape
    T = xv.shape[1]
    ng = Kp // G
    kc = min(G, 64)
    flat, xflat = data.reshape(-1), xv.reshape(-1)
    for b in prange((M + 15) // 16):
        r0 = b * 16
        rows = min(16, M - r0)
        c = np.empty(16 * T, np.int32)
        acc = np.zeros((16, T), np.float32)
        _tile_config(cfg if rows == 16 else cfg_tail)
        for g in range(ng):
            _tile_zero()
            for k0 in range(g * G, (g + 1) * G, kc):
                if ahead:  # the block's 16 rows are one contiguous run of 16 * Kp bytes, read 16 * kc at a
                    for line in range(0, 16 * kc, 64):  # time: ask for the lines `ahead` bytes on in that run
                        _prefetch(flat, r0 * Kp + 16 * k0 + ahead + line)
                _tile_dot(flat, r0 * Kp + k0, Kp, xflat, k0 * T, 4 * T)
            _tile_store(c, 4 * T)
            for i in range(rows):
                si = s[r0 + i, g]
                for t in range(T):  # contiguous in c, xsT and acc: one vector
                    acc[i, t] += f32(c[i * T + t]) * (si * xsT[g, t])
        for i in range(rows):
            for t in range(T):
                y[t, r0 + i] = acc[i, t]


@parallel_kernel(fastmath=False)
def _amx_x(xp, t0, G, xv, xsT):
    """Rows t0 .. t0 + T of x (padded to whole groups) quantized as _quantize_x does (the same _x_scale and
    _x_int8: bit for bit its values), written straight into the tile layout: xv[k // 4, t, k % 4] =
    xq[t0 + t, k] (x.T as tdpbssd reads it), and the scales transposed, xsT[g, t]. Parallel over rows of x."""
    Kp = xp.shape[1]
    T = xv.shape[1]
    for t in prange(T):
        q = np.empty(G, np.int8)
        for g in range(Kp // G):
            xg = xp[t0 + t, g * G:(g + 1) * G]
            sc = _x_scale(xg, G)
            xsT[g, t] = sc
            if sc > 0:
                for j in range(G):  # contiguous: vectorizes
                    q[j] = _x_int8(xg[j], sc)
            else:
                q[:] = 0
            k4 = g * G // 4
            for i in range(G // 4):
                for b in range(4):
                    xv[k4 + i, t, b] = q[4 * i + b]


def _linear_a8_amx(xp, w, y, data, scales):
    """The int8-activation product of int8 weights on AMX tiles, 16 rows of x at a time."""
    N, Kp = xp.shape
    G, ng, M = w.group_size, w.n_groups, w.shape[0]
    kc = min(G, 64)
    for t0 in range(0, N, 16):
        T = min(16, N - t0)
        xv = np.empty((Kp // 4, T, 4), np.int8)
        xsT = np.empty((ng, T), np.float32)
        _run(_amx_x, T * M * Kp, xp, t0, G, xv, xsT)  # (parallel when the product is: work = its weights)
        _run(_gemm_a8_amx, T * M * Kp, data, scales, xv, xsT, G, _amx_config(16, T, kc),
             _amx_config(M % 16 or 16, T, kc), y[t0:t0 + T], PREFETCH_AMX)


# =========================================================================== linear: matrix-matrix kernels
@njit(cache=True, fastmath=REDUCE, inline="always")
def _tile4x4(X, wb, Y, n0, r0, o0, K):
    """Y[n0:n0+4, o0+r0 : o0+r0+4] = X[n0:n0+4, :K] @ wb[r0:r0+4, :K].T with 16 scalar accumulators.

    The register tile: each step loads 4 values of x and 4 of w and does 16 multiply-adds, and LLVM turns
    the k loop into SIMD with 16 vector accumulators (one horizontal sum each at the end, over all of K).
    """
    x0 = X[n0]
    x1 = X[n0 + 1]
    x2 = X[n0 + 2]
    x3 = X[n0 + 3]
    w0 = wb[r0]
    w1 = wb[r0 + 1]
    w2 = wb[r0 + 2]
    w3 = wb[r0 + 3]
    a00 = a01 = a02 = a03 = f32(0)
    a10 = a11 = a12 = a13 = f32(0)
    a20 = a21 = a22 = a23 = f32(0)
    a30 = a31 = a32 = a33 = f32(0)
    for k in range(K):
        u0 = x0[k]
        u1 = x1[k]
        u2 = x2[k]
        u3 = x3[k]
        v0 = w0[k]
        v1 = w1[k]
        v2 = w2[k]
        v3 = w3[k]
        a00 += u0 * v0
        a01 += u0 * v1
        a02 += u0 * v2
        a03 += u0 * v3
        a10 += u1 * v0
        a11 += u1 * v1
        a12 += u1 * v2
        a13 += u1 * v3
        a20 += u2 * v0
        a21 += u2 * v1
        a22 += u2 * v2
        a23 += u2 * v3
        a30 += u3 * v0
        a31 += u3 * v1
        a32 += u3 * v2
        a33 += u3 * v3
    o = o0 + r0
    Y[n0, o] = a00
    Y[n0, o + 1] = a01
    Y[n0, o + 2] = a02
    Y[n0, o + 3] = a03
    Y[n0 + 1, o] = a10
    Y[n0 + 1, o + 1] = a11
    Y[n0 + 1, o + 2] = a12
    Y[n0 + 1, o + 3] = a13
    Y[n0 + 2, o] = a20
    Y[n0 + 2, o + 1] = a21
    Y[n0 + 2, o + 2] = a22
    Y[n0 + 2, o + 3] = a23
    Y[n0 + 3, o] = a30
    Y[n0 + 3, o + 1] = a31
    Y[n0 + 3, o + 2] = a32
    Y[n0 + 3, o + 3] = a33


@njit(cache=True, fastmath=REDUCE)
def _panel_matmul(X, wb, rows, Y, o0):
    """Y[:, o0:o0+rows] = X @ wb[:rows].T over the first X.shape[1] columns: 4x4 tiles, then the edges.

    Token blocks are the outer loop, so a block of 4 rows of x (4 x K floats, in L1/L2) meets every row of
    the panel before the next block is loaded; the panel itself stays in L2.
    """
    N, K = X.shape
    n4 = N - N % 4
    r4 = rows - rows % 4
    for n0 in range(0, n4, 4):
        for r0 in range(0, r4, 4):
            _tile4x4(X, wb, Y, n0, r0, o0, K)
        for r in range(r4, rows):  # panel rows past the last whole tile
            for n in range(n0, n0 + 4):
                Y[n, o0 + r] = _dot(X[n], wb[r], K)
    for n in range(n4, N):  # tokens past the last whole tile
        for r in range(rows):
            Y[n, o0 + r] = _dot(X[n], wb[r], K)


@njit(parallel=True, cache=True, fastmath=REDUCE)
def _gemm_f32(x, w, y, panel):
    """float32 weights, many rows: panels of `panel` weight rows, each multiplied with register tiles.

    The float baseline of the tiled kernels (see GEMM_F32 for BLAS instead).
    """
    O = w.shape[0]
    for pb in prange((O + panel - 1) // panel):
        o0 = pb * panel
        rows = min(panel, O - o0)
        _panel_matmul(x, w[o0:o0 + rows], rows, y, o0)


@njit(cache=True, fastmath=REDUCE, inline="always")
def _dequantize_panel(data, s, z, asym, bits, o0, rows, wb, G, ng):
    """wb[r] = dequantize(W)[o0 + r] for r < rows, exactly: int8 (bits 8) values times the group's scale, or
    int4 (bits 4) (nibble - zero) * scale, low nibbles to the first half of each group, high to the second."""
    H = G // 2
    for r in range(rows):
        dr = data[o0 + r]
        wr = wb[r]
        for g in range(ng):
            sg = s[o0 + r, g]
            if bits == 8:
                qg = dr[g * G:(g + 1) * G]
                wg = wr[g * G:(g + 1) * G]
                for j in range(G):
                    wg[j] = f32(i32(qg[j])) * sg
            else:
                zero = i32(z[o0 + r, g]) if asym else i32(8)
                pg = dr[g * H:(g + 1) * H]
                wl = wr[g * G:g * G + H]
                wh = wr[g * G + H:(g + 1) * G]
                for j in range(H):
                    b = i32(pg[j])
                    wl[j] = f32(i32(i32(b & 15) - zero)) * sg
                    wh[j] = f32(i32(i32(b >> 4) - zero)) * sg


@njit(parallel=True, cache=True, fastmath=REDUCE)
def _gemm_quant(x, data, s, z, asym, bits, y, panel):
    """int8 (bits 8) or int4 (bits 4; symmetric, or asymmetric with zero points z) weights, many rows.
    Parallel over panels of `panel` weight rows.

    Each panel is dequantized once into a float32 buffer (panel x Kp: the exact values of dequantize(W)),
    which is then multiplied with every 4-token block of x by the 4x4 register tile. The unpacking cost
    is paid once per panel and shared by all N rows of x. z: (O, ng) uint8, or a dummy (1, 1) when not asym.
    """
    O, ng = s.shape
    Kp = x.shape[1]
    G = Kp // ng
    for pb in prange((O + panel - 1) // panel):
        o0 = pb * panel
        rows = min(panel, O - o0)
        wb = np.empty((panel, Kp), np.float32)
        _dequantize_panel(data, s, z, asym, bits, o0, rows, wb, G, ng)
        _panel_matmul(x, wb, rows, y, o0)


# --------------------------------------------- weights packed for int8 activations (PackedWeights)
# With int8 activations, quantized weights stream fastest in the layout llama.cpp's AMX backend gives them (its
# "repack"): blocks of 16 weight rows, and in a block, for every 4 consecutive inputs, the 16 rows' 4 bytes side
# by side (64 bytes; int4: 8 inputs, two nibbles a byte). One 512-bit vpdpbusd then multiplies such a 64-byte
# step by 4 values of x broadcast to every lane and adds the products into 16 int32 lanes, one per weight row:
# no horizontal sums, the scales applied to 16 rows at once, and each thread reads one contiguous run instead of
# 4 interleaved rows. Streaming the int8 matrices of a Llama-3.2-1B decode step in order (sixth session, 2
# threads, same runs): the row-wise kernel (_gemv_a8x4) 0.43-0.58 of the read bandwidth, this layout 0.69-0.79
# (llama.cpp's Q8_0 on this machine: 0.73-0.83 of it, whole model; bench/llamacpp.py). With 8-31 rows of x it also beat the AMX
# tiles (16 rows, 8192 x 2048: 416 against 335 GFLOP/s), which therefore serve only row-major weights.
# cpu.upload packs int8 and int4 weights so when ACTIVATIONS is "int8" at load time on AVX-512 VNNI machines
# (TINYSERVE_PACK=0: not); docs/performance.md, "Sixth session".
PACK = VNNI and AVX512 and os.environ.get("TINYSERVE_PACK", "") != "0"
# Bytes ahead in a block's run that the packed kernel prefetches: llama-1b decode steps with int8 activations,
# distances alternating step by step in one process (sixth session), median ms: int8 1 / 2 / 4 / 8 KiB 48.7 /
# 54.9 / 49.1 / 49.5; int4 0 / 1 / 2 / 3 / 4 / 8 / 16 KiB 37.0 / 33.7 / 29.7-30.5 / 31.0 / 31.6-32.4 / 31.4 / 32.0.
# (With 4 or more rows of x the same distances are asked for line by line as the steps go: _pk_block. There,
# int8 at 16 rows from memory on the AMD machine, G multiply-adds/s: none 180-196, 1 KiB 222-231, 4 KiB
# 249-259, 8 KiB 242-259, 16 / 32 KiB 235-249; fifteenth session.)
PREFETCH_PK8 = 4096
PREFETCH_PK4 = 2048
# ...and each group once more, this many bytes further on, into L2 (0: not). Decode steps alternating in one
# process, far 16 KiB against none (seventh session): llama-1b int4 0.92x the time (twice; 8 and 32 KiB the
# same), int8 1.00x; stories110M (whose weights partly stay in the L3 cache) int4 1.02-1.04x, int8 1.02-1.04x.
# So int4 only, for the models that stream from memory.
PREFETCH_PK4_FAR = 16384
# One row of x on AMD Zen (znver4 measured) reads packed int4 weights faster with no software prefetch at all:
# llama-1b decode steps with int8 activations, none against 2 KiB alternating step by step (thirteenth
# session), 0.888 [0.822, 0.961] and 0.924 [0.877, 0.985] the time (medians of pairs [quartiles]); stories110M
# 0.935 [0.897, 0.958]. At 16 rows the prefetches still pay there (none: 1.084 [1.048, 1.120] the time), and
# int8 gains nothing (none: 1.047 [0.874, 1.137]). On the Intel machine none cost 1.2x (the sixth session's
# figures above).
PREFETCH_PK4_ONE_ROW = 0 if ZEN else PREFETCH_PK4


def _aligned(shape, dtype, align=64) -> np.ndarray:
    """An empty C-contiguous array whose data starts on an `align`-byte boundary (so each 64-byte step of a
    packed block is one cache line)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def _by_block(a: np.ndarray, nb: int) -> np.ndarray:
    """(rows, ng) per-row group values -> (nb, ng, 16): row 16 b + r at [b, :, r] (rows past the end 0)."""
    p = np.zeros((nb * 16, a.shape[1]), a.dtype)
    p[: a.shape[0]] = a
    return np.ascontiguousarray(p.reshape(nb, 16, a.shape[1]).transpose(0, 2, 1))


class PackedWeights:
    """An int8 or int4 QuantizedTensor in the cpu backend's packed form for int8 activations (see above).

    nb = ceil(out / 16) blocks of 16 rows (rows past `out` pad the last block: value 0, scale 0, never output).
    blocks: uint8 (nb, S, 64), S steps of 64 bytes, 4 per row of the block (row r: bytes 4 r .. 4 r + 3):
      int8: S = Kp / 4; byte j of row r in step i is W[16 b + r, 4 i + j] + 128 (vpdpbusd's unsigned operand);
      int4: S = Kp / 8; byte j of row r in step i is n[8 i + j] | n[8 i + 4 + j] << 4, n the row's nibbles
            (0..15) in input order.
    scales: float32 (nb, ng, 16) and zeros (int4-asym): uint8 (nb, ng, 16), row 16 b + r's of group g at
    [b, g, r]. The same numbers as the tensor it came from (unpack() gives it back), in as many bytes.
    """

    def __init__(self, qt: QuantizedTensor, memory: WeightMemory | None = None):
        """memory: where to put the arrays (upload_weight's WeightMemory), else NumPy's heap."""
        self.bits, self.group_size, self.shape = qt.bits, qt.group_size, qt.shape
        self.n_groups, self.padded_in = qt.n_groups, qt.padded_in
        M, Kp = qt.shape[0], qt.padded_in
        nb = -(-M // 16)
        per = 4 if qt.bits == 8 else 8  # inputs per row per step
        self.blocks = (memory.empty if memory is not None else _aligned)((nb, Kp // per, 64), np.uint8)
        for b0 in range(0, nb, 256):  # a few MB at a time: no full-size temporaries
            b1 = min(nb, b0 + 256)
            part = np.asarray(qt.data[16 * b0:16 * b1])
            if qt.bits == 8:
                rows = np.full(((b1 - b0) * 16, Kp), 128, np.uint8)
                rows[: part.shape[0]] = part.view(np.uint8) ^ np.uint8(128)  # w + 128 as an unsigned byte
            else:
                n = np.zeros(((b1 - b0) * 16, Kp), np.uint8)
                n[: part.shape[0]] = unpack_int4(part, qt.group_size)
                n8 = n.reshape(-1, Kp // 8, 2, 4)
                rows = (n8[:, :, 0] | (n8[:, :, 1] << 4)).reshape(-1, Kp // 2)
            self.blocks[b0:b1] = rows.reshape(b1 - b0, 16, Kp // per, 4).transpose(0, 2, 1, 3).reshape(b1 - b0, -1, 64)
        self.scales = _by_block(np.asarray(qt.scales), nb)
        self.zeros = None if qt.zeros is None else _by_block(np.asarray(qt.zeros), nb)
        if memory is not None:
            self.scales = memory.copy(self.scales)
            self.zeros = None if self.zeros is None else memory.copy(self.zeros)
        for a in (self.blocks, self.scales, self.zeros):
            if a is not None:
                a.flags.writeable = False

    @property
    def format(self) -> str:
        return f"int{self.bits}" + ("-asym" if self.zeros is not None else "")

    @functools.cached_property
    def gemv_args(self) -> tuple:
        """_gemv_pk's (and _gemv_pk_tiles') arguments that depend on the weight only: (group size, blocks,
        scales, zeros, asym, bits), and the output table for a plain (N, 16 nb) output; prepared once."""
        return ((self.group_size, self.blocks, self.scales, *_block_zeros(self), self.bits),
                _block_outputs(self.blocks.shape[0], (self.blocks.shape[0] * 16,)))

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))

    def unpack(self) -> QuantizedTensor:
        """The QuantizedTensor it holds (row-major, a copy)."""
        M, Kp, ng, nb = self.shape[0], self.padded_in, self.n_groups, self.blocks.shape[0]
        rows = self.blocks.reshape(nb, -1, 16, 4).transpose(0, 2, 1, 3).reshape(nb * 16, -1)[:M]
        if self.bits == 8:
            data = (rows ^ np.uint8(128)).view(np.int8)
        else:
            n = np.stack([rows & 15, rows >> 4], axis=1).reshape(M, 2, Kp // 8, 4).transpose(0, 2, 1, 3).reshape(M, Kp)
            data = pack_int4(n, self.group_size)

        def by_row(a):
            return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(nb * 16, ng)[:M])

        return QuantizedTensor(self.bits, self.group_size, self.shape, np.ascontiguousarray(data), by_row(self.scales),
                               None if self.zeros is None else by_row(self.zeros))

    def __repr__(self) -> str:
        return f"PackedWeights({self.format}, group_size={self.group_size}, shape={self.shape})"


def _pk_block(nx):
    """An intrinsic for one block of 16 packed weight rows (PackedWeights) against nx rows of int8 x:

        _pk_rowsN(blocks, pstart, xq, xrow, xsum, xs, srow, scales, zeros, sstart, asym, ng, G, bits, y, ystart,
                  ystride, ahead, far)

    writes y[ystart + c * ystride + r] (r < 16, c < nx) = sum_g scales[sstart + 16 g + r] * xs[srow + c * ng + g]
    * (the exact int32 sum over group g of the weight integers of row r (int8: w; int4: n - 8, or n - zero
    when asym) times xq[xrow + c * Kp + ...]). The block's steps start at byte pstart of blocks (flat); xq
    (flat, rows Kp = ng * G apart), xsum and xs (flat, rows ng apart) are _quantize_x's outputs (xsum: the
    group sums of xq); scales and zeros flat (nb * ng * 16; zeros a dummy unless asym).

    Per group, each row of x has 16 int32 lanes that start at -zero * xsum, taking off what the stored bytes
    carry on top of the weight integers: sum (w + 128) x = sum w x + 128 sum x (int8; zero 128), sum n x =
    sum (n - z) x + z sum x (int4; zero 8 or the row's zero point). Then one vpdpbusd per 64-byte step (int4:
    two, the low and the high nibbles) with the step's 4 values of x in every lane; at the group's end the
    lanes are converted (exact: |sum| < 2^24) and multiply-added by the group's 16 scales times x's scale.
    The high nibbles go in unshifted (byte & 0xF0 = 16 n) into lanes of their own, which are shifted back
    (exactly: multiples of 16) once per group: one instruction less per step, int4 in cache 41 -> 60 GB/s on
    one thread. Each weight step loaded serves the nx rows of x. With one or two rows of x, steps alternate
    between two sets of lanes (added at the group's end: integers, so the sums are the same): one vpdpbusd
    waits for the one before on the same lanes (5 cycles), and a single chain per row held a core to 64
    bytes per 5 cycles and kept its loads from running ahead. The block's bytes are prefetched `ahead`
    bytes on (0: not), and with far > 0 once more, far bytes further, into L2. One or two rows of x: a group's
    lines all at the group's start; four or more: each step's line as the step is loaded. A burst of a
    group's 32 prefetches (int8, G = 128) fills the core's queue of misses, and the 16-row pass behind it,
    which computes 16 vpdpbusd per line, stalls until they drain: on the AMD EPYC (Zen 4), stories110M's
    matrices at 16 rows of x from memory 190-213 -> 245-297 G multiply-adds/s on 2 threads (124 -> 155 on
    one), a batch-16 step's products 8.1-9.0 -> 6.3-6.6 ms; at one row of x (memory-bound: the burst gives the
    memory more requests at once) spreading them was slower, 27-29 -> 22-27 GB/s (docs/performance.md,
    "Fifteenth session"). No overflow: |sum| <= 256 * 255 * 127 and 16 * 32 * 15 * 127 * 4 < 2^31.
    """

    chains = 2 if nx <= 2 else 1  # accumulators per row of x and kind of sum (see the docstring)
    spread = nx >= 4  # prefetch line by line as the steps go, not a group's lines at its start (docstring)

    @intrinsic
    def block(typingctx, blocks, pstart, xq, xrow, xsum, xs, srow, scales, zeros, sstart, asym, ng, G, bits, y,
              ystart, ystride, ahead, far):
        def codegen(context, builder, sig, args):
            (pa, ps, xa, xr, xsuma, xsa, sr, sa, za, ss, asy, ngv, Gv, bitsv, ya, ys, ystr, ah, fa) = args
            gen = _Gen(context, builder, ps.type)
            const, load = gen.const, gen.load
            vi, vf, v64 = _vec(_I32, 16), _vec(_F32, 16), _vec(_I8, 64)
            dp = _llvm_fn(builder, "llvm.x86.avx512.vpdpbusd.512", vi, [vi, vi, vi])
            pty, xty, xsumty, xsty, sty, zty, yty = (sig.args[i] for i in (0, 2, 4, 5, 7, 8, 14))
            fsum = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16)) for _ in range(nx)]
            isum = [cgutils.alloca_once(builder, vi) for _ in range(nx)]
            hsum = [cgutils.alloca_once(builder, vi) for _ in range(nx)]  # int4: the high nibbles' sums, times 16
            isum2 = [cgutils.alloca_once(builder, vi) for _ in range(nx)]  # the second chains' (chains == 2)
            hsum2 = [cgutils.alloca_once(builder, vi) for _ in range(nx)]
            Kp = builder.mul(ngv, Gv)
            xrows = [builder.add(xr, builder.mul(Kp, const(c))) for c in range(nx)]
            srows = [builder.add(sr, builder.mul(ngv, const(c))) for c in range(nx)]
            is8 = builder.icmp_unsigned("==", bitsv, ir.Constant(bitsv.type, 8))
            gbytes = builder.select(is8, builder.mul(Gv, const(16)), builder.mul(Gv, const(8)))  # a group's bytes
            pbase = gen.data(pty, pa)

            def dot(c, w, xoff, into=isum):  # into[c] += 4-product sums of the 64 bytes w and x's 4 values at xoff
                x4 = load(xty, xa, xoff, _I32, 1)
                builder.store(builder.call(dp, [builder.load(into[c]), builder.bitcast(w, vi), gen.splat(x4, vi)]),
                              into[c])

            with cgutils.for_range(builder, ngv) as grp:
                g = grp.index
                gstart = builder.add(ps, builder.mul(g, gbytes))

                def prefetch(at, nbytes):  # the bytes from `at` on, `ahead` bytes on (and `far` more, into L2)
                    with builder.if_then(builder.icmp_signed(">", ah, const(0))):
                        gen.prefetch(pbase, builder.add(at, ah), nbytes, 3)
                        with builder.if_then(builder.icmp_signed(">", fa, const(0))):
                            gen.prefetch(pbase, builder.add(at, builder.add(ah, fa)), nbytes, 2)

                if not spread:  # the whole group's lines now
                    prefetch(gstart, gbytes)

                def step_prefetch(at):  # with spread, each 64-byte step's line as the step is loaded
                    if spread:
                        prefetch(at, const(64))

                # the lanes start at -zero * xsum (_Gen.sum_starts)
                zoff = builder.add(ss, builder.mul(g, const(16)))

                def start_lanes(start_of):
                    for c in range(nx):
                        t = load(xsumty, xsuma, builder.add(srows[c], g), _I32, 4)
                        builder.store(start_of(builder.neg(t)), isum[c])

                gen.sum_starts(asy, is8, lambda: builder.zext(load(zty, za, zoff, _vec(_I8, 16), 1), vi), start_lanes)
                xg = [builder.add(xrows[c], builder.mul(g, Gv)) for c in range(nx)]
                zero = ir.Constant(vi, [0] * 16)
                for c in range(nx):  # the second chains start at 0
                    if chains == 2:
                        builder.store(zero, isum2[c])

                def add_chains(high):
                    """isum += the second chain's sums, and for int4 the high nibbles' (multiples of 16: exact)."""
                    for c in range(nx):
                        total = builder.load(isum[c])
                        if chains == 2:
                            total = builder.add(total, builder.load(isum2[c]))
                        if high:
                            h = builder.load(hsum[c])
                            if chains == 2:
                                h = builder.add(h, builder.load(hsum2[c]))
                            total = builder.add(total, builder.ashr(h, ir.Constant(vi, [4] * 16)))
                        builder.store(total, isum[c])

                with builder.if_else(is8) as (int8, int4):
                    with int8:  # a step: 4 inputs of the 16 rows
                        with cgutils.for_range(builder, builder.udiv(Gv, const(4 * chains))) as step:
                            for u in range(chains):
                                k = builder.add(builder.mul(step.index, const(chains)), const(u))
                                w = load(pty, pa, builder.add(gstart, builder.mul(k, const(64))), v64, 64)
                                step_prefetch(builder.add(gstart, builder.mul(k, const(64))))
                                for c in range(nx):
                                    dot(c, w, builder.add(xg[c], builder.mul(k, const(4))), (isum, isum2)[u])
                        add_chains(False)
                    with int4:  # a step: 8 inputs, the first 4 in the low nibbles, the next 4 in the high ones
                        for c in range(nx):
                            for a in (hsum, hsum2)[:chains]:
                                builder.store(zero, a[c])
                        with cgutils.for_range(builder, builder.udiv(Gv, const(8 * chains))) as step:
                            for u in range(chains):
                                k = builder.add(builder.mul(step.index, const(chains)), const(u))
                                b = load(pty, pa, builder.add(gstart, builder.mul(k, const(64))), v64, 64)
                                step_prefetch(builder.add(gstart, builder.mul(k, const(64))))
                                lo = builder.and_(b, ir.Constant(v64, [15] * 64))
                                hi16 = builder.and_(b, ir.Constant(v64, [-16] * 64))  # 16 * the high nibble: no shift
                                for c in range(nx):
                                    x0 = builder.add(xg[c], builder.mul(k, const(8)))
                                    dot(c, lo, x0, (isum, isum2)[u])
                                    dot(c, hi16, builder.add(x0, const(4)), (hsum, hsum2)[u])
                        add_chains(True)
                sc = load(sty, sa, zoff, vf, 4)
                for c in range(nx):
                    sx = gen.splat(load(xsty, xsa, builder.add(srows[c], g), _F32, 4), vf)
                    f = builder.sitofp(builder.load(isum[c]), vf)
                    builder.store(gen.muladd(f, builder.fmul(sc, sx), builder.load(fsum[c])), fsum[c])
            ybase = gen.data(yty, ya)
            for c in range(nx):
                yp = builder.gep(ybase, [builder.add(ys, builder.mul(ystr, const(c)))])
                builder.store(builder.load(fsum[c]), builder.bitcast(yp, vf.as_pointer()), align=4)
            return context.get_dummy_value()

        sig = types.void(blocks, pstart, xq, xrow, xsum, xs, srow, scales, zeros, sstart, asym, ng, G, bits, y, ystart,
                         ystride, ahead, far)
        return sig, codegen

    return block


_pk_rows1 = _pk_block(1)
_pk_rows4 = _pk_block(4)  # four rows of x per pass over the block: 4 + 4 vectors of sums
_pk_rows8 = _pk_block(8)  # batches: int4's widest (8 + 8 + 8 vectors of sums, with the high nibbles')
_pk_rows16 = _pk_block(16)  # int8's widest: 16 + 16 vectors of sums (int4 at 16 spills registers: 0.87x at 8)


@intrinsic
def _pk_tiles(typingctx, blocks, pstart, xq, xrow, xsum, xs, srow, scales, zeros, sstart, asym, ng, G, bits, T, y,
              ystart, ystride, ahead):
    """_pk_rowsN's product for one block of 16 packed weight rows and T <= 16 rows of x, the integer sums on
    AMX tiles: the same arguments (T for N). The caller has loaded the tile configuration
    (_pk_tile_config(min(G, 64))) and gives xq 16 rows from xrow on, rows T and after zeros (the tiles
    compute 16 rows; only T are scaled and written).

    An int8 block is already the B operand tdpbsud wants: kc / 4 steps of 64 bytes hold 4 inputs of the 16 rows
    each, i.e. a (kc / 4) x 64-byte tile, contiguous. An int4 step holds 8 inputs, the first 4 in the low
    nibbles and the next 4 in the high ones: it is unpacked into two such rows (byte & 15, byte >> 4) of a 1 KiB
    buffer (two, used in turn), which the tile then loads. x's rows (int8, Kp apart) are the A tile as they
    are. Per group: tilezero, then per chunk tileloadd x, tileloadd the weights, tdpbsud (x signed, the stored
    values unsigned: w + 128, or the nibbles n): the exact int32 sums for the T rows x 16 weight rows, stored to
    a 1 KiB buffer. Row c then gets -zero * xsum added (_pk_block starts its lanes there: zero 128 for int8, 8
    or the rows' zero points for int4) and goes through the same conversion and multiply-add, so every output
    is bit for bit _pk_rowsN's; one tdpbsud does the work of 16 vpdpbusd. int8 groups go in pairs on two sets
    of tiles (tmm0-2, tmm3-5), so one group's products run while the other's wait on their accumulator, and a
    pair's products are issued before the previous pair's sums are scaled, so the tiles and the vector units
    work at the same time: stories110M int8 batch-16 decode steps 0.93x, then 0.90-0.95x the time
    (docs/performance.md, "Eighth session"). Each chunk's bytes are prefetched `ahead` bytes on into L2 (0:
    not): a chunk at a time rather than a group's 32 lines at once, which asked for more lines than the L1
    cache has fill buffers for (stories110M int8, 49 matrices at 16 rows from memory, 0.94-0.95x the time;
    int4 the same)."""

    def codegen(context, builder, sig, args):
        (pa, ps, xa, xr, xsuma, xsa, sr, sa, za, ss, asy, ngv, Gv, bitsv, Tv, ya, ys, ystr, ah) = args
        gen = _Gen(context, builder, ps.type)
        const, load = gen.const, gen.load
        vi, vf, v64 = _vec(_I32, 16), _vec(_F32, 16), _vec(_I8, 64)
        pty, xty, xsumty, xsty, sty, zty, yty = (sig.args[i] for i in (0, 2, 4, 5, 7, 8, 15))
        fsum = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16)) for _ in range(16)]
        sums = cgutils.alloca_once(builder, ir.ArrayType(vi, 16))  # the tile of sums, row c = x's row c
        sums.align = 64
        unpacked = cgutils.alloca_once(builder, ir.ArrayType(v64, 32))  # int4: two 16-row B tiles, in turn
        unpacked.align = 64
        Kp = builder.mul(ngv, Gv)
        kc = builder.select(builder.icmp_signed(">=", Gv, const(64)), const(64), Gv)
        is8 = builder.icmp_unsigned("==", bitsv, ir.Constant(bitsv.type, 8))
        gbytes = builder.select(is8, builder.mul(Gv, const(16)), builder.mul(Gv, const(8)))  # a group's bytes
        pbase = gen.data(pty, pa)
        xbase = builder.bitcast(gen.data(xty, xa), _I8.as_pointer())
        sums2 = cgutils.alloca_once(builder, ir.ArrayType(vi, 16))  # the second group's, when in pairs
        sums2.align = 64

        def group_tiles(g, acc, ta, tb):
            """Tiles acc (tmm) = the int32 sums of group g: tilezero, then per chunk x into ta, the weights into
            tb, tdpbsud."""
            gstart = builder.add(ps, builder.mul(g, gbytes))
            _amx_asm(builder, f"tilezero %tmm{acc}")
            with cgutils.for_range(builder, builder.udiv(Gv, kc)) as chunk:
                k = builder.mul(chunk.index, kc)
                with builder.if_then(builder.icmp_signed(">", ah, const(0))):  # this chunk's bytes, ahead on
                    cbytes = builder.select(is8, builder.mul(kc, const(16)), builder.mul(kc, const(8)))
                    cstart = builder.add(gstart, builder.mul(chunk.index, cbytes))
                    gen.prefetch(pbase, builder.add(cstart, ah), cbytes, 2)
                px = builder.gep(xbase, [builder.add(xr, builder.add(builder.mul(g, Gv), k))])
                wptr = cgutils.alloca_once(builder, _I8.as_pointer())
                with builder.if_else(is8) as (int8, int4):
                    with int8:  # the block's own bytes: kc / 4 steps of 64
                        pw = builder.gep(pbase, [builder.add(gstart, builder.mul(k, const(16)))])
                        builder.store(builder.bitcast(pw, _I8.as_pointer()), wptr)
                    with int4:  # kc / 8 steps, each into two rows of the buffer
                        half = builder.mul(builder.and_(chunk.index, const(1)), const(16))
                        with cgutils.for_range(builder, builder.udiv(kc, const(8))) as step:
                            i = step.index
                            b = load(pty, pa, builder.add(gstart, builder.mul(builder.add(k, builder.mul(i, const(8))),
                                                                               const(8))), v64, 64)
                            for j, v in enumerate((builder.and_(b, ir.Constant(v64, [15] * 64)),
                                                   builder.lshr(b, ir.Constant(v64, [4] * 64)))):
                                row = builder.add(half, builder.add(builder.mul(i, const(2)), const(j)))
                                builder.store(v, builder.gep(unpacked, [ir.Constant(_I32, 0),
                                                                        builder.trunc(row, _I32)]), align=64)
                        first = builder.gep(unpacked, [ir.Constant(_I32, 0), builder.trunc(half, _I32)])
                        builder.store(builder.bitcast(first, _I8.as_pointer()), wptr)
                _amx_asm(builder, f"tileloadd ($0,$1,1), %tmm{ta}\n\ttileloadd ($2,$3,1), %tmm{tb}\n\t"
                         f"tdpbsud %tmm{tb}, %tmm{ta}, %tmm{acc}", [px, Kp, builder.load(wptr), const(64)], "r,r,r,r")

        def group_scaled(g, buf):
            """The stored sums of group g (buf) started at -zero * xsum, converted and multiply-added into fsum."""
            zoff = builder.add(ss, builder.mul(g, const(16)))
            sc = load(sty, sa, zoff, vf, 4)

            def rows(start_of):
                for c in range(16):
                    with builder.if_then(builder.icmp_signed(">", Tv, const(c))):
                        xo = builder.add(builder.add(sr, builder.mul(ngv, const(c))), g)
                        start = start_of(builder.neg(load(xsumty, xsuma, xo, _I32, 4)))
                        row = builder.load(builder.gep(buf, [ir.Constant(_I32, 0), ir.Constant(_I32, c)]), align=64)
                        isum = builder.add(start, row)
                        sx = gen.splat(load(xsty, xsa, xo, _F32, 4), vf)
                        builder.store(gen.muladd(builder.sitofp(isum, vf), builder.fmul(sc, sx),
                                                 builder.load(fsum[c])), fsum[c])

            # the start -zero * xsum (_Gen.sum_starts)
            gen.sum_starts(asy, is8, lambda: builder.zext(load(zty, za, zoff, _vec(_I8, 16), 1), vi), rows)

        # int8: groups in pairs, on two accumulator tiles (tmm0, tmm3; x and weights in tmm1, tmm2 and tmm4,
        # tmm5), so one group's products run while the other's wait; each group's sums are then scaled in
        # order, so every output is the same sequence of operations. int4 (its weights go through the
        # unpacking buffer) and an odd last group: one at a time.
        # Software-pipelined: pair p's products are issued before pair p - 1's sums are scaled (from the other
        # two buffers), so the tiles and the vector units work at the same time.
        pairs = builder.select(is8, builder.udiv(ngv, const(2)), const(0))
        later = [cgutils.alloca_once(builder, ir.ArrayType(vi, 16)) for _ in range(2)]
        for buf in later:
            buf.align = 64
        s1 = builder.bitcast(sums, _I8.as_pointer())
        with cgutils.for_range(builder, builder.select(builder.icmp_signed(">", pairs, const(0)),
                                                       builder.add(pairs, const(1)), const(0))) as pr:
            p = pr.index
            odd = builder.icmp_signed("!=", builder.and_(p, const(1)), const(0))
            with builder.if_then(builder.icmp_signed("<", p, pairs)):
                g0 = builder.mul(p, const(2))
                group_tiles(g0, 0, 1, 2)
                group_tiles(builder.add(g0, const(1)), 3, 4, 5)
            with builder.if_then(builder.icmp_signed(">", p, const(0))):  # pair p - 1, stored by the last step
                g0 = builder.mul(builder.sub(p, const(1)), const(2))
                group_scaled(g0, builder.select(odd, sums, later[0]))
                group_scaled(builder.add(g0, const(1)), builder.select(odd, sums2, later[1]))
            with builder.if_then(builder.icmp_signed("<", p, pairs)):
                b0, b1 = (builder.bitcast(builder.select(odd, x, y), _I8.as_pointer())
                          for x, y in ((later[0], sums), (later[1], sums2)))
                _amx_asm(builder, "tilestored %tmm0, ($0,$2,1)\n\ttilestored %tmm3, ($1,$2,1)", [b0, b1, const(64)],
                         "r,r,r")
        with cgutils.for_range(builder, builder.sub(ngv, builder.mul(pairs, const(2)))) as rest:
            g = builder.add(builder.mul(pairs, const(2)), rest.index)
            group_tiles(g, 0, 1, 2)
            _amx_asm(builder, "tilestored %tmm0, ($0,$1,1)", [s1, const(64)], "r,r")
            group_scaled(g, sums)
        ybase = gen.data(yty, ya)
        for c in range(16):
            with builder.if_then(builder.icmp_signed(">", Tv, const(c))):
                yp = builder.gep(ybase, [builder.add(ys, builder.mul(ystr, const(c)))])
                builder.store(builder.load(fsum[c]), builder.bitcast(yp, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    sig = types.void(blocks, pstart, xq, xrow, xsum, xs, srow, scales, zeros, sstart, asym, ng, G, bits, T, y, ystart,
                     ystride, ahead)
    return sig, codegen


@functools.lru_cache(maxsize=None)
def _pk_tile_config(kc: int) -> np.ndarray:
    """The tile configuration of _pk_tiles (64 bytes; palette 1): tmm0 the sums, 16 rows x 16 int32; tmm1 x,
    16 rows x kc bytes; tmm2 the block's chunk, kc / 4 rows x 64 bytes; tmm3-5 the same for the second group
    of a pair. Always 16 rows of x (fewer are padded with zeros), so that one configuration serves every
    block and pass: loading one (ldtilecfg) waits for every tile instruction before it to finish."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    for t, (r, colsb) in enumerate(((16, 64), (16, kc), (kc // 4, 64)) * 2):  # tmm3-5: the second group's
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, r
    cfg.flags.writeable = False
    return cfg


@parallel_kernel(fastmath=False)
def _gemv_pk(x, G, blocks, scales, zeros, asym, bits, y, yat, ahead, far):
    """y = the int8-activation product of PackedWeights (blocks, scales, zeros: a dummy unless asym) with the
    rows of x (N, Kp), float32 padded to whole groups; y flat, row n of block b's 16 outputs written at
    N * yat[b, 0] + yat[b, 1] + n * yat[b, 2] (_block_outputs: one (N, 16 nb) array, or the parts of a
    stacked matrix as separate C-contiguous arrays). First x is quantized (_quantize_row: bit for
    bit _quantize_x's values) on the calling thread when it has one or two rows, in parallel over rows when
    more: one parallel region fewer than a separate call for a decode step. Then, parallel over blocks of 16
    weight rows, a block (Kp * 16 or Kp * 8 bytes) stays in cache while the rows of x pass over it, as many at
    a time as the registers hold (int8: 16, int4: 8; then 4, then one by one); it is prefetched on the first
    pass only. Few passes matter: the first pass reads the block from memory while the others only compute,
    so memory idles during them; a stories110M step's 49 matrices at 16 rows, from memory, 10.0-10.6 ms with
    passes of 4 rows, 8.0-8.2 with one pass of 16 (int4, passes of 8: 6.7 -> 5.9 ms). Each output is the
    same sequence of operations whatever the thread count and however the rows of x are grouped."""
    N, Kp = x.shape
    ng = Kp // G
    xq = np.empty((N, Kp), np.int8)
    xs = np.empty((N, ng), np.float32)
    xsum = np.empty((N, ng), np.int32)
    if N <= 2:
        for n in range(N):
            _quantize_row(x, n, G, xq, xs, xsum)
    else:
        for n in prange(N):
            _quantize_row(x, n, G, xq, xs, xsum)
    nb = blocks.shape[0]
    bb = blocks.shape[1] * 64  # bytes per block
    pf, xf, xsf, xsumf, sf, zf = (blocks.reshape(-1), xq.reshape(-1), xs.reshape(-1), xsum.reshape(-1),
                                  scales.reshape(-1), zeros.reshape(-1))
    for b in prange(nb):
        y0, ys = N * yat[b, 0] + yat[b, 1], yat[b, 2]  # where row 0 of the block's outputs goes; rows ys apart
        n = 0
        if bits == 8:
            while n + 16 <= N:
                _pk_rows16(pf, b * bb, xf, n * Kp, xsumf, xsf, n * ng, sf, zf, b * ng * 16, asym, ng, G, bits, y,
                           y0 + n * ys, ys, ahead if n == 0 else 0, far)
                n += 16
        while n + 8 <= N:
            _pk_rows8(pf, b * bb, xf, n * Kp, xsumf, xsf, n * ng, sf, zf, b * ng * 16, asym, ng, G, bits, y,
                      y0 + n * ys, ys, ahead if n == 0 else 0, far)
            n += 8
        while n + 4 <= N:
            _pk_rows4(pf, b * bb, xf, n * Kp, xsumf, xsf, n * ng, sf, zf, b * ng * 16, asym, ng, G, bits, y,
                      y0 + n * ys, ys, ahead if n == 0 else 0, far)
            n += 4
        while n < N:
            _pk_rows1(pf, b * bb, xf, n * Kp, xsumf, xsf, n * ng, sf, zf, b * ng * 16, asym, ng, G, bits, y,
                      y0 + n * ys, ys, ahead if n == 0 else 0, far)
            n += 1


@parallel_kernel(fastmath=False)
def _gemv_pk_tiles(x, G, blocks, scales, zeros, asym, bits, y, yat, ahead, cfg, runs):
    """_gemv_pk with the integer sums on AMX tiles (_pk_tiles): x quantized as there (into rows padded to a
    multiple of 16 with zeros, which the tiles read and nothing uses), then, parallel over runs of blocks (one
    run per thread: `runs`, at most), the tile configuration loaded once per run, and per block the rows of x
    16 at a time; the other arguments as there. Bit for bit _gemv_pk's results, however the blocks are split
    (tested). cfg: _pk_tile_config(min(G, 64)).

    Once per run, not once per block: ldtilecfg waits for every tile instruction before it, so once per block
    it drained the tile loads still waiting on memory at each block's end (stories110M int8 batch-16 decode
    steps 0.93-0.97x the time; docs/performance.md, "Eleventh session")."""
    N, Kp = x.shape
    ng = Kp // G
    xq = np.empty((-(-N // 16) * 16, Kp), np.int8)
    xq[N:] = 0
    xs = np.empty((N, ng), np.float32)
    xsum = np.empty((N, ng), np.int32)
    for n in prange(N):
        _quantize_row(x, n, G, xq, xs, xsum)
    nb = blocks.shape[0]
    bb = blocks.shape[1] * 64
    pf, xf, xsf, xsumf, sf, zf = (blocks.reshape(-1), xq.reshape(-1), xs.reshape(-1), xsum.reshape(-1),
                                  scales.reshape(-1), zeros.reshape(-1))
    runs = min(nb, runs)
    for r in prange(runs):
        _tile_config(cfg)
        for b in range(r * nb // runs, (r + 1) * nb // runs):
            y0, ys = N * yat[b, 0] + yat[b, 1], yat[b, 2]
            for t0 in range(0, N, 16):
                _pk_tiles(pf, b * bb, xf, t0 * Kp, xsumf, xsf, t0 * ng, sf, zf, b * ng * 16, asym, ng, G, bits,
                          min(16, N - t0), y, y0 + t0 * ys, ys, ahead if t0 == 0 else 0)


_NO_BLOCK_ZEROS = np.zeros((1, 1, 1), np.uint8)  # the zeros argument of symmetric packed kernels (unused)
_NO_BLOCK_ZEROS.flags.writeable = False


def _block_zeros(w) -> tuple:
    """The zero-point arguments of the packed kernels for w: (its zeros, True), or (a dummy, False)."""
    return (w.zeros, True) if w.zeros is not None else (_NO_BLOCK_ZEROS, False)


def _pk_prefetch(bits: int, rows: int) -> tuple:
    """_gemv_pk's prefetch distances (ahead, far) for packed weights of `bits` and `rows` rows of x."""
    if bits == 8:
        return PREFETCH_PK8, 0
    return (PREFETCH_PK4_ONE_ROW if rows == 1 else PREFETCH_PK4), PREFETCH_PK4_FAR


@functools.lru_cache(maxsize=None)
def _block_outputs(nb: int, parts: tuple) -> np.ndarray:
    """(nb, 3) int64: where the packed kernels write each block's 16 outputs for the rows of x (_gemv_pk's
    yat): the outputs are `parts` (widths adding up to 16 nb, each a multiple of 16) side by side, part i as
    a C-contiguous (N, parts[i]) array at offset N * off_i of one flat buffer, so a block of part i writes row
    n at N * off_i + (16 b - off_i) + n * parts[i]. One part, (16 nb,): the plain (N, 16 nb) array."""
    yat = np.empty((nb, 3), np.int64)
    off = 0
    for p in parts:
        for b in range(off // 16, (off + p) // 16):
            yat[b] = off, 16 * b - off, p
        off += p
    return yat


def _linear_packed(xp, w, y, parts=None):
    """The int8-activation product of PackedWeights, few rows: into y (N, out), or with parts (widths that are
    multiples of 16, adding up to out) into y flat (N * out), part i as a C-contiguous (N, parts[i]) array at
    N * (the widths before it)."""
    N, M, nb = xp.shape[0], w.shape[0], w.blocks.shape[0]
    front, whole = w.gemv_args
    out = y if parts is not None or nb * 16 == M else np.empty((N, nb * 16), np.float32)
    yat = whole if parts is None else _block_outputs(nb, parts)
    if AMX and N >= (AMX_MIN_ROWS if w.bits == 8 else AMX_MIN_ROWS_Q4):  # the same results, the sums on tiles
        _run(_gemv_pk_tiles, N * w.nbytes, xp, *front, out.reshape(-1), yat, PREFETCH_AMX,
             _pk_tile_config(min(w.group_size, 64)), TILE_RUNS)
    else:
        _run(_gemv_pk, N * w.nbytes, xp, *front, out.reshape(-1), yat, *_pk_prefetch(w.bits, N))
    if out is not y:
        y[:] = out[:, :M]


@njit(cache=True, fastmath=REDUCE, inline="always")
def _dequantize_panel_pk(b32, s, z, asym, bits, o0, rows, wb, G, ng):
    """wb[r] = dequantize(W)[o0 + r] for r < rows from PackedWeights arrays, exactly (b32: the blocks viewed as
    int32, (nb, S, 16): a row's 4 bytes of a step are one int32). Row by row, its 4-byte pieces are gathered
    into a buffer in input order (int8: w + 128; int4: per 8 inputs, 4 bytes of two nibbles), then converted."""
    S = b32.shape[1]
    q = np.empty(4 * S, np.uint8)
    q32 = q.view(np.int32)
    for r in range(rows):
        b, l = (o0 + r) // 16, (o0 + r) % 16
        blk = b32[b]
        for i in range(S):
            q32[i] = blk[i, l]
        wr = wb[r]
        for g in range(ng):
            sg = s[b, g, l]
            if bits == 8:
                qg = q[g * G:(g + 1) * G]
                wg = wr[g * G:(g + 1) * G]
                for j in range(G):
                    wg[j] = f32(i32(qg[j]) - i32(128)) * sg
            else:
                zero = i32(z[b, g, l]) if asym else i32(8)
                for i in range(g * G // 8, (g + 1) * G // 8):
                    for j in range(4):
                        v = i32(q[4 * i + j])
                        wr[8 * i + j] = f32(i32(v & 15) - zero) * sg
                        wr[8 * i + 4 + j] = f32(i32(v >> 4) - zero) * sg


@njit(parallel=True, cache=True, fastmath=REDUCE)
def _gemm_pk(x, blocks, s, z, asym, bits, y, panel):
    """_gemm_quant for PackedWeights (float activations, many rows): panels dequantized from the blocks."""
    O = y.shape[1]
    ng = s.shape[1]
    Kp = x.shape[1]
    G = Kp // ng
    b32 = blocks.view(np.int32)
    for pb in prange((O + panel - 1) // panel):
        o0 = pb * panel
        rows = min(panel, O - o0)
        wb = np.empty((panel, Kp), np.float32)
        _dequantize_panel_pk(b32, s, z, asym, bits, o0, rows, wb, G, ng)
        _panel_matmul(x, wb, rows, y, o0)


# ------------------------------------------------------------------------------------ linear: the wrapper
_NO_ZEROS = np.zeros((1, 1), np.uint8)  # the zero-point argument of symmetric int4 kernels (unused)
_NO_ZEROS.flags.writeable = False

# float32 weights with many rows: "numba" (the tiled kernel above) or "blas" (x @ w.T through NumPy's
# OpenBLAS). BLAS is faster on an idle machine, but its threads wait for each other: with another process
# busy on one of the 2 cores it ran a 128x1024x1024 product at 5 GFLOP/s (the tiled kernel: ~40), so the
# default is the kernel whose speed degrades gracefully (docs/performance.md).
GEMM_F32 = "numba"


def _weight(a: np.ndarray) -> np.ndarray:
    """A weight array as the kernels take it: C-contiguous and read-only (a view; no copy if contiguous).

    Numba compiles one version of a kernel for writable arrays and another for read-only ones (weights
    memory-mapped from a file are read-only). Passing every weight read-only means one version only:
    half the compile time, and warmup() covers every case.
    """
    flags = a.flags
    if not flags.writeable and flags.c_contiguous:  # already so (uploaded weights): the common case
        return a
    a = np.ascontiguousarray(a)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _quant_zeros(w: QuantizedTensor) -> tuple:
    """The zero-point arguments of the row-major quantized kernels for w: (its zeros, True), or (a dummy,
    False)."""
    return (_weight(w.zeros), True) if w.zeros is not None else (_NO_ZEROS, False)


def _padded(x: np.ndarray, kp: int) -> np.ndarray:
    """x (N, in) with zero columns up to kp (the quantized weight's whole groups)."""
    if x.shape[1] == kp:
        return x
    xp = np.zeros((x.shape[0], kp), np.float32)
    xp[:, : x.shape[1]] = x
    return xp


def _plain(a, ndim: int = 2) -> bool:
    """a is what the kernels take as it is: a C-contiguous float32 NumPy array of ndim dimensions (every
    activation of the forward pass). The ops' fast paths check this with attribute reads instead of the
    general paths' 6-10 NumPy calls (asarray, reshape, ascontiguousarray): stories260K decode steps 0.91x,
    larger models within the noise, their calls meeting cold caches either way (docs/performance.md,
    "Twelfth session")."""
    return type(a) is np.ndarray and a.ndim == ndim and a.dtype == F32_DTYPE and a.flags.c_contiguous


def _plain_weight(w, n: int) -> bool:
    """w is a weight vector as upload leaves it (read-only, C-contiguous float32) of n values."""
    return (type(w) is np.ndarray and w.shape == (n,) and w.dtype == F32_DTYPE and not w.flags.writeable
            and w.flags.c_contiguous)


def _one_row(x, w, bias):
    """One row of x through a weight, stacked or not (the decode step of one sequence: every matrix of the
    step), or None where the short path does not apply (then linear's general path runs). The same kernel call
    as the general path makes for one row, without its reshapes and conversions, with a packed weight's
    arguments prepared once (PackedWeights.gemv_args), and stacked outputs as views of one row: at one token a
    step the calls themselves are much of the time, and the general path's checks and conversions cost 15-20
    us a call when the caches are cold (after the previous matrix streamed through them). Decode step times:
    stories110M int8 0.95x (0.98x with int8 activations), 1B int4 0.97x (docs/performance.md, "Eighth
    session")."""
    parts = None
    if type(w) is Stacked:
        parts, w = w.parts, w.weight
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        return None
    t = type(w)
    if t is PackedWeights and ACTIVATIONS == "int8" and x.shape[1] == w.padded_in:
        front, yat = w.gemv_args
        out = np.empty(16 * yat.shape[0], np.float32)
        _run(_gemv_pk, w.nbytes, x, *front, out, yat, *_pk_prefetch(w.bits, 1))
        M = w.shape[0]
        y = out[:M].reshape(1, M)
    elif t is QuantizedTensor and ACTIVATIONS == "float32" and x.shape[1] == w.padded_in:
        M = w.shape[0]
        y = np.empty((1, M), np.float32)
        if w.bits == 8:
            _run(_gemv_q8, M * w.shape[1], x, _weight(w.data), _weight(w.scales), y, _q8_ahead(w.padded_in))
        else:
            z, asym = _quant_zeros(w)
            _run(_gemv_q4, M * w.shape[1] // 2, x, _weight(w.data), _weight(w.scales), z, asym, y, *_q4_call(w))
    elif t is np.ndarray and w.dtype == np.float32 and w.ndim == 2 and x.shape[1] == w.shape[1]:
        M = w.shape[0]
        y = np.empty((1, M), np.float32)
        _run(_gemv_f32_for(1, w.shape[1]), 4 * M * w.shape[1], x, _weight(w), y)
    else:
        return None
    if bias is not None:
        y += np.asarray(bias, dtype=np.float32)
    if parts is None:
        return y
    views, at = [], 0
    for p in parts:  # one row: each part a C-contiguous view (split_columns' ascontiguousarray: ~6 us a part, cold)
        views.append(y[:, at:at + p])
        at += p
    return tuple(views)


def linear(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ W.T + bias. (..., in), W (out, in) float32 or QuantizedTensor -> (..., out) float32.
    W stacked (ops.Stacked): one product over the stacked matrix, split into one output per part."""
    if type(x) is np.ndarray and x.ndim == 2 and x.shape[0] == 1:
        y = _one_row(x, w, bias)
        if y is not None:
            return y
    if isinstance(w, Stacked):
        parts = _packed_parts(x, w, bias)
        return parts if parts is not None else split_columns(linear(x, w.weight, bias), w.parts)
    x = np.asarray(x)
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight {tuple(w.shape)} expects {in_f}")
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype=np.float32)
    N = x2.shape[0]
    y = np.empty((N, out_f), np.float32)
    if N == 0:
        pass
    elif isinstance(w, PackedWeights) and ACTIVATIONS != "int8":  # packed at load, the option switched off since
        y = linear(x2, w.unpack())
    elif isinstance(w, PackedWeights):
        xp = _padded(x2, w.padded_in)
        if N >= A8_GEMM_MIN_ROWS:  # prefill: in float, as for row-major weights
            _gemm_pk(xp, w.blocks, w.scales, *_block_zeros(w), w.bits, y, panel_rows(w.padded_in))
        else:
            _linear_packed(xp, w, y)
    elif isinstance(w, QuantizedTensor):
        if ACTIVATIONS not in ("float32", "int8"):
            raise ValueError(f"cpu.ACTIVATIONS must be 'float32' or 'int8', got {ACTIVATIONS!r}")
        xp = _padded(x2, w.padded_in)
        data, scales = _weight(w.data), _weight(w.scales)
        gemm = N >= (A8_GEMM_MIN_ROWS if ACTIVATIONS == "int8" else GEMM_MIN_ROWS_Q4 if w.bits == 4 else GEMM_MIN_ROWS_Q8)
        if w.bits == 8:
            if gemm:
                _gemm_quant(xp, data, scales, _NO_ZEROS, False, 8, y, panel_rows(w.padded_in))
            elif ACTIVATIONS == "int8" and AMX and N >= AMX_MIN_ROWS:
                _linear_a8_amx(xp, w, y, data, scales)
            elif ACTIVATIONS == "int8":
                _linear_int8_activations(xp, w, y, data, scales, _NO_ZEROS, False)
            else:
                _run(_gemv_q8, N * out_f * in_f, xp, data, scales, y, _q8_ahead(w.padded_in))
        else:
            z, asym = _quant_zeros(w)
            if gemm:
                _gemm_quant(xp, data, scales, z, asym, 4, y, panel_rows(w.padded_in))
            elif ACTIVATIONS == "int8":
                _linear_int8_activations(xp, w, y, data, scales, z, asym)
            else:
                _run(_gemv_q4, N * out_f * in_f // 2, xp, data, scales, z, asym, y, *_q4_call(w))
    else:
        w2 = _weight(np.asarray(w, dtype=np.float32))
        if w2.ndim != 2:
            raise ValueError(f"linear: weight must be 2-D, got shape {w2.shape}")
        if N < GEMM_MIN_ROWS:
            _run(_gemv_f32_for(N, in_f), 4 * N * out_f * in_f, x2, w2, y)
        elif GEMM_F32 == "numba":
            _gemm_f32(x2, w2, y, panel_rows(in_f))
        else:
            np.matmul(x2, w2.T, out=y)  # OpenBLAS sgemm (GEMM_F32 = "blas")
    if bias is not None:
        y += np.asarray(bias, dtype=np.float32)
    return y.reshape(*lead, out_f)


def _packed_parts(x, w: Stacked, bias):
    """A batch (2+ rows) through stacked PackedWeights, each part written straight into its own C-contiguous
    array (no split copies: at 16 rows, 0.6 ms of a stories110M step); None where that does not apply."""
    pw = w.weight
    if not (isinstance(pw, PackedWeights) and ACTIVATIONS == "int8" and isinstance(x, np.ndarray) and x.ndim == 2
            and x.dtype == np.float32 and 2 <= x.shape[0] < A8_GEMM_MIN_ROWS and x.shape[1] == pw.shape[1]
            and all(p % 16 == 0 for p in w.parts)):
        return None
    N = x.shape[0]
    buf = np.empty(N * pw.shape[0], np.float32)
    _linear_packed(_padded(np.ascontiguousarray(x), pw.padded_in), pw, buf, w.parts)
    out, at = [], 0
    for p in w.parts:
        out.append(buf[N * at:N * (at + p)].reshape(N, p))
        at += p
    if bias is not None:
        b, at = np.asarray(bias, dtype=np.float32), 0
        for part, p in zip(out, w.parts):
            part += b[at:at + p]
            at += p
    return tuple(out)


# ============================================================================================ other ops
@parallel_kernel(fastmath=False)
def _take_rows(x, idx, out):
    """out[n] = x[idx[n]]: one row copy per token, in parallel."""
    for n in prange(idx.shape[0]):
        out[n] = x[idx[n]]


@njit(cache=True)
def _wrapped_rows(idx, R):
    """idx with negative indices counted from the end (as NumPy does), or None if one is out of range."""
    out = np.empty_like(idx)
    for i in range(idx.shape[0]):
        j = idx[i] + R if idx[i] < 0 else idx[i]
        if not 0 <= j < R:
            return None
        out[i] = j
    return out


def take_rows(x: np.ndarray, idx) -> np.ndarray:
    """x[idx] for a 2-D x and 1-D integer idx: (R, C), (N,) -> (N, C) float32 (the embedding lookup)."""
    idx = np.asarray(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"take_rows: idx must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    R = x.shape[0]
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2):
        if idx.size and (idx.min() < -R or idx.max() >= R):
            raise IndexError(f"take_rows: an index is outside 0..{R - 1}")
        return np.asarray(np.asarray(x)[idx], dtype=np.float32)  # other dtypes: NumPy does the widening
    idx = _wrapped_rows(np.asarray(idx, dtype=np.int64), R)
    if idx is None:
        raise IndexError(f"take_rows: an index is outside 0..{R - 1}")
    out = np.empty((idx.shape[0], x.shape[1]), np.float32)
    _run(_take_rows, 4 * out.size, _weight(x), idx, out)
    return out


@njit(cache=True, fastmath=REDUCE, inline="always")
def _norm_row(xr, weight, eps, orow):
    """orow = xr / sqrt(mean(xr^2) + eps) * weight: the mean of squares in float32, as the spec."""
    D = xr.shape[0]
    ss = f32(0)
    for d in range(D):
        ss += xr[d] * xr[d]
    r = np.sqrt(ss / f32(D) + eps)
    for d in range(D):
        orow[d] = xr[d] / r * weight[d]


@parallel_kernel(fastmath=REDUCE)
def _rmsnorm(x, weight, eps, out):
    """Per row (in parallel): _norm_row."""
    for n in prange(x.shape[0]):
        _norm_row(x[n], weight, eps, out[n])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: (..., D), (D,) -> (..., D)."""
    x = np.asarray(x)
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rmsnorm: weight shape {weight.shape} does not match the last axis {D}")
    x2 = np.ascontiguousarray(x.reshape(-1, D), dtype=np.float32)
    out = np.empty_like(x2)
    _run(_rmsnorm, 4 * x2.size, x2, _weight(np.asarray(weight, dtype=np.float32)), np.float32(eps), out)
    return out.reshape(x.shape)


@parallel_kernel(fastmath=REDUCE)
def _add_rmsnorm(x, b, weight, eps, s, out):
    """Per row (in parallel): s = x + b, then _norm_row on s (the row in L1), so both outputs are bit for bit
    add's and rmsnorm's."""
    N, D = x.shape
    for n in prange(N):
        xr, br, sr = x[n], b[n], s[n]
        for d in range(D):
            sr[d] = xr[d] + br[d]
        _norm_row(sr, weight, eps, out[n])


def add_rmsnorm(x: np.ndarray, branch: np.ndarray, weight: np.ndarray, eps: float) -> tuple:
    """The residual add and the RMSNorm after it: (x + branch, rmsnorm(x + branch)), one pass and one call.
    (N, D), (N, D), (D,) -> (N, D), (N, D)."""
    if not (_plain(x) and _plain(branch) and x.shape == branch.shape and _plain_weight(weight, x.shape[1])):
        x, branch = np.asarray(x), np.asarray(branch)  # (the forward pass's arrays need none of this)
        if x.ndim != 2 or x.shape != branch.shape or x.dtype != np.float32 or branch.dtype != np.float32:
            s = add(x, branch)  # other shapes or dtypes: as the two ops do them
            return s, rmsnorm(s, weight, eps)
        if weight.shape != (x.shape[1],):
            raise ValueError(f"add_rmsnorm: weight shape {weight.shape} does not match the last axis {x.shape[1]}")
        x, branch = np.ascontiguousarray(x), np.ascontiguousarray(branch)
        weight = _weight(np.asarray(weight, dtype=np.float32))
    s, out = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)
    _run(_add_rmsnorm, 8 * x.size, x, branch, weight, np.float32(eps), s, out)
    return s, out


@njit(cache=True, fastmath=False, inline="always")
def _rotate(xr, c, s, orow):
    """orow = xr with each (i, i + hd/2) pair rotated: (a, b) -> (a c - b s, b c + a s), in float32, stored as
    orow's elements are (_cache_value: float32 as it is; a float16 cache row's uint16 bits rounded)."""
    half = xr.shape[0] // 2
    for i in range(half):
        a = xr[i]
        b = xr[i + half]
        orow[i] = _cache_value(a * c[i] - b * s[i], orow)
        orow[i + half] = _cache_value(b * c[i] + a * s[i], orow)


@parallel_kernel(fastmath=False)
def _rope(x, cos, sin, out):
    """Rotate each (i, i + hd/2) pair of every head by the token's angle. Parallel over tokens.

    cos, sin: (N, hd/2), computed by the wrapper exactly as the reference does (float32 angles).
    """
    N, nh, hd = x.shape
    for n in prange(N):
        for h in range(nh):
            _rotate(x[n, h], cos[n], sin[n], out[n, h])


def rope(x: np.ndarray, positions, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary position embedding (HF half-split layout). (N, nh, hd), (N,), (hd/2,) -> (N, nh, hd)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, _, hd = x.shape
    if hd % 2 or inv_freq.shape != (hd // 2,):
        raise ValueError(f"rope: head dim {hd} needs {hd // 2} frequencies, got {inv_freq.shape}")
    positions = np.asarray(positions)
    if positions.shape != (N,):
        raise ValueError(f"rope: {N} tokens but positions has shape {positions.shape}")
    cos, sin = _rope_tables(positions, inv_freq)
    out = np.empty_like(x)
    _run(_rope, 4 * x.size, x, cos, sin, out)
    return out


def _rope_tables(positions: np.ndarray, inv_freq: np.ndarray):
    """cos and sin of positions x inv_freq, exactly as the reference computes them (float32 NumPy); the
    rotation is then the same four products and two sums, so rope's result is the reference's, bit for bit."""
    angles = positions.astype(np.float32)[:, None] * np.asarray(inv_freq, dtype=np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


# rope_kv_write's cos and sin by position: rows 0..n-1 of _rope_tables(arange(n), inv_freq), kept for each
# read-only frequency array (the model's: upload makes every weight read-only) and grown as positions grow.
# The kernel reads row positions[n] for token n: the same numbers as per-call tables (the angles and NumPy's
# float32 cos and sin are elementwise, whatever array a row is computed in; a test checks it bit for bit),
# without a NumPy call per op. Tables made per call cost a stories110M decode step 6-7 us a layer and 30-70
# us at its first, between kernels that had just flushed the caches (docs/performance.md, "Twelfth session").
# A writable frequency array may change in place, so it gets tables of its call's tokens instead.
_POSITION_TABLES: dict = {}  # id(inv_freq) -> (inv_freq, cos (n, hd/2), sin (n, hd/2)); a few models' worth


def _position_tables(positions: np.ndarray, inv_freq: np.ndarray, longest: int, limit: int):
    """(cos, sin, rows): the tables, and the row of each token (positions, or 0..N-1 for a call's own tables).
    longest: the largest position + 1 (from _check_cache); limit: the cache's length (the tables' most)."""
    entry = _POSITION_TABLES.get(id(inv_freq))  # (an entry holds its array: its id cannot pass to another)
    if entry is not None and entry[1].shape[0] >= longest:
        return entry[1], entry[2], positions
    if inv_freq.flags.writeable:
        cos, sin = _rope_tables(positions, inv_freq)
        return cos, sin, np.arange(positions.shape[0])
    have = entry[1].shape[0] if entry is not None else 0
    n = min(limit, max(longest, 2 * have, 64))  # doubling: a sequence's growth recomputes O(log T) times
    cos, sin = _rope_tables(np.arange(n), inv_freq)
    if len(_POSITION_TABLES) >= 8 and entry is None:
        _POSITION_TABLES.pop(next(iter(_POSITION_TABLES)))  # the oldest model's
    _POSITION_TABLES[id(inv_freq)] = (inv_freq, cos, sin)
    return cos, sin, positions


@njit(cache=True, inline="always")
def _prefetch_cache_rows(k_cache, v_cache, s, t, KVH):
    """Ask for the cache rows (slot s, position t) of every head: each is a cold line in another page, so all
    of them first, then the writes."""
    for h in range(KVH):
        _prefetch(k_cache[s, h, t], 0)
        _prefetch(v_cache[s, h, t], 0)


@njit(cache=True, inline="always")
def _store_row(src, dst):
    """dst[:] = src, each value stored as dst's elements are (_cache_value: float32 as it is; a float16 cache
    row's uint16 bits rounded)."""
    for d in range(src.shape[0]):
        dst[d] = _cache_value(src[d], dst)


@parallel_kernel(fastmath=False)
def _kv_write(k_cache, v_cache, k, v, slots, positions):
    """cache[slots[n], :, positions[n], :] = k[n], v[n]: one token per task (a float16 cache, as uint16 bits,
    gets each value rounded to float16)."""
    N, KVH = k.shape[0], k.shape[1]
    for n in prange(N):
        s = slots[n]
        t = positions[n]
        _prefetch_cache_rows(k_cache, v_cache, s, t, KVH)
        for h in range(KVH):
            _store_row(k[n, h], k_cache[s, h, t])
            _store_row(v[n, h], v_cache[s, h, t])


@njit(cache=True)
def _all_in_range(slots, positions, S, T):
    """(every slot in 0..S-1 and every position in 0..T-1, the largest position + 1, the sum of positions + 1)
    in one pass: cheaper than NumPy's reductions, each a call that costs microseconds between kernels."""
    longest = seen = 0
    for i in range(slots.shape[0]):
        if not (0 <= slots[i] < S and 0 <= positions[i] < T):
            return False, 0, 0
        longest = max(longest, positions[i] + 1)
        seen += positions[i] + 1
    return True, longest, seen


def _check_cache(k_cache, v_cache, slots, positions, N, KVH, hd, op):
    """(slots, positions) as int64 arrays, after checking them and the caches; and the largest position + 1
    and the sum of positions + 1 (what attention sizes its scratch and its work by)."""
    if not (isinstance(k_cache, np.ndarray) and k_cache.dtype in CACHE_DTYPES and k_cache.flags.c_contiguous):
        raise ValueError(f"{op}: the KV cache must be a C-contiguous float32 or float16 NumPy array")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or not v_cache.flags.c_contiguous:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape and dtype")
    S, ckvh, Tmax, chd = k_cache.shape
    if (ckvh, chd) != (KVH, hd):
        raise ValueError(f"{op}: cache holds {ckvh} heads of {chd}, the step has {KVH} of {hd}")
    if type(slots) is not np.ndarray or slots.dtype != I64_DTYPE:  # (int64 arrays, the engine's: as they are)
        slots = np.asarray(slots, dtype=np.int64)
    if type(positions) is not np.ndarray or positions.dtype != I64_DTYPE:
        positions = np.asarray(positions, dtype=np.int64)
    if slots.shape != (N,) or positions.shape != (N,):
        raise ValueError(f"{op}: slots and positions must have shape ({N},)")
    ok, longest, seen = _all_in_range(slots, positions, S, Tmax)
    if not ok:
        raise IndexError(f"{op}: a slot is outside 0..{S - 1} or a position outside 0..{Tmax - 1}")
    return slots, positions, longest, seen


def _kernel_cache(c: np.ndarray) -> np.ndarray:
    """A cache as the kernels take it: float32 as it is, float16 as its uint16 bits (no copy)."""
    return c if c.dtype == F32_DTYPE else c.view(np.uint16)


def kv_write(k_cache, v_cache, k: np.ndarray, v: np.ndarray, slots, positions) -> None:
    """Store each token's key and value at (slot, position) of the caches (in place).

    k_cache, v_cache: (S, KVH, Tmax, hd) float32 or float16 (values rounded to nearest, as NumPy's
    assignment does); k, v: (N, KVH, hd); slots, positions: (N,).
    """
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    N, KVH, hd = k.shape
    if v.shape != k.shape:
        raise ValueError(f"kv_write: k {k.shape} and v {v.shape} differ")
    slots, positions, _, _ = _check_cache(k_cache, v_cache, slots, positions, N, KVH, hd, "kv_write")
    # Each row written is a cold line in another page: the cost is one memory latency per row, not the bytes.
    # Counted as 2 KiB of work per row (SERIAL_BELOW), so 12 heads go parallel from 8 tokens: per layer,
    # serial / parallel, after the caches were flushed (stories110M heads, 4th session): 1 token 4 / 10 us,
    # 4 tokens 14 / 14, 8 tokens 30 / 21, 16 tokens 60 / 35 (before, counted by bytes: serial up to 40 tokens).
    _run(_kv_write, 2 * N * KVH * 2048, _kernel_cache(k_cache), _kernel_cache(v_cache), k, v, slots, positions)


@parallel_kernel(fastmath=False)
def _rope_kv_write(q, k, v, k_cache, v_cache, cos, sin, rows, slots, positions, qout):
    """_rope of q into qout, and _rope of k and v stored at cache[slots[n], :, positions[n], :] as _kv_write
    stores them: the same products and roundings as the three calls, one token per task. Token n's angles
    are row rows[n] of cos and sin (_position_tables)."""
    N, H = q.shape[0], q.shape[1]
    KVH = k.shape[1]
    for n in prange(N):
        s = slots[n]
        t = positions[n]
        c = cos[rows[n]]
        sn = sin[rows[n]]
        _prefetch_cache_rows(k_cache, v_cache, s, t, KVH)
        for h in range(H):
            _rotate(q[n, h], c, sn, qout[n, h])
        for h in range(KVH):  # the rotated key straight into the cache row, rounded to its type as _kv_write does
            _rotate(k[n, h], c, sn, k_cache[s, h, t])
            _store_row(v[n, h], v_cache[s, h, t])


def rope_kv_write(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache, v_cache, slots, positions,
                  inv_freq: np.ndarray) -> np.ndarray:
    """rope(q), and rope(k) and v stored at (slot, position) of the caches (in place), in one call: bit for
    bit rope and kv_write one after the other. (N, H, hd), (N, KVH, hd) x 2, caches, (N,), (N,), (hd/2,)
    -> (N, H, hd). A decode step's three calls a layer cost more than their work (stories110M int8 at one
    token, in the step: rope 2 x 8.8 us, kv_write 12 us)."""
    if not (_plain(q, 3) and _plain(k, 3) and _plain(v, 3)):  # (the forward pass's are)
        q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))
    N, _, hd = q.shape
    if k.ndim != 3 or k.shape[0] != N or k.shape[2] != hd or v.shape != k.shape:
        raise ValueError(f"rope_kv_write: q {q.shape}, k {k.shape} and v {v.shape} do not fit together")
    if hd % 2 or inv_freq.shape != (hd // 2,):
        raise ValueError(f"rope_kv_write: head dim {hd} needs {hd // 2} frequencies, got {inv_freq.shape}")
    KVH = k.shape[1]
    slots, positions, longest, _ = _check_cache(k_cache, v_cache, slots, positions, N, KVH, hd, "rope_kv_write")
    cos, sin, rows = _position_tables(positions, inv_freq, longest, k_cache.shape[2])
    out = np.empty_like(q)
    # work: rope's bytes, and kv_write's rows counted as there (each a cold line in another page)
    _run(_rope_kv_write, 4 * q.size + 2 * N * KVH * 2048, q, k, v, _kernel_cache(k_cache), _kernel_cache(v_cache),
         cos, sin, rows, slots, positions, out)
    return out


KEYS = 16  # keys per block of attention's explicit-vector path (_scores16, _weigh16): one score per lane
# How many key rows ahead attention asks for its keys (the values of a block are asked for as its keys are
# scored). 16, 32, 48 and 64 rows measured alike (stories110M batch 16, float16 and float32 caches).
ATTENTION_AHEAD = 32
# On AMD Zen attention asks for nothing ahead (a compile-time constant: the prefetches are not compiled in):
# stories110M int8 batch-16 decode steps (int8 activations), copies of the kernel with and without swapped in
# step by step (thirteenth session): float16 cache 0.948 [0.914, 0.981] and 0.952 [0.905, 0.988] the time,
# float32 cache 0.972 [0.955, 1.002] and 0.971 [0.944, 0.994]; llama-1b batch 1 0.991 [0.964, 1.027].
ATTENTION_PREFETCH = not ZEN
# On AMD Zen each task first asks for the next task's keys and values (its first ATTENTION_NEXT_ROWS rows of
# each) into L2 (PREFETCHT1): a thread's next task is the next head or sequence, and short spans a few KiB
# apart, read one after another, keep the hardware prefetcher from getting going (a plain read of
# stories110M's spans at 16 sequences, 81 positions, float16: ~10 GB/s a thread against ~16 for one
# contiguous span; ~13 with the next spans asked for into L2, no better into L1). Decode steps, old and new
# trees alternating (fifteenth session): stories110M int8 batch 16 (int8 activations) float16 cache 0.919
# [0.866, 0.978] and 0.857 [0.834, 0.903] the time, float32 cache 0.970 [0.933, 0.992]; batch 1 0.989
# [0.953, 1.021]; llama-1b int8 batch 1 at position 512 1.001 [0.971, 1.025]. Not measured elsewhere: off.
# Each task asks for the next ATTENTION_NEXT_TASKS tasks' rows, so a task's rows are asked for 3 times on their
# way (like the weights' PREFETCH_FAR, a request that does not stay pending ahead is asked for again). Copies of
# _attention with other constants, called in turns in one process on layers' caches past L3 (sixteenth session;
# median of ratios over 1440 calls): stories110M's batch 16 at ~80 positions, float16 cache, the next task
# once 1.0, twice 0.887, the next two 0.787-0.818, the next three **0.744**, 0.754, four 0.738, the second /
# third / fourth task alone 1.0 / 1.02 / 1.02; llama-1b batch 1 at 512 positions: the next three 1.008 [0.916,
# 1.087] (4 tasks a thread: the third is often the other thread's).
ATTENTION_NEXT = ZEN
ATTENTION_NEXT_ROWS = 128
ATTENTION_NEXT_TASKS = 3


def _cache_rows(context, builder, aty, arr, t0):
    """(pointer to row t0 of a 2-D cache block as bytes, the row stride in bytes, the element type) for the
    attention intrinsics; float16 caches come as uint16 bits."""
    a = context.make_array(aty)(context, builder, arr)
    stride = builder.extract_value(a.strides, 0)
    base = builder.bitcast(a.data, _I8.as_pointer())
    return builder.gep(base, [builder.mul(t0, stride)]), stride, (_F32 if aty.dtype == types.float32 else _I16)


def _cache_vector(builder, rowp, at, ety):
    """KEYS values of a cache row from element `at` (rowp: the row as a byte pointer), as float32 lanes:
    float32 as they are, float16 bits widened exactly (vcvtph2ps)."""
    p = builder.gep(builder.bitcast(rowp, ety.as_pointer()), [at])
    v = builder.load(builder.bitcast(p, _vec(ety, KEYS).as_pointer()), align=1)
    if ety == _I16:
        v = builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), KEYS)), _vec(_F32, KEYS))
    return v


def _lane_sums(builder, vs):
    """The vector whose lane i is the sum of vs[i]'s lanes (len(vs) vectors of as many lanes, a power of 2).

    A transpose as it adds: each round pairs the vectors and adds the first half of every segment of a pair
    (both vectors' segments side by side) to the second halves, so n vectors of n / s segments become n / 2
    of n / 2s segments, 15 additions for 16 vectors where 16 separate horizontal sums take 64 (and their
    shuffles). One fixed order; a last shuffle puts the sums in order."""
    n = len(vs)

    def mask(idx):
        return ir.Constant(_vec(_I32, n), idx)

    keys = [[i] for i in range(n)]  # keys[j][s]: which input vector segment s of vector j sums
    while len(vs) > 1:
        m = n // len(keys[0])  # lanes per segment
        nvs, nkeys = [], []
        for j in range(0, len(vs), 2):
            segs = len(keys[j])
            lo = [x for s in range(segs) for x in (list(range(s * m, s * m + m // 2))
                                                  + list(range(n + s * m, n + s * m + m // 2)))]
            hi = [i + m // 2 for i in lo]
            nvs.append(builder.fadd(builder.shuffle_vector(vs[j], vs[j + 1], mask(lo)),
                                    builder.shuffle_vector(vs[j], vs[j + 1], mask(hi))))
            nkeys.append([k for s in range(segs) for k in (keys[j][s], keys[j + 1][s])])
        vs, keys = nvs, nkeys
    order = keys[0]
    return builder.shuffle_vector(vs[0], vs[0], mask([order.index(i) for i in range(n)]))


@intrinsic
def _scores16(typingctx, K, t0, q, hd, scale, S, s0):
    """S[s0 + k] = (K[t0 + k] . q) * scale for the KEYS keys k < KEYS from row t0 of K (a 2-D block of the
    cache, float32 or float16 bits, rows hd values long, hd a multiple of KEYS), q float32.

    Per KEYS values of q (loaded once), each key's KEYS values multiply-add into a vector of its own; then
    _lane_sums adds each key's lanes, all keys at once, and one vector of scores is stored. A Numba loop over
    4 keys at a time ends every score with a horizontal sum of its own: in cache, one thread, G = 4 heads
    over 512 keys of hd 64, 5.2 -> 4.0 us (float16 cache 7.3 -> 4.6)."""

    def codegen(context, builder, sig, args):
        ka, ta, qa, hda, sc, sa, s0a = args
        gen = _Gen(context, builder, ta.type)
        vf = _vec(_F32, KEYS)
        rowp, stride, ety = _cache_rows(context, builder, sig.args[0], ka, ta)
        rows = [builder.gep(rowp, [builder.mul(stride, gen.const(k))]) for k in range(KEYS)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(KEYS)]
        for a in accs:
            builder.store(ir.Constant(vf, None), a)
        with cgutils.for_range(builder, builder.udiv(hda, gen.const(KEYS))) as chunk:
            at = builder.mul(chunk.index, gen.const(KEYS))
            qv = gen.load(sig.args[2], qa, at, vf, 4)
            for k in range(KEYS):
                builder.store(gen.muladd(_cache_vector(builder, rows[k], at, ety), qv, builder.load(accs[k])), accs[k])
        scores = builder.fmul(_lane_sums(builder, [builder.load(a) for a in accs]), gen.splat(sc, vf))
        ptr = builder.gep(gen.data(sig.args[5], sa), [s0a])
        builder.store(scores, builder.bitcast(ptr, vf.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(K, t0, q, hd, scale, S, s0), codegen


@intrinsic
def _weigh16(typingctx, V, t0, p, s0, out, hd):
    """out[:hd] += sum_k p[s0 + k] * V[t0 + k] over the KEYS value rows from row t0 of V (a 2-D block of the
    cache, float32 or float16 bits, hd a multiple of KEYS): per KEYS values of the output, loaded and stored
    once for all KEYS rows (in 4 chains of multiply-adds, keys k, k + 4, ...), where a Numba loop over 4 rows
    at a time loads and stores the output row for every 4. Measured as _scores16: 4.8 -> 3.7 us (float16
    cache 6.0 -> 3.8)."""

    def codegen(context, builder, sig, args):
        va, ta, pa, s0a, oa, hda = args
        gen = _Gen(context, builder, ta.type)
        vf = _vec(_F32, KEYS)
        rowp, stride, ety = _cache_rows(context, builder, sig.args[0], va, ta)
        rows = [builder.gep(rowp, [builder.mul(stride, gen.const(k))]) for k in range(KEYS)]
        weights = [gen.splat(gen.load(sig.args[2], pa, builder.add(s0a, gen.const(k)), _F32, 4), vf)
                   for k in range(KEYS)]
        optr = gen.data(sig.args[4], oa)
        with cgutils.for_range(builder, builder.udiv(hda, gen.const(KEYS))) as chunk:
            at = builder.mul(chunk.index, gen.const(KEYS))
            op = builder.bitcast(builder.gep(optr, [at]), vf.as_pointer())
            accs = [builder.load(op, align=4)] + [ir.Constant(vf, None)] * 3  # 4 chains of multiply-adds
            for k in range(KEYS):
                accs[k % 4] = gen.muladd(_cache_vector(builder, rows[k], at, ety), weights[k], accs[k % 4])
            builder.store(builder.fadd(builder.fadd(accs[0], accs[1]), builder.fadd(accs[2], accs[3])), op, align=4)
        return context.get_dummy_value()

    return types.void(V, t0, p, s0, out, hd), codegen


def _prefetch_rows_into(locality):
    """An intrinsic _prefetch_rows(a, r0, r1) that asks for every cache line of rows r0 .. r1 - 1 of a 2-D
    block of the cache (rows one after another), one prefetch per line over one contiguous span, where a
    prefetch per row and line costs a view and a loop per row (attention's tasks are short: 80 keys of one
    head, float16 cache, in cache on one thread, 1.05 -> 0.97 us a task). locality 3: into L1 (PREFETCHT0),
    2: into L2 (PREFETCHT1)."""

    @intrinsic
    def prefetch_rows(typingctx, a, r0, r1):
        def codegen(context, builder, sig, args):
            aa, ra, rb = args
            gen = _Gen(context, builder, ra.type)
            start, stride, _ = _cache_rows(context, builder, sig.args[0], aa, ra)
            nbytes = builder.mul(builder.sub(rb, ra), stride)
            with builder.if_then(builder.icmp_signed(">", nbytes, gen.const(0))):
                gen.prefetch(start, gen.const(0), builder.add(nbytes, gen.const(63)), locality)
                gen.prefetch_line(builder.gep(start, [builder.sub(nbytes, gen.const(1))]), locality)
            return context.get_dummy_value()

        return types.void(a, r0, r1), codegen

    return prefetch_rows


_prefetch_rows = _prefetch_rows_into(3)
_prefetch_rows_l2 = _prefetch_rows_into(2)


@njit(cache=True, inline="always")
def _max(a, L):
    """The largest of a[0 .. L-1] (L >= 1), in 8 independent running maxima: one chain of L compares waits
    for each compare (1.07 ns a value against 0.16 in 8 chains; LLVM does not vectorize the reduction, max
    not being associative with NaN). A NaN score makes attention's output NaN whichever maximum it picks."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    L8 = L - L % 8
    for t in range(0, L8, 8):
        m0, m1, m2, m3 = max(m0, a[t]), max(m1, a[t + 1]), max(m2, a[t + 2]), max(m3, a[t + 3])
        m4, m5, m6, m7 = max(m4, a[t + 4]), max(m5, a[t + 5]), max(m6, a[t + 6]), max(m7, a[t + 7])
    for t in range(L8, L):
        m0 = max(m0, a[t])
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(cache=True, inline="always")
def _first_visible(pos, window):
    """The first cache position a token at `pos` attends to: 0, or pos - window + 1 with a sliding window."""
    return max(pos - window + 1, 0) if window > 0 else 0


@parallel_kernel(fastmath=REDUCE)
def _attention(q, k_cache, v_cache, slots, positions, window, out, scores):
    """Causal grouped-query attention. Parallel over (token, kv head) pairs.

    A task takes the G = H / KVH query heads that share one kv head, so each key and value row of the
    cache is read once for all of them (nothing is repeated or copied). For token n at position p it
    scores the visible keys t in [lo, p] (lo = p - window + 1 with a sliding window, else 0), takes a
    softmax in float32 (minus the max, exp, sum) and accumulates p_t * v_t, dividing by the sum at the end.
    When hd is a multiple of KEYS (16), keys and values go KEYS rows at a time through explicit-vector
    intrinsics (_scores16: KEYS scores from one pass of q; _weigh16: KEYS value rows into the output row
    loaded once), and the rows left over 4 at a time (the matrix-vector trick of _gemv_f32: each load of q,
    or of the output row, serves 4 rows) and then one at a time. The G heads go together through each block
    of rows, so the block comes from memory once and serves every head from L1 (a head at a time through
    the whole span read the span G times from L2: 1.3-1.7x slower for G = 4, docs/performance.md, "Eighth
    session"). scores: (N * KVH, G, >= longest visible span + 1) scratch, one slice per task (no allocation
    inside the parallel loop); a head's softmax sum goes in its last column used. What is prefetched is
    chosen per CPU (ATTENTION_PREFETCH, ATTENTION_NEXT); it never changes a result.
    """
    N, H, hd = q.shape
    KVH = k_cache.shape[1]
    G = H // KVH
    scale = f32(1.0 / np.sqrt(hd))
    for task in prange(N * KVH):
        n = task // KVH
        kvh = task % KVH
        slot = slots[n]
        pos = positions[n]
        lo = _first_visible(pos, window)
        L = pos - lo + 1
        Lv = L - L % KEYS if hd % KEYS == 0 else 0  # keys through the vector intrinsics
        L4 = Lv + (L - Lv) // 4 * 4  # then 4 at a time
        K = k_cache[slot, kvh, lo:pos + 1]  # (L, hd)
        V = v_cache[slot, kvh, lo:pos + 1]
        S = scores[task]  # (G, >= L + 1)
        if ATTENTION_NEXT:  # the next tasks' first keys and values, into L2 (see ATTENTION_NEXT)
            for ahead in range(1, ATTENTION_NEXT_TASKS + 1):
                nt = min(task + ahead, N * KVH - 1)
                nn = nt // KVH
                npos = positions[nn]
                nlo = _first_visible(npos, window)
                nL = min(npos + 1 - nlo, ATTENTION_NEXT_ROWS)
                _prefetch_rows_l2(k_cache[slots[nn], nt % KVH], nlo, nlo + nL)
                _prefetch_rows_l2(v_cache[slots[nn], nt % KVH], nlo, nlo + nL)
        if ATTENTION_PREFETCH:
            _prefetch_rows(K, 0, min(ATTENTION_AHEAD, L))  # the first keys, which the loops below do not ask for ahead
        for t in range(0, Lv, KEYS):  # scores, KEYS keys at a time, every head of the group
            if ATTENTION_PREFETCH:  # ask for the values these keys will weigh, and for keys further on
                _prefetch_rows(V, t, t + KEYS)
                _prefetch_rows(K, min(t + ATTENTION_AHEAD, L), min(t + ATTENTION_AHEAD + KEYS, L))
            for g in range(G):
                _scores16(K, t, q[n, kvh * G + g], hd, scale, S[g], t)
        for t in range(Lv, L4, 4):  # 4 keys at a time
            if ATTENTION_PREFETCH:
                _prefetch_rows(V, t, t + 4)
                _prefetch_rows(K, min(t + ATTENTION_AHEAD, L), min(t + ATTENTION_AHEAD + 4, L))
            for g in range(G):
                a0, a1, a2, a3 = _dot4_f32(K[t], K[t + 1], K[t + 2], K[t + 3], q[n, kvh * G + g], hd)
                S[g, t], S[g, t + 1], S[g, t + 2], S[g, t + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        for t in range(L4, L):
            for g in range(G):
                S[g, t] = _dot(q[n, kvh * G + g], K[t], hd) * scale
        for g in range(G):  # softmax numerators exp(s - max) in place, and their sum in S[g, L]
            sr = S[g]
            m = _max(sr, L)
            total = f32(0)
            for t in range(L):
                e = _exp(sr[t] - m)
                sr[t] = e
                total += e
            sr[L] = total
            orow = out[n, kvh * G + g]
            for d in range(hd):
                orow[d] = f32(0)
        for t in range(0, Lv, KEYS):  # sum_t p_t v_t, KEYS value rows at a time, every head of the group
            for g in range(G):
                _weigh16(V, t, S[g], t, out[n, kvh * G + g], hd)
        for t in range(Lv, L4, 4):  # 4 value rows at a time
            v0, v1, v2, v3 = V[t], V[t + 1], V[t + 2], V[t + 3]
            for g in range(G):
                p0, p1, p2, p3 = S[g, t], S[g, t + 1], S[g, t + 2], S[g, t + 3]
                orow = out[n, kvh * G + g]
                for d in range(hd):
                    orow[d] += (p0 * _f32_of(v0[d]) + p1 * _f32_of(v1[d]) + p2 * _f32_of(v2[d])
                                + p3 * _f32_of(v3[d]))
        for t in range(L4, L):
            vr = V[t]
            for g in range(G):
                pt = S[g, t]
                orow = out[n, kvh * G + g]
                for d in range(hd):
                    orow[d] += pt * _f32_of(vr[d])
        for g in range(G):  # then / sum
            total = S[g, L]
            orow = out[n, kvh * G + g]
            for d in range(hd):
                orow[d] = orow[d] / total


def attention(q, k_cache, v_cache, slots, positions, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention over the KV cache (see ops/reference.py). Returns (N, H, hd)."""
    if not _plain(q, 3):
        q = np.ascontiguousarray(q, dtype=np.float32)
    N, H, hd = q.shape
    KVH = k_cache.shape[1]
    if H % KVH:
        raise ValueError(f"attention: {H} query heads are not a multiple of {KVH} kv heads")
    slots, positions, longest, seen = _check_cache(k_cache, v_cache, slots, positions, N, KVH, hd, "attention")
    out = np.empty_like(q)
    if window:
        longest = min(longest, int(window))
    scores = np.empty((N * KVH, H // KVH, longest + 1), np.float32)  # + 1: each head's softmax sum
    work = 2 * H * hd * seen  # at most: every key and value a token sees
    _run(_attention, k_cache.itemsize * work, q, _kernel_cache(k_cache), _kernel_cache(v_cache), slots, positions,
         int(window or 0), out, scores)
    return out


@parallel_kernel(fastmath=False)
def _swiglu(gate, up, out):
    """silu(gate) * up elementwise, the spec's formula: gate / (1 + exp(-gate)) * up (exp: _exp, which
    vectorizes; 3-4x faster than a call per value). Parallel over rows."""
    N, F = gate.shape
    for n in prange(N):
        g = gate[n]
        u = up[n]
        o = out[n]
        for i in range(F):
            o[i] = g[i] / (f32(1) + _exp(-g[i])) * u[i]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SwiGLU's gating: silu(gate) * up. (N, F), (N, F) -> (N, F)."""
    if _plain(gate) and _plain(up) and gate.shape == up.shape:  # the forward pass's case: no conversions
        g2, u2 = gate, up
    else:
        gate = np.asarray(gate)
        if np.shape(up) != gate.shape:
            raise ValueError(f"swiglu: gate {gate.shape} and up {np.shape(up)} differ")
        F = gate.shape[-1] if gate.ndim else 1
        g2 = np.ascontiguousarray(gate.reshape(-1, F), dtype=np.float32)
        u2 = np.ascontiguousarray(np.asarray(up).reshape(-1, F), dtype=np.float32)
    out = np.empty(g2.shape, np.float32)
    _run(_swiglu, 8 * g2.size, g2, u2, out)  # bytes read: gate and up
    return out if out.shape == gate.shape else out.reshape(gate.shape)


@parallel_kernel(fastmath=False)
def _add(a, b, out):
    """out = a + b over flat arrays, in parallel chunks of 16384 values."""
    n = a.shape[0]
    chunk = 16384
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        hi = min(n, lo + chunk)
        aa = a[lo:hi]
        bb = b[lo:hi]
        oo = out[lo:hi]
        for i in range(hi - lo):
            oo[i] = aa[i] + bb[i]


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The residual connection: a + b (same shapes; anything else is left to NumPy's broadcasting)."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.dtype != np.float32 or b.dtype != np.float32:
        return a + b  # broadcasting or other dtypes: NumPy, as the reference
    a1 = np.ascontiguousarray(a).reshape(-1)
    b1 = np.ascontiguousarray(b).reshape(-1)
    out = np.empty_like(a1)
    _run(_add, 4 * a1.size, a1, b1, out)
    return out.reshape(a.shape)


# ================================================================================================ warmup
def _warm_calls() -> None:
    """One call of every op with tiny inputs: each kernel signature the model uses."""
    from ..quant import quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    global ACTIVATIONS
    for wt in (w, quantize(w, 8, 32), quantize(w, 4, 32), quantize(w, 4, 32, zero_point=True)):
        for n in (1, 2, GEMM_MIN_ROWS, GEMM_MIN_ROWS_Q8):  # (float32: 1 row may take _gemv_f32_rows, 2 _gemv_f32)
            linear(rng.standard_normal((n, 64)).astype(np.float32), wt)
        saved, ACTIVATIONS = ACTIVATIONS, "int8"  # the int8-activation kernels too, whatever the setting
        try:
            for n in (1, AMX_MIN_ROWS):  # (int8 weights from AMX_MIN_ROWS rows: the AMX kernel, if any)
                linear(rng.standard_normal((n, 64)).astype(np.float32), wt)
            if PACK and wt is not w:  # the same tensor packed: few rows (one, four, the tiles' 8) and prefill
                for n in (1, 4, AMX_MIN_ROWS, A8_GEMM_MIN_ROWS):
                    linear(rng.standard_normal((n, 64)).astype(np.float32), PackedWeights(wt))
        finally:
            ACTIVATIONS = saved
    x = rng.standard_normal((2, 8)).astype(np.float32)
    rmsnorm(x, np.ones(8, np.float32), 1e-5)
    add_rmsnorm(x, x, np.ones(8, np.float32), 1e-5)
    take_rows(w, np.array([1, 2]))
    q = rng.standard_normal((2, 4, 8)).astype(np.float32)
    rope(q, np.array([0, 1]), np.ones(4, np.float32))
    slots, pos = np.array([0, 0]), np.array([0, 1])
    for dtype in (np.float32, np.float16):  # the KV cache's two formats
        kc, vc = np.zeros((1, 2, 4, 8), dtype), np.zeros((1, 2, 4, 8), dtype)
        kv_write(kc, vc, q[:, :2], q[:, 2:], slots, pos)
        rope_kv_write(q, q[:, :2], q[:, 2:], kc, vc, slots, pos, np.ones(4, np.float32))
        attention(q, kc, vc, slots, pos, 0)
    swiglu(x, x)
    add(x, x)


def warmup(weights=None) -> float:
    """Compile (or load from Numba's cache) every kernel signature the model uses; returns seconds spent.

    `weights` is accepted for the backends' common signature; this backend warms every format anyway.

    The wrappers pass weights read-only and activations as fresh float32 arrays, so one call of each op
    with tiny inputs covers every signature (linear: each format, matrix-vector and tiled).
    """
    global SERIAL_BELOW
    t0 = time.perf_counter()
    saved = SERIAL_BELOW
    try:
        for threshold in (0, 2**62):  # every call parallel, then every call serial: both twins compile
            SERIAL_BELOW = threshold
            _warm_calls()
    finally:
        SERIAL_BELOW = saved
    return time.perf_counter() - t0
