"""Safetensors files read and written one tensor at a time, at the offsets of their headers: what lets `prune`
hold one decoder layer of a model instead of all of it.

Reading copies each tensor's bytes into a fresh buffer (`readinto` at its offset), never through a memory map:
the pages of a mapped file count in the process's resident memory for as long as the map lives. Writing lays a
file out before any tensor exists: the header safetensors itself writes for those names, dtypes and shapes
(tensors sorted by dtype, then name; offsets in that order; the JSON padded with spaces to 8 bytes), so each
tensor can be written at its offset whenever it is ready, in any order, and the finished file is byte for byte
what `safetensors.torch.save_file` writes for the same tensors (tests/test_shards.py compares them).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# safetensors orders a file's tensors by dtype, largest first in this order (its Dtype enum, descending), then by
# name; measured on safetensors 0.8 (tests/test_shards.py keeps it honest).
_DTYPE_RANK = {code: rank for rank, code in enumerate(
    ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8",
     "BOOL"])}
_MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, dtype and shape (the bytes come later)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Located:
    """Where one tensor of a safetensors file lies: the file, its dtype and shape, its absolute byte range."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, Located], dict[str, str]]:
    """(tensor name -> Located, the `__metadata__` strings) of a safetensors file. ValueError for a file that is
    not one, or whose tensors lie beyond its end (truncated); OSError as raised by the file system."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: header of {length} bytes in a file of {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    found: dict[str, Located] = {}
    for name, info in header.items():
        try:
            dtype = CODE_DTYPES[info["dtype"]]
            start, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has an unreadable or unsupported entry {info!r}") from None
        if not 0 <= start <= end or base + end > size:
            raise ValueError(f"{path}: tensor {name!r} lies at bytes {start}-{end}, beyond the file's {size} bytes "
                             "(truncated)")
        if TensorSpec(name, dtype, shape).nbytes != end - start:
            raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes for shape {list(shape)}")
        found[name] = Located(path, dtype, shape, base + start, base + end)
    return found, metadata


class ShardReader:
    """The tensors of a set of safetensors files (a model's shards), each read on demand by name."""

    def __init__(self, files: Iterable[str | Path]) -> None:
        self.where: dict[str, Located] = {}
        for file in files:
            located, _ = read_header(file)
            for name, loc in located.items():
                if name in self.where:
                    raise ValueError(f"tensor {name!r} is in both {self.where[name].path} and {loc.path}")
                self.where[name] = loc

    def names(self) -> set[str]:
        return set(self.where)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` in a buffer of its own (CPU), cast to `dtype` when given (what `from_pretrained` does
        to a checkpoint in another precision)."""
        loc = self.where[name]
        size = loc.end - loc.start
        if size == 0:
            tensor = torch.empty(loc.shape, dtype=loc.dtype)
        else:
            buffer = bytearray(size)
            view = memoryview(buffer)
            with loc.path.open("rb", buffering=0) as f:
                f.seek(loc.start)
                done = 0
                while done < size:  # readinto may return less than asked for
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError(f"{loc.path}: ends inside tensor {name!r} (truncated)")
                    done += got
            tensor = torch.frombuffer(buffer, dtype=torch.uint8).view(loc.dtype).reshape(loc.shape)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)


def layout(specs: Iterable[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The bytes before the data (8-byte length + JSON header) of a safetensors file holding `specs`, and each
    tensor's absolute (start, end) byte range in it: exactly safetensors' own layout."""
    ordered = sorted(specs, key=lambda s: (_DTYPE_RANK[DTYPE_CODES[s.dtype]], s.name.encode()))
    entries: list[str] = []
    if metadata:
        if len(metadata) > 1:  # safetensors writes a metadata map in hash order: no fixed layout to match
            raise ValueError("a layout is fixed for at most one metadata entry")
        entries.append(f'"__metadata__":{_json(metadata)}')
    ranges: dict[str, tuple[int, int]] = {}
    offset = 0
    for spec in ordered:
        if spec.name in ranges:
            raise ValueError(f"tensor {spec.name!r} is laid out twice")
        ranges[spec.name] = (offset, offset + spec.nbytes)
        entries.append(f"{_json(spec.name)}:" + _json({"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                                       "data_offsets": [offset, offset + spec.nbytes]}))
        offset += spec.nbytes
    header = ("{" + ",".join(entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    base = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, {n: (base + a, base + b) for n, (a, b) in ranges.items()}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ShardWriter:
    """Safetensors files laid out up front and filled tensor by tensor: `write` each tensor once, in any order,
    then `close`, which fails if one was never written (the file would hold zeros there)."""

    def __init__(self, directory: str | Path, files: dict[str, list[TensorSpec]],
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self._specs: dict[str, TensorSpec] = {}
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, start, end)
        self._fds: list[int] = []
        self.written: set[str] = set()
        for filename, specs in files.items():
            prefix, ranges = layout(specs, metadata)
            fd = os.open(self.directory / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, prefix, 0)
            os.ftruncate(fd, max((end for _, end in ranges.values()), default=len(prefix)))
            for spec in specs:
                self._specs[spec.name] = spec
                self._where[spec.name] = (fd, *ranges[spec.name])

    def names(self) -> set[str]:
        return set(self._specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (dtype and shape as laid out) at its place; each name exactly once."""
        spec = self._specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not laid out in {self.directory}")
        if name in self.written:
            raise RuntimeError(f"tensor {name!r} was written twice")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, laid out as "
                             f"{spec.dtype} {spec.shape}")
        fd, start, end = self._where[name]
        if end > start:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(fd, memoryview(data), start)
        self.written.add(name)

    def copy(self, name: str, reader: ShardReader, chunk: int = 16 * 2**20) -> None:
        """Write tensor `name` straight from `reader`'s file (same dtype and shape), `chunk` bytes at a time, so
        a large tensor (an embedding) is never held whole."""
        spec, loc = self._specs.get(name), reader.where[name]
        if spec is None or (loc.dtype, loc.shape) != (spec.dtype, spec.shape):
            raise ValueError(f"tensor {name!r} cannot be copied as stored into its layout")
        if name in self.written:
            raise RuntimeError(f"tensor {name!r} was written twice")
        fd, start, _ = self._where[name]
        with loc.path.open("rb", buffering=0) as f:
            f.seek(loc.start)
            for done in range(0, loc.end - loc.start, chunk):
                data = f.read(min(chunk, loc.end - loc.start - done))
                if not data:
                    raise ValueError(f"{loc.path}: ends inside tensor {name!r} (truncated)")
                _pwrite_all(fd, data, start + done)
        self.written.add(name)

    def missing(self) -> list[str]:
        return sorted(set(self._specs) - self.written)

    def close(self) -> None:
        """Close the files; RuntimeError if a laid-out tensor was never written."""
        self.abort()
        if missing := self.missing():
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[:3]} (a bug in prunetune)")


    def abort(self) -> None:
        """Close the files whatever was written (a failed run: its staging directory is deleted anyway)."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
