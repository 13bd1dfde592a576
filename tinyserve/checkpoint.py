"""Find and read a checkpoint's tensors.

A Hugging Face checkpoint is one `model.safetensors` or several shards listed in
`model.safetensors.index.json`. A safetensors file is simple enough to read by hand, which is what this
module does (the `safetensors` package cannot give bfloat16 to NumPy):

    8 bytes      little-endian u64 N, the length of the header
    N bytes      JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
                        "__metadata__": {...}}
    the rest     the tensors' bytes; offsets are relative to the end of the header

The file is memory-mapped, so float32 tensors cost no copy and no memory until they are touched; float16 and
bfloat16 tensors are widened to float32 when they are read. Every way a file can be broken (short, bad
header, offsets outside the data, a shape that does not match its bytes) is a TinyserveError naming the
file. Nothing here ever unpickles anything: `.bin` / `.pt` checkpoints are refused.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from .config import is_int, parse_json, read_json
from .errors import TinyserveError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by shifting into the high half
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # get() reads these as float32


def _is_str_dict(d) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d.items())


def _entry(path, name, e, data_len: int) -> tuple:
    """(dtype, shape, begin) of a header entry, checked: dtype a known name, shape a list of ints >= 0,
    data_offsets [begin, end] within the data and exactly the shape's bytes (sizes in Python ints, so a huge
    shape cannot wrap around). Anything else is a TinyserveError naming the file and the tensor."""
    bad = f"{path}: tensor {name}"
    if not isinstance(e, dict):
        raise TinyserveError(f"{path}: corrupt entry for tensor {name} (expected an object)")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise TinyserveError(f"{bad} has unsupported dtype {dtype!r}")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if (not isinstance(shape, list) or len(shape) > 64 or not all(is_int(s) and s >= 0 for s in shape)
            or math.prod(s or 1 for s in shape) * itemsize >= 2**63):  # NumPy's limits, even for an empty tensor
        raise TinyserveError(f"{bad}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise TinyserveError(f"{bad}: data_offsets must be two integers [begin, end], got {offsets!r}")
    begin, end = offsets
    if not (0 <= begin <= end <= data_len) or end - begin != math.prod(shape) * itemsize:
        raise TinyserveError(f"{bad} lies outside the file or does not match its shape (truncated or corrupt file?)")
    return dtype, tuple(shape), begin


class SafetensorsFile:
    """One memory-mapped safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise TinyserveError(f"{self.path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise TinyserveError(f"{self.path}: corrupt safetensors header (length {n}, file size {size})")
                raw = f.read(n)
        except OSError as e:
            raise TinyserveError(f"cannot read {self.path}: {e.strerror}") from None
        header = parse_json(raw, f"{self.path}: corrupt safetensors header (not JSON)")
        if not isinstance(header, dict):
            raise TinyserveError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        if not _is_str_dict(self.metadata):
            raise TinyserveError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {name: _entry(self.path, name, e, data_len) for name, e in header.items()}
        self._mmap = None

    def names(self):
        return list(self.entries)

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def get_raw(self, name) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16), memory-mapped, read-only."""
        dtype, shape, begin = self.entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = math.prod(shape)
        start = self.data_start + begin
        a = np.frombuffer(self._mmap, dtype=_DTYPES[dtype], count=count, offset=start)
        return a.reshape(shape)

    def release(self) -> None:
        """Forget the file's mapping (the next read maps it again); it is unmapped once no array read from it
        is left, so weights still used in place keep it."""
        self._mmap = None

    def get(self, name) -> np.ndarray:
        """The tensor; floating point tensors come back as float32."""
        dtype = self.entries[name][0]
        a = self.get_raw(name)
        if dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("F16", "F64"):
            return a.astype(np.float32)
        return a


class Checkpoint:
    """All tensors of a model directory, whichever shard they live in."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            d = read_json(index, "corrupt shard index")
            weight_map = d.get("weight_map") if isinstance(d, dict) else None
            if not _is_str_dict(weight_map):
                raise TinyserveError(f"{index}: corrupt shard index (expected a 'weight_map' object of tensor "
                                     "name -> file name)")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.dir / f).is_file():
                    raise TinyserveError(f"{index}: lists shard {f}, which is missing")
        elif single.is_file():
            files = ["model.safetensors"]
        else:
            others = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if others:
                files = others
            elif any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")) or any(self.dir.glob("*.pth")):
                raise TinyserveError(
                    f"{self.dir}: only pickle checkpoints (.bin/.pt) found; tinyserve reads safetensors only "
                    "(pickle can run code when loaded)"
                )
            else:
                raise TinyserveError(f"no *.safetensors weights in {self.dir}")
        self.files = [SafetensorsFile(self.dir / f) for f in files]
        self.location = {}
        for sf in self.files:
            for name in sf.names():
                self.location[name] = sf
        self.metadata = {}
        for sf in self.files:
            self.metadata.update(sf.metadata)

    def __contains__(self, name) -> bool:
        return name in self.location

    def release(self) -> None:
        """Forget every file's mapping (SafetensorsFile.release): after a backend copied the weights, the
        files' pages are no longer part of the process."""
        for sf in self.files:
            sf.release()

    def names(self):
        return list(self.location)

    def shape(self, name) -> tuple:
        return self.location[name].shape(name)

    def get(self, name, shape=None, dtypes=None) -> np.ndarray:
        """The tensor (SafetensorsFile.get), checked against the shape the config gives and, with dtypes, the
        stored types allowed (e.g. FLOAT_DTYPES for weights: an integer tensor there is a corrupt file)."""
        if name not in self.location:
            raise TinyserveError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        dtype = self.location[name].entries[name][0]
        if dtypes is not None and dtype not in dtypes:
            expected = ", ".join(dtypes[:-1]) + " or " + dtypes[-1] if len(dtypes) > 1 else dtypes[0]
            raise TinyserveError(f"{self.dir}: tensor {name} is stored as {dtype}; expected {expected}")
        a = self.location[name].get(name)
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise TinyserveError(
                f"{self.dir}: tensor {name} has shape {tuple(a.shape)}, the config says {tuple(shape)}"
            )
        return a

    def get_float(self, name, shape=None) -> np.ndarray:
        """A weight, norm or bias: a float tensor, read as float32."""
        return self.get(name, shape, FLOAT_DTYPES)

    def get_raw(self, name) -> np.ndarray:
        if name not in self.location:
            raise TinyserveError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return self.location[name].get_raw(name)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Write NumPy arrays as a safetensors file (the safetensors package does the writing)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    give_default_mode(path)  # safetensors creates the file private (0600)


def give_default_mode(path, directory: bool = False) -> None:
    """The permissions a plain open() or mkdir() would have given (0666 / 0777 less the umask), for files and
    folders that mkstemp / mkdtemp / safetensors create private (0600 / 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
