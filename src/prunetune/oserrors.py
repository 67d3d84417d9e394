"""What the operating system said, in one line with the fix: the one translation of file-system and memory
failures (a full disk, a symlink loop, a read-only or forbidden place, an allocation that cannot succeed) into
`UserError`s, and the path checks that find such causes before any work.

Writers (`rundir.staged_output`, checkpoints, the run records) translate what they catch with `user_error`,
naming what they were writing and what state the output is in; the CLI translates whatever reaches it the same
way, so no cause named here ever ends in a traceback. Libraries wrap OS errors in their own types
(safetensors' `SafetensorError: ... (os error 28)`, torch's `PytorchStreamWriter` "unexpected pos"), so the
errno is also recovered from their text, and a torch writer failure is told apart by the free space left."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from prunetune.errors import UserError

# errno -> (what happened, the fix). `{path}` is the path the failure was about (or the output's).
CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space on that disk or choose a path on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or choose a path on another disk"),
    errno.EFBIG: ("file too large for this file system", "choose a path on another file system"),
    errno.ELOOP: ("a symbolic link loop (a link that points back to itself)",
                  "remove or fix the link, or choose another path"),
    errno.EACCES: ("permission denied", "fix the permissions (chmod) or choose a path you can use"),
    errno.EPERM: ("operation not permitted", "fix the permissions (chmod/chattr) or choose a path you can use"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose a directory path"),
    errno.EISDIR: ("a directory where a file is expected", "give a file path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
    errno.ENFILE: ("too many open files on this system", "close other programs and run again"),
    errno.EIO: ("input/output error (the disk or network file system failed)", "check the disk and run again"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EXDEV: ("a rename across file systems", "keep the output on one file system"),
    errno.ENOMEM: ("out of memory", "free memory or use smaller sizes"),
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
_TEXT_ERRNO = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
               "Too many levels of symbolic links": errno.ELOOP, "Symlink loop from": errno.ELOOP,
               "File name too long": errno.ENAMETOOLONG}
# What torch's zip writer says when a write fails: it carries no errno, so the free space decides.
_TORCH_WRITER = ("PytorchStreamWriter", "inline_container", "unexpected pos", "file write failed", "iostream error")
_ALLOC = ("can't allocate memory", "not enough memory", "out of memory", "DefaultCPUAllocator", "CUDA out of memory",
          "std::bad_alloc", "Cannot allocate memory")
LOW_SPACE = 1 << 20
"""Free bytes below which a failed write is taken to be a full disk."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def free_bytes(path: str | Path | None) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing parent), None when unknown."""
    if path is None:
        return None
    anchor = Path(path)
    while not anchor.exists() and anchor.parent != anchor:
        anchor = anchor.parent
    try:
        return shutil.disk_usage(anchor).free
    except OSError:
        return None


def error_number(err: BaseException, where: str | Path | None = None) -> int | None:
    """The errno behind `err` (an OSError anywhere in its chain, a library's wrapped `os error N`, a message
    naming the cause), or ENOSPC/EIO for a torch writer failure by the free space at `where`; None if not an
    OS failure."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in CAUSES:
            return e.errno
    for e in _chain(err):
        text = str(e)
        match = _OS_ERROR_TEXT.search(text)
        if match and int(match.group(1) or match.group(2)) in CAUSES:
            return int(match.group(1) or match.group(2))
        for phrase, number in _TEXT_ERRNO.items():
            if phrase in text:
                return number
    if any(marker in str(e) for e in _chain(err) for marker in _TORCH_WRITER):
        free = free_bytes(where)
        return errno.ENOSPC if free is not None and free < LOW_SPACE else errno.EIO
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed (MemoryError, torch's OutOfMemoryError, an allocator's RuntimeError)."""
    import torch

    for e in _chain(err):
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(e, RuntimeError) and any(marker in str(e) for marker in _ALLOC):
            return True
    return False


_QUOTED_PATH = re.compile(r"(?:from|at|file) '(/[^']+)'")


def _filename(err: BaseException) -> str | None:
    """The path the failure was about: an OSError's `filename`, else one a library quoted in its message."""
    for e in _chain(err):
        name = getattr(e, "filename", None)
        if name:
            return str(name)
    for e in _chain(err):
        match = _QUOTED_PATH.search(str(e))
        if match:
            return match.group(1)
    return None


def describe(number: int, path: str | Path | None = None) -> str:
    """`cause at PATH (free space); fix` for an errno prunetune names."""
    cause, fix = CAUSES[number]
    where = f" at {path}" if path else ""
    if number in DISK_FULL:
        free = free_bytes(path)
        if free is not None:
            where += f" ({free / 2**20:,.1f} MiB free)"
    return f"{cause}{where}; {fix}"


def user_error(err: BaseException, doing: str = "", where: str | Path | None = None,
               after: str = "") -> UserError | None:
    """A one-line UserError for an OS failure prunetune can name (None for anything else, which stays a bug):
    `doing` (e.g. "writing the pruned model to OUT"), the cause with its path and fix, then `after` (what state
    the output was left in, what recovers it)."""
    if isinstance(err, UserError):
        return err
    if is_out_of_memory(err) and not isinstance(err, OSError):
        return UserError(f"{doing + ': ' if doing else ''}out of memory ({_first_line(err)[:120]}); free memory or "
                         f"use smaller sizes{'; ' + after if after else ''}")
    number = error_number(err, where)
    if number is None:
        return None
    path = _filename(err) or where
    text = describe(number, path)
    return UserError(f"{doing + ': ' if doing else ''}{text}{'; ' + after if after else ''}")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ---- path checks before any work ------------------------------------------------------------------------


def link_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used because of symbolic links (a loop, or a link to nothing), else None."""
    path = Path(path).expanduser()
    try:
        os.stat(path)
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{str(path)!r} is a symbolic link loop ({_link_chain(path)})"
        if err.errno == errno.ENOENT and os.path.islink(path):
            return f"{str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist"
        if err.errno == errno.ENOENT:
            # A parent may be a dangling link or a loop: find the first component that is.
            for parent in reversed(path.parents):
                if os.path.islink(parent):
                    problem = link_problem(parent)
                    if problem:
                        return problem
        return None


def _link_chain(path: Path, limit: int = 6) -> str:
    steps, current = [str(path)], path
    for _ in range(limit):
        if not os.path.islink(current):
            break
        target = Path(os.readlink(current))
        current = target if target.is_absolute() else current.parent / target
        steps.append(str(target))
        if str(target) in steps[:-1] or str(current) == str(path):
            break
    return " -> ".join(steps)


def check_links(path: str | Path, what: str) -> Path:
    """`path`, or a UserError when it is (or lies under) a symbolic link loop or a link to nothing."""
    problem = link_problem(path)
    if problem:
        raise UserError(f"{what} {problem}; remove or fix the link, or choose another path")
    return Path(path).expanduser()
