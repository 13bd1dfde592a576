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

import json
import os
import struct
from pathlib import Path

import numpy as np

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
                header = json.loads(f.read(n).decode("utf-8"))
        except OSError as e:
            raise TinyserveError(f"cannot read {self.path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TinyserveError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise TinyserveError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise TinyserveError(f"{self.path}: corrupt entry for tensor {name}") from None
            if dtype not in _DTYPES:
                raise TinyserveError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise TinyserveError(
                    f"{self.path}: tensor {name} lies outside the file or does not match its shape "
                    "(truncated or corrupt file?)"
                )
            self.entries[name] = (dtype, tuple(shape), begin)
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
        count = int(np.prod(shape, dtype=np.int64))
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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise TinyserveError(f"{index}: corrupt shard index (expected a 'weight_map' object)") from None
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

    def get(self, name, shape=None) -> np.ndarray:
        if name not in self.location:
            raise TinyserveError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        a = self.location[name].get(name)
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise TinyserveError(
                f"{self.dir}: tensor {name} has shape {tuple(a.shape)}, the config says {tuple(shape)}"
            )
        return a

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
