"""Reading files of a run directory: one place that turns OS errors and damaged files into one-line user
errors that say which problem it is (missing, a directory, permission denied, truncated)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prunetune.errors import UserError
from prunetune.oserrors import CAUSES, describe, link_problem


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Within the block, a failure to open `path` is a UserError that says which: missing, a directory, or
    permission denied (never "may be corrupt" for a file that could not even be opened)."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {str(path)!r} is a directory, expected a file") from None
    except PermissionError:
        raise UserError(f"{what} {str(path)!r}: permission denied; make it readable (chmod) or copy it") from None
    except OSError as err:
        if err.errno not in CAUSES:
            raise
        problem = link_problem(path)
        cause = problem or describe(err.errno, path)
        raise UserError(f"{what} {str(path)!r} cannot be read: {cause}") from None


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of `path`, or a UserError that says which of missing / a directory / permission denied."""
    with reading(path, what):
        return Path(path).read_bytes()


def read_json(path: str | Path, what: str = "file", fix: str = "") -> Any:
    """Parsed JSON of `path`; a UserError naming the file, the problem and `fix` otherwise."""
    raw = read_bytes(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({err}){'; ' + fix if fix else ''}") from None


def check_readable_dir(path: str | Path, what: str = "directory") -> Path:
    """`path` as a readable directory, or a UserError (missing, a file, permission denied)."""
    path = Path(path).expanduser()
    problem = link_problem(path)
    if problem:
        raise UserError(f"{what} {problem}; remove or fix the link")
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist; check the path")
    if not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file, expected a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r}: permission denied; make it readable (chmod) or copy it")
    return path


def check_readable_files(directory: str | Path, what: str = "model") -> None:
    """Every file of a model directory (and of prunetune's sub-directory in it) opens and reads, and every
    `.safetensors` file is whole; else a UserError naming the file and the real cause (permission denied, a
    symbolic link loop or a link to nothing, a directory, truncated), before a loader reports something else."""
    directory = Path(directory)
    entries = sorted(directory.iterdir())
    entries += sorted(p for sub in entries if sub.is_dir() and not sub.is_symlink() for p in sub.iterdir())
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            continue
        problem = link_problem(path)
        if problem:
            raise UserError(f"{what} file {problem}; remove or fix the link")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as err:
            cause = describe(err.errno, path) if err.errno in CAUSES else (err.strerror or str(err))
            raise UserError(f"{what} file {str(path)!r} cannot be read: {cause}") from None
        if path.suffix == ".safetensors":
            check_safetensors(path, f"{what} weights file")


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Refuse a truncated or garbled safetensors file before a loader crashes on it (header + data length)."""
    path = Path(path)
    try:
        with reading(path, what), path.open("rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes but the file has {size} bytes")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {str(path)!r} is truncated or corrupt ({err}); write it again") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(
            f"{what} {str(path)!r} is truncated ({size} bytes, {8 + header_len + end} expected); write it again"
        )
