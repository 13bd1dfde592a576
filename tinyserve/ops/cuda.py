"""The CUDA backend: every op as numba.cuda kernels, with the signatures of ops/reference.py.

Arrays live on the GPU. `upload` puts host arrays (and quantized tensors) there once, every op takes and
returns device arrays, and `download` brings the logits back: activations and the KV cache never leave the
device between ops. Device arrays support `.reshape` like NumPy arrays (contiguous ones, without a copy),
which is all model.py does to op outputs.

How each public function is built (the convention of every backend): a Python wrapper checks shapes and
dtypes, allocates the output, chooses the kernel and its launch configuration; the kernel takes arrays and
scalars only. docs/cuda.md explains the kernel designs with numbers; the short version:

    take_rows, rope, kv_write, swiglu, add    one thread per output element (grid-stride loops), coalesced
    rmsnorm, add_rmsnorm                      one block per row; tree sum of squares in shared memory
    linear, N <= 4 tokens (decode)            GEMV: one warp per R rows, lanes read consecutive 32-bit words
                                              of a row (coalesced, each weight byte read once, U * R loads in
                                              flight per lane); x staged in shared memory once per block;
                                              int8/int4 turned into floats in registers with a bit trick
    linear, N > 4 tokens (prefill, batches)   tiled GEMM: 64x64 output tiles, 32-wide K steps through shared
                                              memory, 4x4 outputs per thread; weights dequantized into the tile
    attention                                 one block per (token, query head); keys and values in chunks
                                              through shared memory; online softmax (one pass over the keys)

Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, set before numba is imported) runs the same kernels in
Python threads on the CPU: that is how the tests check this module on machines without a GPU. The simulator
costs milliseconds per thread and per barrier, so when it is on, the launch configurations below shrink
(a "warp" of 4 lanes, 2x2-thread GEMM tiles, ...). The kernels are written for any block shape, so the same
code paths run, only narrower.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import TinyserveError
from ..quant import QuantFormat
from . import Stacked

# numba-cuda (0.30.4, the newest at the time of writing) registers its CUDA version of np.row_stack, which NumPy
# 2.5 removed (a deprecated alias of np.vstack since NumPy 2.0), without checking NumPy's version as it does for
# the other removed names; the first kernel compile then fails with "module 'numpy' has no attribute
# 'row_stack'". Seen on an H200 machine with NumPy 2.5.2 (docs/cuda.md, Results). The alias restores it.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

# ------------------------------------------------------------------------------------ is CUDA there?
try:
    from numba import config as _numba_config
    from numba import cuda
except ImportError:  # numba without its CUDA target (numba >= 0.61 ships it as the numba-cuda package)
    raise TinyserveError(
        "--backend cuda needs the numba-cuda package: pip install 'tinyserve[cuda]'"
    ) from None

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)

if not SIMULATOR:
    try:
        _available = cuda.is_available()
    except Exception:  # a broken driver install raises instead of answering
        _available = False
    if not _available:
        raise TinyserveError(
            "--backend cuda: no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 to run on Numba's simulator)"
        )

from numba import float32, int32, uint32  # noqa: E402  (after the checks: these imports cannot fail then)

# numba-cuda warns on every launch of fewer than 128 blocks. Small grids are chosen on purpose here (a
# row block per (token, head) in attention, one block per row in rmsnorm), and the warning's cost is paid
# per launch, so it is off.
_numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

if SIMULATOR:

    def _as_float(bits):
        """The float32 whose bit pattern is the integer `bits` (simulator: plain NumPy)."""
        return np.array([bits], dtype=np.uint32).view(np.float32)[0]

    def _patch_simulator_shared_arrays() -> None:
        """Make the simulator's cuda.shared.array safe for the threads of a block.

        The simulator runs a block's threads as Python threads, and FakeCUDAShared.array finds a block's
        shared array by the calling line with a get-then-insert on a dict, without a lock: two threads can
        both miss and each make its own array, so one thread's writes never reach the others (seen as NaN
        logits and wrong tokens in about 1 run of 6 with 4 simulator processes on 2 cores). Same lookup,
        under a lock; dynamic shared memory (shape 0) and alignment keep the simulator's own handling.
        """
        import sys
        import threading
        import traceback

        from numba.cuda.simulator.kernelapi import FakeCUDAShared
        from numba.np import numpy_support

        original, lock = FakeCUDAShared.array, threading.Lock()

        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:
                return original(self, shape, dtype, alignment)
            if isinstance(dtype, numba_types.Type):
                dtype = numpy_support.as_dtype(dtype)
            caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0][0:2])  # (file, line)
            with lock:
                res = self._allocations.get(caller)
                if res is None:
                    res = self._allocations[caller] = np.empty(shape, dtype)
            return res

        FakeCUDAShared.array = array

    from numba.core import types as numba_types

    _patch_simulator_shared_arrays()

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _as_float(bits):
        """The float32 whose bit pattern is the integer `bits` (one register move on the GPU)."""
        return libdevice.int_as_float(int32(bits))


# ------------------------------------------------------------------------------------ launch settings
@dataclass(frozen=True)
class Launch:
    """Block shapes and shared-memory sizes. One instance for GPUs, a small one for the simulator."""

    threads: int  # block size of the elementwise kernels and rmsnorm (a power of two)
    team: int  # GEMV lanes per row team: a warp (32) on a GPU
    gemv_teams: int  # most teams (warps) in one GEMV block
    gemv_smem: int  # floats of x staged in shared memory by one GEMV block (all tokens of a chunk)
    gemm_threads: int  # GEMM threads per tile side; each computes 4x4 outputs: tiles of 4*gemm_threads
    gemm_tk: int  # K step of the GEMM (values of K staged per tile)
    attn_chunk: int  # keys per chunk in attention (at most; fewer when head_dim is large)
    attn_smem: int  # floats per shared K (and V) chunk buffer in attention
    max_blocks: int  # grid cap of grid-stride kernels (the simulator runs blocks one after another)


GPU_LAUNCH = Launch(threads=256, team=32, gemv_teams=8, gemv_smem=8192, gemm_threads=16, gemm_tk=32,
                    attn_chunk=64, attn_smem=4160, max_blocks=65535)
SIM_LAUNCH = Launch(threads=8, team=4, gemv_teams=2, gemv_smem=128, gemm_threads=2, gemm_tk=8,
                    attn_chunk=4, attn_smem=64, max_blocks=3)
LAUNCH = SIM_LAUNCH if SIMULATOR else GPU_LAUNCH

GEMV_MAX_TOKENS = 4  # linear with N <= this many tokens uses the GEMV kernels once (one tile of tokens)
# up to this many, the GEMV kernels once per 4 tokens; more: the tiled GEMM. On an H200 the GEMM wasted most
# of its 64-row token tiles on a 16-sequence decode step: 50 ms per step of the 1B model (docs/cuda.md).
GEMV_CHUNK_MAX_TOKENS = 16
# GEMV shape per token tile NT: (R rows per warp, U words per lane and row per step). R * NT accumulators per
# lane; U * R loads in flight per lane. On an H200, R = 8, U = 1 read the 1B lm_head and gate/up matrices
# 10-23% faster than R = 4, U = 2 (bench/gpu_check.py's sweep), but the whole 1B decode step was 8-20% slower
# with it: the small matrices (k/v: 512 rows) then have too few warps to fill 132 SMs. Kept at (4, 2).
GEMV_SHAPE = {1: (4, 2), 2: (4, 2), 4: (2, 2)}
MAGIC = 8388608.0  # 2**23: float32 with bits 0x4B000000 | n is exactly 2**23 + n for 0 <= n < 2**23


def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no such attribute
        return 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------- arrays
def _is_device(a) -> bool:
    return hasattr(a, "copy_to_host") or hasattr(a, "__cuda_array_interface__")


@dataclass(eq=False)
class CudaQuantized(QuantFormat):
    """A quantized (out, in) matrix on the device, the layout of tinyserve.quant.QuantizedTensor.

    The packed bytes are uploaded as 32-bit words so that a GPU thread reads 4 bytes in one load:
    words (out, Kp/4) for int8, (out, Kp/8) for int4 (Kp = n_groups * G, rows padded to whole groups).
    A word of int8 holds 4 consecutive values (byte b = value 4w + b, little-endian). A word of int4 holds
    4 bytes of the 'split halves' layout: within a group, byte j = value j (low nibble) | value j + G/2
    (high nibble), so word i of a group holds values 4i..4i+3 (low nibbles) and G/2 + 4i.. (high nibbles).
    """

    bits: int
    group_size: int
    shape: tuple  # (out, in), logical
    words: object  # device uint32 (out, Kp * bits / 32)
    scales: object  # device float32 (out, n_groups)
    zeros: object  # device uint8 (out, n_groups), int4-asym only; else None
    nbytes: int  # bytes a kernel reads per pass (data + scales + zeros), as QuantizedTensor.nbytes

    def __repr__(self) -> str:
        return f"CudaQuantized({self.format}, group_size={self.group_size}, shape={self.shape})"


def upload(a):
    """A host array -> a device array (same dtype, C order); a QuantizedTensor -> a CudaQuantized.

    Device arrays and CudaQuantized pass through unchanged; None stays None.
    """
    if a is None or isinstance(a, CudaQuantized) or _is_device(a):
        return a
    if isinstance(a, Stacked):
        return Stacked(upload(a.weight), a.parts)
    if hasattr(a, "bits") and hasattr(a, "scales"):  # tinyserve.quant.QuantizedTensor
        data = np.ascontiguousarray(a.data)
        words = data.view(np.uint32)  # rows are whole groups of >= 32 values: a whole number of words
        zeros = None if a.zeros is None else cuda.to_device(np.ascontiguousarray(a.zeros, dtype=np.uint8))
        return CudaQuantized(
            bits=int(a.bits), group_size=int(a.group_size), shape=tuple(a.shape), words=cuda.to_device(words),
            scales=cuda.to_device(np.ascontiguousarray(a.scales, dtype=np.float32)), zeros=zeros,
            nbytes=int(a.nbytes),
        )
    return cuda.to_device(np.ascontiguousarray(a))


def download(a) -> np.ndarray:
    """A device array -> a NumPy array (host arrays pass through)."""
    if _is_device(a):
        return a.copy_to_host()
    return np.asarray(a)


def synchronize() -> None:
    """Wait for every queued kernel (the timer calls this around each op)."""
    cuda.synchronize()


def _dev(a, name: str, dtype=None, ndim=None):
    """A device array from an argument (a host array is uploaded: convenient, but it costs a copy)."""
    if a is None:
        raise TinyserveError(f"cuda ops: {name} is missing")
    d = a if _is_device(a) else cuda.to_device(np.ascontiguousarray(a))
    if dtype is not None and d.dtype != np.dtype(dtype):
        raise TinyserveError(f"cuda ops: {name} must be {np.dtype(dtype).name}, got {d.dtype}")
    if ndim is not None and d.ndim != ndim:
        raise TinyserveError(f"cuda ops: {name} must be {ndim}-D, got shape {tuple(d.shape)}")
    return d


def _index(a, name: str):
    """An integer index array on the device (int32 or int64, 1-D)."""
    d = _dev(a, name, ndim=1)
    if d.dtype not in (np.int32, np.int64):
        raise TinyserveError(f"cuda ops: {name} must be an integer array, got {d.dtype}")
    return d


def _flat(a):
    """A contiguous device array viewed as 1-D (no copy)."""
    return a.reshape(int(np.prod(a.shape)))


def _grid(n: int, threads: int) -> int:
    return max(1, min(_cdiv(n, threads), LAUNCH.max_blocks))


# Where kernels are launched and how outputs are allocated: the default stream and plain allocations, except
# while a decode step is being recorded as a CUDA graph (StepGraphs, at the end of this file): then launches
# go to the graph builder's stream and every allocation is kept alive with the graph.
_recording = None  # the cuda.core GraphBuilder while a step is recorded
_recorded_arrays = None  # the arrays allocated while recording
_default_stream = None


def _stream():
    """The stream of the next launch (one cached object: numba would make a new one per launch from 0)."""
    global _default_stream
    if _recording is not None:
        return _recording
    if _default_stream is None:
        if SIMULATOR:
            _default_stream = 0
        else:
            from cuda.core import Stream

            _default_stream = Stream.from_handle(0)  # the legacy default stream, as numba's launches use
    return _default_stream


def _alloc(shape, dtype=np.float32):
    """An uninitialized device array for an op's output."""
    a = cuda.device_array(shape, dtype)
    if _recorded_arrays is not None:
        _recorded_arrays.append(a)
    return a


# --------------------------------------------------------------------------------- elementwise kernels
@cuda.jit
def _fill_kernel(out, value):
    """out[:] = value (1-D), grid-stride."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = value


def zeros(shape, dtype=np.float32):
    """A device array of zeros (filled by a kernel: no host buffer, no copy)."""
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    out = _alloc(shape, dtype=np.dtype(dtype))
    n = int(np.prod(shape))
    if n:
        flat = _flat(out)
        _fill_kernel[_grid(n, LAUNCH.threads), LAUNCH.threads, _stream()](flat, flat.dtype.type(0))
    return out


@cuda.jit
def _take_rows_kernel(x, idx, out):
    """out[n, c] = x[idx[n], c] for every (n, c), one thread per element."""
    C = x.shape[1]
    total = out.shape[0] * C
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        n = i // C
        c = i - n * C
        out[n, c] = x[idx[n], c]


def take_rows(x, idx):
    """x[idx]: (R, C), (N,) -> (N, C) float32. The embedding lookup, and picking the rows for logits."""
    x = _dev(x, "take_rows x", np.float32, 2)
    idx = _index(idx, "take_rows idx")
    out = _alloc((idx.shape[0], x.shape[1]), np.float32)
    n = out.shape[0] * out.shape[1]
    if n:
        _take_rows_kernel[_grid(n, LAUNCH.threads), LAUNCH.threads, _stream()](x, idx, out)
    return out


@cuda.jit
def _add_kernel(a, b, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + b[i]


def _elementwise(kernel, op: str, names: tuple[str, str], a, b):
    """out = kernel(a, b) elementwise over two float32 arrays of one shape (add, swiglu)."""
    a, b = _dev(a, f"{op} {names[0]}", np.float32), _dev(b, f"{op} {names[1]}", np.float32)
    if tuple(a.shape) != tuple(b.shape):
        raise TinyserveError(f"cuda ops: {op} needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = _alloc(a.shape, np.float32)
    n = int(np.prod(a.shape))
    if n:
        kernel[_grid(n, LAUNCH.threads), LAUNCH.threads, _stream()](_flat(a), _flat(b), _flat(out))
    return out


def add(a, b):
    """The residual connection a + b (same shapes)."""
    return _elementwise(_add_kernel, "add", ("a", "b"), a, b)


@cuda.jit
def _swiglu_kernel(gate, up, out):
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise (exp overflow gives -0, as in NumPy)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        g = gate[i]
        out[i] = g / (float32(1.0) + math.exp(-g)) * up[i]


def swiglu(gate, up):
    """SwiGLU's gating silu(gate) * up: (N, F), (N, F) -> (N, F)."""
    return _elementwise(_swiglu_kernel, "swiglu", ("gate", "up"), gate, up)


@cuda.jit
def _add_bias_kernel(y, bias):
    """y[n, m] += bias[m] (in place)."""
    M = y.shape[1]
    for i in range(cuda.grid(1), y.shape[0] * M, cuda.gridsize(1)):
        n = i // M
        m = i - n * M
        y[n, m] += bias[m]


@cuda.jit
def _rope_kernel(x, positions, inv_freq, out):
    """One thread per rotated pair (n, head, i): (a, b) = (x[..., i], x[..., i + hd/2]).

    The angle is float32(position) * inv_freq[i] in float32, as the reference (and transformers) does;
    cos and sin are libdevice's accurate float32 functions.
    """
    N, nh, hd = x.shape
    half = hd // 2
    total = N * nh * half
    for p in range(cuda.grid(1), total, cuda.gridsize(1)):
        i = p % half
        nhead = p // half
        h = nhead % nh
        n = nhead // nh
        angle = float32(positions[n]) * inv_freq[i]
        c = math.cos(angle)
        s = math.sin(angle)
        a = x[n, h, i]
        b = x[n, h, i + half]
        out[n, h, i] = a * c - b * s
        out[n, h, i + half] = b * c + a * s


def rope(x, positions, inv_freq):
    """Rotary embedding, HF half-split layout: (N, nh, hd), (N,), (hd/2,) -> (N, nh, hd)."""
    x = _dev(x, "rope x", np.float32, 3)
    positions = _index(positions, "rope positions")
    inv_freq = _dev(inv_freq, "rope inv_freq", np.float32, 1)
    N, nh, hd = x.shape
    if hd % 2 or inv_freq.shape[0] != hd // 2 or positions.shape[0] != N:
        raise TinyserveError(
            f"cuda ops: rope shapes do not fit: x {tuple(x.shape)}, positions {tuple(positions.shape)}, "
            f"inv_freq {tuple(inv_freq.shape)}"
        )
    out = _alloc(x.shape, np.float32)
    n = N * nh * (hd // 2)
    if n:
        _rope_kernel[_grid(n, LAUNCH.threads), LAUNCH.threads, _stream()](x, positions, inv_freq, out)
    return out


@cuda.jit
def _kv_write_kernel(k_cache, v_cache, k, v, slots, positions):
    """cache[slots[n], h, positions[n], d] = k[n, h, d] (and v), one thread per element."""
    N, KVH, hd = k.shape
    total = N * KVH * hd
    for i in range(cuda.grid(1), total, cuda.gridsize(1)):
        d = i % hd
        nh = i // hd
        h = nh % KVH
        n = nh // KVH
        s = slots[n]
        t = positions[n]
        k_cache[s, h, t, d] = k[n, h, d]
        v_cache[s, h, t, d] = v[n, h, d]


def kv_write(k_cache, v_cache, k, v, slots, positions) -> None:
    """Store each token's key and value at (its slot, its position) of the cache, in place.

    k_cache, v_cache: (S, KVH, Tmax, hd) device arrays; k, v: (N, KVH, hd); slots, positions: (N,).
    """
    if not (_is_device(k_cache) and _is_device(v_cache)):
        raise TinyserveError("cuda ops: kv_write writes into device caches (make them with ops.zeros)")
    k, v = _dev(k, "kv_write k", np.float32, 3), _dev(v, "kv_write v", np.float32, 3)
    slots, positions = _index(slots, "kv_write slots"), _index(positions, "kv_write positions")
    N, KVH, hd = k.shape
    if (tuple(v.shape) != tuple(k.shape) or k_cache.ndim != 4 or tuple(k_cache.shape) != tuple(v_cache.shape)
            or k_cache.shape[1] != KVH or k_cache.shape[3] != hd or slots.shape[0] != N
            or positions.shape[0] != N):
        raise TinyserveError(
            f"cuda ops: kv_write shapes do not fit: cache {tuple(k_cache.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, slots {tuple(slots.shape)}, positions {tuple(positions.shape)}"
        )
    n = N * KVH * hd
    if n:
        _kv_write_kernel[_grid(n, LAUNCH.threads), LAUNCH.threads, _stream()](k_cache, v_cache, k, v, slots, positions)


def rope_kv_write(q, k, v, k_cache, v_cache, slots, positions, inv_freq):
    """rope(q), and rope(k) and v stored at (slot, position) of the caches: the reference's composition of
    rope and kv_write, their kernels launched one after the other (on the GPU a launch costs the same in one
    wrapper or three, and decode steps are replayed as CUDA graphs)."""
    kv_write(k_cache, v_cache, rope(k, positions, inv_freq), v, slots, positions)
    return rope(q, positions, inv_freq)


# ------------------------------------------------------------------------------------------ rmsnorm
_NORM_THREADS = LAUNCH.threads


@cuda.jit(device=True)
def _block_total(partial, tid, nt):
    """The sum of partial[0 .. nt) of a block (every thread has written its own), left in partial[0]: a tree
    of log2(nt) steps, each halving the number of partial sums. nt must be a power of two."""
    cuda.syncthreads()
    stride = nt // 2
    while stride > 0:
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def _scale_row(src, row, weight, eps, out, partial, acc, tid, nt):
    """The end of an RMSNorm row: acc is this thread's sum of squares of its elements of src[row]; the block
    adds them up (_block_total), then every thread writes its elements of out[row] = src[row] * inv * weight."""
    D = src.shape[1]
    partial[tid] = acc
    _block_total(partial, tid, nt)
    inv = float32(1.0) / math.sqrt(partial[0] / float32(D) + eps)
    for d in range(tid, D, nt):
        out[row, d] = src[row, d] * inv * weight[d]
    cuda.syncthreads()  # partial[0] is read by everyone before the next row overwrites it


@cuda.jit
def _rmsnorm_kernel(x, weight, eps, out):
    """One block per row (grid-stride over rows). Threads stride over the row summing squares (reads
    coalesced), a tree in shared memory adds the block's partial sums, then every thread scales its
    elements. blockDim.x must be a power of two."""
    partial = cuda.shared.array(_NORM_THREADS, float32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N, D = x.shape
    for row in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        s = float32(0.0)
        for d in range(tid, D, nt):
            v = x[row, d]
            s += v * v
        _scale_row(x, row, weight, eps, out, partial, s, tid, nt)


def rmsnorm(x, weight, eps):
    """RMSNorm per row: x / sqrt(mean(x^2) + eps) * weight. (N, D), (D,) -> (N, D)."""
    x = _dev(x, "rmsnorm x", np.float32, 2)
    weight = _dev(weight, "rmsnorm weight", np.float32, 1)
    N, D = x.shape
    if weight.shape[0] != D:
        raise TinyserveError(f"cuda ops: rmsnorm weight has {weight.shape[0]} values for rows of {D}")
    out = _alloc((N, D), np.float32)
    if N and D:
        _rmsnorm_kernel[_norm_launch(N, D)](x, weight, np.float32(eps), out)
    return out


def _norm_launch(N: int, D: int) -> tuple:
    """The launch of the norm kernels for N rows of D: one block per row (up to the grid's limit), threads a
    power of two, <= D rounded up."""
    return max(1, min(N, LAUNCH.max_blocks)), min(_NORM_THREADS, 1 << max(0, (D - 1).bit_length())), _stream()


@cuda.jit
def _add_rmsnorm_kernel(x, b, weight, eps, s, out):
    """_rmsnorm_kernel on s = x + b, which each thread first writes for its own elements (and then reads
    back itself: no barrier needed before the scaling)."""
    partial = cuda.shared.array(_NORM_THREADS, float32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N, D = x.shape
    for row in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        acc = float32(0.0)
        for d in range(tid, D, nt):
            v = x[row, d] + b[row, d]
            s[row, d] = v
            acc += v * v
        _scale_row(s, row, weight, eps, out, partial, acc, tid, nt)


def add_rmsnorm(x, branch, weight, eps):
    """The residual add and the RMSNorm after it: (x + branch, rmsnorm(x + branch)), one kernel.
    (N, D), (N, D), (D,) -> (N, D), (N, D)."""
    x = _dev(x, "add_rmsnorm x", np.float32, 2)
    branch = _dev(branch, "add_rmsnorm branch", np.float32, 2)
    weight = _dev(weight, "add_rmsnorm weight", np.float32, 1)
    N, D = x.shape
    if branch.shape != x.shape:
        raise TinyserveError(f"cuda ops: add_rmsnorm of shapes {x.shape} and {branch.shape}")
    if weight.shape[0] != D:
        raise TinyserveError(f"cuda ops: add_rmsnorm weight has {weight.shape[0]} values for rows of {D}")
    s, out = _alloc((N, D), np.float32), _alloc((N, D), np.float32)
    if N and D:
        _add_rmsnorm_kernel[_norm_launch(N, D)](x, branch, weight, np.float32(eps), s, out)
    return s, out


# ------------------------------------------------------------------------------------------ attention
_ATTN_SMEM = LAUNCH.attn_smem


@cuda.jit
def _attention_kernel(q, k_cache, v_cache, slots, positions, window, scale, chunk, out):
    """One block per (token n, query head h), grid-stride over the N*H pairs.

    The block walks its sequence's visible keys (positions lo..pos of slot `slots[n]`, kv head h // G) in
    chunks of `chunk` keys: it copies the chunk's keys and values into shared memory with coalesced loads
    (a head's keys are contiguous in the cache), thread j scores key j (q . k * scale), and the online
    softmax folds the chunk into the running result: with m the running maximum, l the running sum of
    exp(score - m) and o[d] the running weighted sum of values (thread d owns output dimension d),
        m' = max(m, max_j s_j);  o[d] = o[d] * exp(m - m') + sum_j exp(s_j - m') v_j[d];  l likewise.
    Needs blockDim.x >= max(hd, chunk).
    """
    ks = cuda.shared.array(_ATTN_SMEM, float32)  # chunk x (hd + 1): padded rows, conflict-free reads
    vs = cuda.shared.array(_ATTN_SMEM, float32)  # chunk x hd
    qs = cuda.shared.array(256, float32)  # this head's query
    ps = cuda.shared.array(64, float32)  # scores, then probabilities, of the chunk
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    N, H, hd = q.shape
    KVH = k_cache.shape[1]
    G = H // KVH
    kp = hd + 1  # pitch of a key row in shared memory
    for pair in range(cuda.blockIdx.x, N * H, cuda.gridDim.x):
        n = pair // H
        h = pair - n * H
        kvh = h // G
        slot = slots[n]
        pos = positions[n]
        lo = 0
        if window > 0 and pos - window + 1 > 0:
            lo = pos - window + 1
        cuda.syncthreads()  # the previous pair is done with qs
        if tid < hd:
            qs[tid] = q[n, h, tid]
        m = float32(-math.inf)
        l = float32(0.0)
        o = float32(0.0)
        for j0 in range(lo, pos + 1, chunk):
            cnt = min(chunk, pos + 1 - j0)
            cuda.syncthreads()  # everyone is done with the previous chunk (and qs is written)
            for e in range(tid, cnt * hd, nt):  # consecutive threads read consecutive floats
                j = e // hd
                d = e - j * hd
                ks[j * kp + d] = k_cache[slot, kvh, j0 + j, d]
                vs[e] = v_cache[slot, kvh, j0 + j, d]
            cuda.syncthreads()
            if tid < cnt:
                s = float32(0.0)
                for d in range(hd):
                    s += qs[d] * ks[tid * kp + d]
                ps[tid] = s * scale
            cuda.syncthreads()
            m_new = m
            for j in range(cnt):  # every thread reads the same scores (broadcast): no reduction needed
                m_new = max(m_new, ps[j])
            alpha = math.exp(m - m_new)  # 0 for the first chunk (m = -inf)
            cuda.syncthreads()  # all have read the scores before they become probabilities
            if tid < cnt:
                ps[tid] = math.exp(ps[tid] - m_new)
            cuda.syncthreads()
            acc = float32(0.0)
            psum = float32(0.0)
            for j in range(cnt):
                p = ps[j]
                psum += p
                if tid < hd:
                    acc += p * vs[j * hd + tid]
            o = o * alpha + acc
            l = l * alpha + psum
            m = m_new
        if tid < hd:
            out[n, h, tid] = o / l


def attention(q, k_cache, v_cache, slots, positions, window: int = 0):
    """Causal grouped-query attention over the device KV cache: (N, H, hd) -> (N, H, hd).

    Token n attends to slot slots[n]'s positions 0..positions[n] (the last `window` of them if window > 0);
    query head h uses key/value head h // (H // KVH).
    """
    q = _dev(q, "attention q", np.float32, 3)
    if not (_is_device(k_cache) and _is_device(v_cache)):
        raise TinyserveError("cuda ops: attention reads device caches (make them with ops.zeros)")
    slots, positions = _index(slots, "attention slots"), _index(positions, "attention positions")
    N, H, hd = q.shape
    if (k_cache.ndim != 4 or tuple(k_cache.shape) != tuple(v_cache.shape) or k_cache.shape[3] != hd
            or H % k_cache.shape[1] or slots.shape[0] != N or positions.shape[0] != N):
        raise TinyserveError(
            f"cuda ops: attention shapes do not fit: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, "
            f"slots {tuple(slots.shape)}, positions {tuple(positions.shape)}"
        )
    if hd > 256:
        raise TinyserveError(f"cuda ops: attention supports head_dim up to 256, got {hd}")
    chunk = max(1, min(LAUNCH.attn_chunk, _ATTN_SMEM // (hd + 1)))
    threads = max(hd, chunk)
    if not SIMULATOR:
        threads = _cdiv(threads, 32) * 32  # whole warps
    out = _alloc((N, H, hd), np.float32)
    if N:
        scale = np.float32(1.0 / np.sqrt(hd))
        grid = max(1, min(N * H, LAUNCH.max_blocks))
        _attention_kernel[grid, threads, _stream()](q, k_cache, v_cache, slots, positions, int(window), scale, chunk,
                                                    out)
    return out


# ------------------------------------------------------------------------------------- linear: GEMV
# Decode: N <= 4 tokens. Every weight is used N times only, so the kernel is a stream over the weights and
# its speed is the bandwidth at which it reads them. The design:
#   * a block is `teams` warps; warp w owns R consecutive output rows (R * N accumulators per lane);
#   * lanes stride along the row in 32-bit words: lane l reads words l, l+32, l+64, ... of each of its R rows,
#     so one warp-wide load reads 128 consecutive bytes of a row (coalesced), and every byte is read once;
#     each step first issues U words per row for all R rows (U * R independent loads in flight per lane,
#     which is what keeps enough bytes moving to approach the bandwidth), then uses them;
#   * x (the N activation rows) is copied into shared memory once per block in "word order": xs[t, e, j] is
#     the x value that element e of word j multiplies, so lanes reading word j, j+1, ... read consecutive
#     shared-memory floats (no bank conflicts). K longer than the buffer is done in chunks of whole groups;
#   * int8/int4 values become floats without a conversion instruction: the float32 with bits
#     0x4B000000 | n is exactly 2**23 + n, so (bits | n) - (2**23 + zero) is the value minus its zero point
#     (one shift+mask, one OR, one subtract). The group scale multiplies the per-word partial dot product;
#   * at the end each lane holds partial sums; they meet in shared memory, and lane v adds the team's
#     values for accumulator v (two barriers per row block; no warp shuffles, which the simulator lacks).
# Blocks loop over row blocks (grid-stride), so x is staged once per block when K fits in one chunk.


def _stage_x_f32(x, xs, c0, cw, N, NT):
    """Shared xs[t * cw + j] = x[t, c0 + j] for the chunk [c0, c0 + cw) (zeros for tokens t >= N)."""
    tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    nthr = cuda.blockDim.x * cuda.blockDim.y
    for t in range(NT):
        for j in range(tid, cw, nthr):
            v = float32(0.0)
            if t < N:
                v = x[t, c0 + j]
            xs[t * cw + j] = v


def _make_reduce_rows(R, NT):
    """The end of a row block, shared by the GEMV kernels: every lane's partial sums acc (R, NT) go to the
    shared red[team], then lane l adds up accumulator l (and l + 32, ...) over the lanes and writes y.
    Inlined, with R and NT compile-time constants, so acc stays in registers."""

    def reduce_rows(acc, red, y, team, lane, nl, row0, M, N):
        for r in range(R):
            for t in range(NT):
                red[team, r * NT + t, lane] = acc[r, t]
        cuda.syncthreads()
        for v in range(lane, R * NT, nl):
            r = v // NT
            t = v - r * NT
            if row0 + r < M and t < N:
                s = float32(0.0)
                for i in range(nl):
                    s += red[team, v, i]
                y[t, row0 + r] = s
        cuda.syncthreads()  # red is read before the next row block writes it

    return cuda.jit(device=True, inline=True)(reduce_rows)


def _make_gemv_f32(NT, R, U):
    """The float32 GEMV kernel for a token tile of NT (N <= NT), R rows per warp, U words per lane per step."""
    SMEM, TEAMS, RV, PITCH = LAUNCH.gemv_smem, LAUNCH.gemv_teams, R * NT, LAUNCH.team + 1  # compile-time sizes
    stage = cuda.jit(device=True)(_stage_x_f32)
    reduce_rows = _make_reduce_rows(R, NT)

    def gemv_f32(x, w, y, N, chunk):
        xs = cuda.shared.array(SMEM, float32)
        red = cuda.shared.array((TEAMS, RV, PITCH), float32)  # the teams' partial sums
        acc = cuda.local.array((R, NT), float32)  # register-resident: every index is a compile-time constant
        wv = cuda.local.array((U, R), float32)
        lane = cuda.threadIdx.x
        team = cuda.threadIdx.y
        nl = cuda.blockDim.x
        M, K = w.shape
        rows_per_block = cuda.blockDim.y * R
        nchunks = (K + chunk - 1) // chunk
        it = 0
        for rb in range(cuda.blockIdx.x, (M + rows_per_block - 1) // rows_per_block, cuda.gridDim.x):
            row0 = rb * rows_per_block + team * R
            for r in range(R):
                for t in range(NT):
                    acc[r, t] = float32(0.0)
            for c in range(nchunks):
                c0 = c * chunk
                cw = min(chunk, K - c0)
                if nchunks > 1 or it == 0:  # one chunk: staged once, reused for every row block
                    cuda.syncthreads()
                    stage(x, xs, c0, cw, N, NT)
                    cuda.syncthreads()
                for j0 in range(lane, cw, nl * U):
                    for u in range(U):  # issue all U * R loads before using any: more bytes in flight
                        for r in range(R):
                            v = float32(0.0)
                            if j0 + u * nl < cw and row0 + r < M:
                                v = w[row0 + r, c0 + j0 + u * nl]
                            wv[u, r] = v
                    for u in range(U):
                        j = j0 + u * nl
                        if j < cw:
                            for t in range(NT):
                                xv = xs[t * cw + j]
                                for r in range(R):
                                    acc[r, t] += wv[u, r] * xv
            reduce_rows(acc, red, y, team, lane, nl, row0, M, N)
            it += 1

    gemv_f32.__name__ = f"gemv_f32_nt{NT}_r{R}_u{U}"
    return cuda.jit(gemv_f32)


def _stage_x_q(x, xs, c0w, cw, N, NT, EPW, lg, K):
    """Shared xs[(t * EPW + e) * cw + j] = the x value multiplying element e of word c0w + j.

    int8 (EPW 4): element e of word w is value 4w + e. int4 (EPW 8, split halves per group of G = 2**lg):
    word w is word i = w mod G/8 of group g = w div G/8; elements 0..3 are values g*G + 4i + e (low
    nibbles), elements 4..7 are values g*G + G/2 + 4i + e - 4 (high nibbles). The loop runs over x in
    memory order (coalesced reads) and computes where each value goes, with shifts and masks only (chunks
    start on group boundaries). Values past K (row padding) are 0.
    """
    tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    nthr = cuda.blockDim.x * cuda.blockDim.y
    k0 = c0w * EPW
    for t in range(NT):
        for kk in range(tid, cw * EPW, nthr):  # offset in the chunk
            if EPW == 4:
                j = kk >> 2
                e = kk & 3
            else:
                r = kk & ((1 << lg) - 1)  # position in the group
                half = r >> (lg - 1)  # 0: low nibbles, 1: high nibbles
                b = r & ((1 << (lg - 1)) - 1)  # byte in the group
                j = ((kk >> lg) << (lg - 3)) + (b >> 2)
                e = half * 4 + (b & 3)
            v = float32(0.0)
            if t < N and k0 + kk < K:
                v = x[t, k0 + kk]
            xs[(t * EPW + e) * cw + j] = v


def _make_gemv_q(BITS, NT, R, HAS_ZERO, U):
    """The int8 / int4 GEMV kernel (see the comment above): token tile NT, R rows per warp, U words per lane
    and row per step (U * R 32-bit loads in flight per lane)."""
    SMEM, TEAMS, RV, PITCH = LAUNCH.gemv_smem, LAUNCH.gemv_teams, R * NT, LAUNCH.team + 1  # compile-time sizes
    EPW = 4 if BITS == 8 else 8  # values per 32-bit word
    MASK = 0xFF if BITS == 8 else 0xF
    FLIP = 0x80 if BITS == 8 else 0  # int8 is two's complement: flip the sign bit to get q + 128
    stage = cuda.jit(device=True)(_stage_x_q)
    reduce_rows = _make_reduce_rows(R, NT)

    def gemv_q(x, words, scales, zeros, y, N, K, lg, chunk):
        xs = cuda.shared.array(SMEM, float32)
        red = cuda.shared.array((TEAMS, RV, PITCH), float32)  # the teams' partial sums
        acc = cuda.local.array((R, NT), float32)
        tmp = cuda.local.array(NT, float32)
        wq = cuda.local.array((U, R), uint32)  # the step's words, scales and zero offsets
        ws = cuda.local.array((U, R), float32)
        wz = cuda.local.array((U, R), float32)
        lane = cuda.threadIdx.x
        team = cuda.threadIdx.y
        nl = cuda.blockDim.x
        M, Kw = words.shape
        lgw = lg - (2 if BITS == 8 else 3)  # words per group = 2**lgw
        rows_per_block = cuda.blockDim.y * R
        nchunks = (Kw + chunk - 1) // chunk
        it = 0
        for rb in range(cuda.blockIdx.x, (M + rows_per_block - 1) // rows_per_block, cuda.gridDim.x):
            row0 = rb * rows_per_block + team * R
            for r in range(R):
                for t in range(NT):
                    acc[r, t] = float32(0.0)
            for c in range(nchunks):
                c0 = c * chunk
                cw = min(chunk, Kw - c0)
                if nchunks > 1 or it == 0:
                    cuda.syncthreads()
                    stage(x, xs, c0, cw, N, NT, EPW, lg, K)
                    cuda.syncthreads()
                for j0 in range(lane, cw, nl * U):
                    for u in range(U):  # issue every load of the step (words, scales) before using any
                        g = (c0 + j0 + u * nl) >> lgw
                        for r in range(R):
                            word = uint32(0)
                            s = float32(0.0)
                            z = float32(8.0 if BITS == 4 else 128.0)
                            if j0 + u * nl < cw and row0 + r < M:
                                word = words[row0 + r, c0 + j0 + u * nl]
                                s = scales[row0 + r, g]
                                if HAS_ZERO:
                                    z = float32(zeros[row0 + r, g])
                            wq[u, r] = word
                            ws[u, r] = s
                            wz[u, r] = float32(MAGIC) + z
                    for u in range(U):
                        j = j0 + u * nl
                        if j < cw:
                            for r in range(R):
                                word = wq[u, r]
                                zoff = wz[u, r]  # 2**23 + zero point: (bits | n) - zoff = n - zero, exactly
                                for t in range(NT):
                                    tmp[t] = float32(0.0)
                                for e in range(EPW):
                                    if BITS == 8:
                                        shift = 8 * e
                                    else:
                                        shift = 8 * (e & 3) + 4 * (e >> 2)
                                    q = _as_float((((word >> shift) & MASK) ^ FLIP) | 0x4B000000) - zoff
                                    for t in range(NT):
                                        tmp[t] += q * xs[(t * EPW + e) * cw + j]
                                for t in range(NT):
                                    acc[r, t] += ws[u, r] * tmp[t]
            reduce_rows(acc, red, y, team, lane, nl, row0, M, N)
            it += 1

    gemv_q.__name__ = f"gemv_int{BITS}{'z' if HAS_ZERO else ''}_nt{NT}_r{R}_u{U}"
    return cuda.jit(gemv_q)


_gemv_f32 = lru_cache(maxsize=None)(_make_gemv_f32)
_gemv_q = lru_cache(maxsize=None)(_make_gemv_q)


def _gemv_launch(M: int, R: int, teams: int | None = None):
    """(grid, (lanes, teams)): enough blocks to fill the GPU (fewer warps per block for small M), and at
    most 8 blocks per SM: the blocks then loop over row blocks and reuse their staged x."""
    if teams is None:
        teams = LAUNCH.gemv_teams
        target = 2 * _sm_count()
        while teams > 1 and _cdiv(M, teams * R) < target:
            teams //= 2
    nrb = _cdiv(M, teams * R)
    grid = max(1, min(nrb, 8 * _sm_count() if not SIMULATOR else LAUNCH.max_blocks))
    return grid, (LAUNCH.team, teams)


def _gemv(x, w, y, R=None, U=None, teams=None) -> bool:
    """y = x @ W.T with a GEMV kernel (N <= 4 tokens). False when it cannot (a group larger than the
    shared x buffer allows): the caller then uses the GEMM. R, U, teams override the defaults (tuning)."""
    N, K = x.shape
    M = int(w.shape[0])
    NT = _token_tile(N)
    R0, U0 = GEMV_SHAPE[NT]
    R, U = R or R0, U or U0
    grid, block = _gemv_launch(M, R, teams)
    if not isinstance(w, CudaQuantized):
        _gemv_f32(NT, R, U)[grid, block, _stream()](x, w, y, N, max(1, LAUNCH.gemv_smem // NT))
        return True
    G = w.group_size
    epw = 32 // w.bits  # values per word
    wpg = G // epw  # words per group
    chunk = (LAUNCH.gemv_smem // (NT * epw)) // wpg * wpg  # in words: whole groups that fit the x buffer
    if chunk == 0:
        return False
    zeros_arg = w.zeros if w.zeros is not None else _dummy(np.uint8)
    _gemv_q(w.bits, NT, R, w.zeros is not None, U)[grid, block, _stream()](
        x, w.words, w.scales, zeros_arg, y, N, K, G.bit_length() - 1, chunk)
    return True


def _gemv_chunks(x, w, y) -> bool:
    """y = x @ W.T for a few more tokens than one GEMV tile: the GEMV once per 4 rows of x (row views, no
    copies). Each pass reads the weights again, which for up to 16 tokens still beats the GEMM's tiles."""
    N = x.shape[0]
    for c in range(0, N, GEMV_MAX_TOKENS):
        if not _gemv(x[c:c + GEMV_MAX_TOKENS], w, y[c:c + GEMV_MAX_TOKENS]):
            return False  # (only the first can fail: smaller tiles fit the shared buffer if 4 rows do)
    return True


# ------------------------------------------------------------------------------------- linear: GEMM
# Prefill: N > 16 tokens. Now each weight is used N times, so the kernel must reuse what it
# loads: a block computes a TN x TM tile of y (tokens x output rows) and walks K in steps of TK, copying an
# x tile (TN x TK) and a W tile (TM x TK, dequantized on the way: exactly dequantize(W)'s float32 values)
# into shared memory; each thread then computes 4 x 4 outputs from registers (8 shared loads per 16 FMAs).
# Shared tiles are stored transposed ([k][n], [k][m]) and padded by one column so that neither the stores
# nor the loads of a warp hit the same memory bank twice.


def _make_gemm(BITS, HAS_ZERO):
    """The tiled GEMM; BITS 32 (float32 W), 8 or 4 (quantized W, dequantized while loading the tile)."""
    T, TK = LAUNCH.gemm_threads, LAUNCH.gemm_tk
    TN = TM = 4 * T
    PITCH = TN + 1  # padded row of the shared tiles

    if BITS == 32:

        @cuda.jit(device=True, inline=True)
        def wval(w, scales, zeros, m, k, lg):
            return w[m, k]

    elif BITS == 8:

        @cuda.jit(device=True, inline=True)
        def wval(w, scales, zeros, m, k, lg):
            word = w[m, k >> 2]
            b = ((word >> (8 * (k & 3))) & 0xFF) ^ 0x80
            q = _as_float(b | 0x4B000000) - float32(MAGIC + 128.0)
            return q * scales[m, k >> lg]

    else:

        @cuda.jit(device=True, inline=True)
        def wval(w, scales, zeros, m, k, lg):
            g = k >> lg
            r = k & ((1 << lg) - 1)
            half = r >> (lg - 1)
            b = r & ((1 << (lg - 1)) - 1)
            byte = (g << (lg - 1)) + b  # byte of the row
            word = w[m, byte >> 2]
            n = (word >> (8 * (byte & 3) + 4 * half)) & 0xF
            if HAS_ZERO:
                zoff = float32(MAGIC) + float32(zeros[m, g])
            else:
                zoff = float32(MAGIC + 8.0)
            q = _as_float(n | 0x4B000000) - zoff
            return q * scales[m, g]

    def gemm(x, w, scales, zeros, y, N, M, K, lg):
        As = cuda.shared.array((TK, PITCH), float32)  # x tile, transposed: As[k, n]
        Bs = cuda.shared.array((TK, PITCH), float32)  # W tile, transposed: Bs[k, m]
        acc = cuda.local.array((4, 4), float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * T + tx
        n0 = cuda.blockIdx.y * TN
        m0 = cuda.blockIdx.x * TM
        for i in range(4):
            for j in range(4):
                acc[i, j] = float32(0.0)
        for k0 in range(0, K, TK):
            for e in range(tid, TN * TK, T * T):  # x tile: consecutive threads, consecutive k
                n = e // TK
                kk = e - n * TK
                v = float32(0.0)
                if n0 + n < N and k0 + kk < K:
                    v = x[n0 + n, k0 + kk]
                As[kk, n] = v
            for e in range(tid, TM * TK, T * T):  # W tile, dequantized
                m = e // TK
                kk = e - m * TK
                v = float32(0.0)
                if m0 + m < M and k0 + kk < K:
                    v = wval(w, scales, zeros, m0 + m, k0 + kk, lg)
                Bs[kk, m] = v
            cuda.syncthreads()
            for kk in range(TK):
                a0 = As[kk, ty]
                a1 = As[kk, ty + T]
                a2 = As[kk, ty + 2 * T]
                a3 = As[kk, ty + 3 * T]
                for j in range(4):
                    b = Bs[kk, tx + j * T]
                    acc[0, j] += a0 * b
                    acc[1, j] += a1 * b
                    acc[2, j] += a2 * b
                    acc[3, j] += a3 * b
            cuda.syncthreads()
        for i in range(4):
            n = n0 + ty + i * T
            if n < N:
                for j in range(4):
                    m = m0 + tx + j * T
                    if m < M:
                        y[n, m] = acc[i, j]

    gemm.__name__ = f"gemm_{'f32' if BITS == 32 else f'int{BITS}'}{'z' if HAS_ZERO else ''}"
    return cuda.jit(gemm)


_gemm = lru_cache(maxsize=None)(_make_gemm)

_dummy_cache = {}


def _dummy(dtype):
    """A 1x1 device array standing in for an argument a kernel variant never reads."""
    d = _dummy_cache.get(np.dtype(dtype))
    if d is None:
        d = _dummy_cache[np.dtype(dtype)] = cuda.to_device(np.zeros((1, 1), dtype))
    return d


def _token_tile(N: int) -> int:
    return 1 if N <= 1 else 2 if N <= 2 else 4


@cuda.jit
def _columns_kernel(y, start, out):
    """out[n, j] = y[n, start + j]: one part of a stacked product, into its own contiguous array."""
    N, M = out.shape
    for i in range(cuda.grid(1), N * M, cuda.gridsize(1)):
        out[i // M, i % M] = y[i // M, start + i % M]


def _split_columns(y, parts) -> tuple:
    """(N, sum(parts)) device array -> one C-contiguous (N, p) device array per part (a view when N == 1)."""
    out, at = [], 0
    for p in parts:
        if y.shape[0] == 1:
            part = y[:, at:at + p]  # one row: its columns are contiguous already
        else:
            part = _alloc((y.shape[0], p), np.float32)
            if y.shape[0] * p:
                _columns_kernel[_grid(y.shape[0] * p, LAUNCH.threads), LAUNCH.threads, _stream()](y, at, part)
        out.append(part)
        at += p
    return tuple(out)


def linear(x, w, bias=None):
    """y = x @ W.T + bias: (N, in), W (out, in) float32 or quantized -> (N, out).

    N <= 4 runs the GEMV kernels (decode), up to 16 the GEMV once per 4 tokens (batched decode), larger N
    the tiled GEMM (prefill). A QuantizedTensor that was not uploaded is uploaded here (once per call: upload
    weights beforehand). W stacked (ops.Stacked): one product over the stacked matrix, its columns split into
    one output per part.
    """
    if isinstance(w, Stacked):
        return _split_columns(linear(x, w.weight, bias), w.parts)
    x = _dev(x, "linear x", np.float32, 2)
    if not isinstance(w, CudaQuantized) and hasattr(w, "bits"):
        w = upload(w)
    N, K = x.shape
    quant = isinstance(w, CudaQuantized)
    if not quant:
        w = _dev(w, "linear weight", np.float32, 2)
    M, Kw = (int(s) for s in w.shape)
    if Kw != K:
        raise TinyserveError(f"cuda ops: linear x has {K} columns, the weight {tuple(w.shape)} wants {Kw}")
    y = _alloc((N, M), np.float32)
    if N == 0 or M == 0:
        return y
    if K == 0:
        _fill_kernel[_grid(N * M, LAUNCH.threads), LAUNCH.threads, _stream()](_flat(y), np.float32(0))
    elif N <= GEMV_MAX_TOKENS:
        if not _gemv(x, w, y):
            _gemm_launch(x, w, y)
    elif not (N <= GEMV_CHUNK_MAX_TOKENS and _gemv_chunks(x, w, y)):
        _gemm_launch(x, w, y)
    if bias is not None:
        bias = _dev(bias, "linear bias", np.float32, 1)
        if bias.shape[0] != M:
            raise TinyserveError(f"cuda ops: linear bias has {bias.shape[0]} values for {M} outputs")
        _add_bias_kernel[_grid(N * M, LAUNCH.threads), LAUNCH.threads, _stream()](y, bias)
    return y


def _gemm_launch(x, w, y) -> None:
    """y = x @ W.T with the tiled GEMM: one block per 64 x 64 tile of y (tokens x rows)."""
    N, K = x.shape
    M = int(w.shape[0])
    T = LAUNCH.gemm_threads
    grid = (_cdiv(M, 4 * T), _cdiv(N, 4 * T))
    if isinstance(w, CudaQuantized):
        zeros_arg = w.zeros if w.zeros is not None else _dummy(np.uint8)
        lg = w.group_size.bit_length() - 1  # G is a power of two (32..256)
        _gemm(w.bits, w.zeros is not None)[grid, (T, T), _stream()](x, w.words, w.scales, zeros_arg, y, N, M, K, lg)
    else:
        _gemm(32, False)[grid, (T, T), _stream()](x, w, _dummy(np.float32), _dummy(np.uint8), y, N, M, K, 0)


# ------------------------------------------------------------------------------------------- warm-up
def warmup(weights=None) -> float:
    """Compile the kernels a forward pass uses (float32 paths; the quantized formats found in `weights`,
    if given) by running each once on tiny arrays. Returns the seconds it took. Free on the simulator."""
    import time

    t0 = time.perf_counter()
    if not SIMULATOR:  # (the simulator compiles nothing; tests call _warm directly)
        _warm(weights)
    return time.perf_counter() - t0


def _warm(weights=None) -> None:
    from ..quant import quantize

    idx = cuda.to_device(np.zeros(2, np.int64))
    x = zeros((2, 64))
    take_rows(x, idx)
    add(x, x)
    swiglu(x, x)
    rmsnorm(x, zeros(64), 1e-5)
    add_rmsnorm(x, x, zeros(64), 1e-5)
    q = zeros((2, 2, 32))
    rope(q, idx, zeros(16))
    cache = zeros((1, 1, 4, 32))
    kv = zeros((2, 1, 32))
    kv_write(cache, cache, kv, kv, idx, idx)
    attention(q, cache, cache, idx, idx, 0)
    formats = set()
    if weights is not None:
        mats = [v for layer in getattr(weights, "layers", []) for v in vars(layer).values()]
        for v in mats + [getattr(weights, "lm_head", None)]:
            if isinstance(v, CudaQuantized):
                formats.add((v.bits, v.group_size, v.zeros is not None))
    for n in (1, 2, 3, 6, 17):  # token tiles 1, 2, 4 of the GEMV, GEMV passes over 4 + 2 rows, the GEMM
        linear(zeros((n, 64)), zeros((8, 64)), zeros(8))
        for bits, g, z in sorted(formats):
            linear(zeros((n, g)), upload(quantize(np.ones((8, g), np.float32), bits, g, z)))
    cuda.synchronize()


# ------------------------------------------------------------------------------------ read bandwidth
@cuda.jit
def _read_kernel(a, out):
    """out[i] = the sum of thread i's grid-stride share of a: every element read once (4 loads in flight
    per thread), and a result the compiler cannot drop."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    n = a.shape[0]
    s = float32(0)
    j = i
    while j + 3 * step < n:
        s += a[j] + a[j + step] + a[j + 2 * step] + a[j + 3 * step]
        j += 4 * step
    while j < n:
        s += a[j]
        j += step
    if i < out.shape[0]:
        out[i] = s


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The GPU's read bandwidth in bytes/s: the fastest of `repeats` passes of a kernel that reads a buffer
    of `nbytes` (far larger than the L2 cache) once, timed with CUDA events. `tinyserve bench --backend cuda`
    divides the weight bytes of a step by it (the CPU backends use the machine's RAM bandwidth)."""
    import time

    if SIMULATOR:  # the simulator runs threads as Python: a token buffer, timed on the host
        nbytes = min(nbytes, 4096)
    a = zeros((max(1, nbytes // 4),))
    threads = LAUNCH.threads
    grid = max(1, min(8 * _sm_count(), LAUNCH.max_blocks))
    out = _alloc((grid * threads,))
    read = _read_kernel[grid, threads, _stream()]
    read(a, out)  # compiles; the buffer was just written: now it is "cold"
    cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        if SIMULATOR:
            t = time.perf_counter()
            read(a, out)
            best = min(best, time.perf_counter() - t)
            continue
        start, end = cuda.event(), cuda.event()
        start.record()
        read(a, out)
        end.record()
        end.synchronize()
        best = min(best, cuda.event_elapsed_time(start, end) / 1000.0)
    return a.shape[0] * 4 / best


# ------------------------------------------------------------------------------------- CUDA graphs
# A decode step is ~13 op calls per layer, each a Python wrapper plus a numba launch (~100-180 us of host time
# each, measured on an H200: docs/cuda.md), so without more a step of a 1B model costs ~35 ms of Python
# while its kernels need well under a millisecond. A CUDA graph records the step's launches once and replays
# them with one call. What a replay needs: the same shapes (so a graph per number of tokens), the same
# arrays (the step's inputs are copied into buffers the graph reads; every array allocated while recording
# is kept with the graph; the KV cache is the same object), and nothing that changes per step outside
# device memory (positions and slots are read by the kernels from device arrays, so they may change).

GRAPHS = os.environ.get("TINYSERVE_CUDA_GRAPHS", "1") != "0"  # TINYSERVE_CUDA_GRAPHS=0: launch op by op


class _RecordedStep:
    """One decode step of N tokens: input buffers, the recorded graph, its output array."""

    def __init__(self, host_inputs, step):
        global _recording, _recorded_arrays
        self.inputs = [cuda.to_device(np.ascontiguousarray(a)) for a in host_inputs]
        self.step, self.graph, self.out, self.arrays = step, None, None, []
        if SIMULATOR:  # no graphs in the simulator: replay() runs the step on the same buffers
            return
        from cuda.core import Device

        dev = Device()
        dev.set_current()
        builder = dev.create_graph_builder()
        cuda.synchronize()
        with cuda.defer_cleanup():  # no frees while recording
            builder.begin_building("relaxed")
            _recording, _recorded_arrays = builder, self.arrays
            try:
                self.out = step(*self.inputs)
            finally:
                _recording, _recorded_arrays = None, None
                builder.end_building()
            self.graph = builder.complete()

    def replay(self, host_inputs) -> np.ndarray:
        for buf, a in zip(self.inputs, host_inputs):
            buf.copy_to_device(np.ascontiguousarray(a))
        if self.graph is None:
            return download(self.step(*self.inputs))
        stream = _stream()  # the default stream, where the inputs were just copied
        self.graph.launch(stream)
        stream.sync()
        return self.out.copy_to_host()


class StepGraphs:
    """Decode steps replayed as CUDA graphs, one per number of tokens, for one KV cache.

    run(host_inputs, step): step(*device_inputs) -> device output is the forward pass. The first step of a
    size runs plainly (it compiles the kernels it needs), the second records the graph and replays it, every
    later one only replays. If recording fails, graphs are switched off for the process (one line on
    stderr) and steps run plainly.
    """

    def __init__(self):
        self.steps: dict = {}
        self.seen: set = set()

    def run(self, host_inputs, step) -> np.ndarray:
        global GRAPHS
        n = len(host_inputs[0])
        rec = self.steps.get(n)
        if rec is None and GRAPHS and n in self.seen:
            try:
                rec = self.steps[n] = _RecordedStep(host_inputs, step)
            except Exception as e:  # noqa: BLE001  (a driver or numba-cuda without what this needs)
                GRAPHS = False
                import sys

                print(f"note: CUDA graphs are off ({type(e).__name__}: {e}); steps launch op by op",
                      file=sys.stderr)
        if rec is not None:
            return rec.replay(host_inputs)
        self.seen.add(n)
        return download(step(*(upload(np.ascontiguousarray(a)) for a in host_inputs)))
