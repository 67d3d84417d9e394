"""The staged-output guard every writing command uses: nothing half-written, nothing of the user's lost.

A result is written into a staging directory and published whole by renames (`publish_dir`). A directory
prunetune wrote holds `.prunetune-files.json` (the marker): the list of the files prunetune wrote there. That
list is the whole of ownership: a non-empty directory without it is the user's and is refused, whatever its
files are called, and `--overwrite` replaces only the files it lists. While a result is being swapped into a
directory that already holds one, the marker lists the old and the new files and says `installing`, so a
process killed half-way leaves a directory that says it is incomplete (`incomplete`), never one that looks
whole; the final marker is prepared in the staging directory first and renamed into place (a rename needs no
space on a full disk).

Before any work, `check_output` / `check_writable` refuse a path that cannot be written: a symbolic link loop
or a link to nothing, a path under a file, a read-only or forbidden place (by creating a probe file), a disk
without the space the result needs (`check_space`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prunetune import phases
from prunetune.errors import UserError
from prunetune.oserrors import CAUSES, check_links, describe, free_bytes, user_error
from prunetune.rundir.lock import pid_alive
from prunetune.rundir.names import LOCK_FILE, MARKER, STAGING_PREFIX

INSTALLING = "installing"


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def read_marker(directory: str | Path) -> dict[str, Any] | None:
    """The marker of `directory` (None when it has none, or it is unreadable: then the directory is not ours)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def owned_files(directory: str | Path) -> list[str] | None:
    """The names the marker of `directory` lists (None: not a directory prunetune wrote)."""
    marker = read_marker(directory)
    return None if marker is None else [str(f) for f in marker["files"] if _plain_name(str(f))]


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..", MARKER, LOCK_FILE)


def is_ours(directory: str | Path) -> bool:
    """Whether prunetune wrote `directory`: it holds a readable marker. Nothing else counts."""
    return read_marker(directory) is not None


def incomplete(directory: str | Path) -> bool:
    """Whether a write into `directory` was interrupted while it swapped a result in (its marker says so)."""
    marker = read_marker(directory)
    return marker is not None and marker.get("state") == INSTALLING


def check_complete(directory: str | Path, what: str = "model directory") -> None:
    """Refuse a directory a prunetune write into was interrupted in (its marker says `installing`): a reader
    never takes half of an old result and half of a new one for a whole one."""
    if incomplete(directory):
        raise UserError(f"{what} {str(directory)!r} is incomplete: a prunetune write into it was interrupted (its "
                        "file list says so); run the command that writes it again")


def content(out: Path) -> list[Path]:
    """What `out` holds, less our own bookkeeping (marker, lock, leftover staging dirs)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name not in (MARKER, LOCK_FILE) and not p.name.startswith(STAGING_PREFIX)]


def check_writable(path: str | Path, what: str = "--out", kind: str = "directory") -> Path:
    """`path` (not resolved), or a UserError, before any work, when it cannot be created or written: a symbolic
    link loop or a link to nothing, a path under a file, a file where a directory is wanted (`kind`), a place
    where creating a file fails (read-only, permission denied, ...: the errno names it)."""
    path = check_links(Path(path).expanduser(), what)
    if kind == "directory" and path.exists() and not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file; give a directory")
    if kind == "file" and path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, expected a file path")
    anchor = path if kind == "directory" else path.parent
    while not anchor.exists() and anchor.parent != anchor:
        anchor = anchor.parent
    check_links(anchor, what)
    if not anchor.is_dir():
        raise UserError(f"{what} {str(path)!r} lies under the file {str(anchor)!r}; choose a directory path")
    probe = anchor / f"{STAGING_PREFIX}probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        pass
    except OSError as err:
        reason = describe(err.errno, anchor) if err.errno in CAUSES else (err.strerror or str(err))
        raise UserError(f"{what} {str(path)!r} is not writable: {reason}") from None
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {str(path)!r}: permission denied; choose a file you can write")
    return path


def check_writable_file(path: str | Path, what: str = "--out", form: str | None = None) -> Path:
    """Refuse an output *file* path that is a directory, lies under a file, or cannot be written; before work.
    With `form` (e.g. `prunetune-eval/1`), an existing file is replaced only when it says it is one of ours (its
    JSON `format`): a single file has no marker beside it, so its own record is its ownership."""
    path = check_writable(path, what, kind="file")
    if form is not None and (path.exists() or path.is_symlink()):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            ours = isinstance(record, dict) and record.get("format") == form
        except (ValueError, OSError):
            ours = False
        if not ours:
            kind = form.split("/")[0].removeprefix("prunetune-")
            raise UserError(f"{what} {str(path)!r} exists and is not a prunetune {kind} file (prunetune never "
                            "replaces files it did not write); choose another path")
    return path


def check_space(out: str | Path, need_bytes: int, what: str = "--out", doing: str = "the result") -> None:
    """Refuse, before any work, an output on a disk with less free space than `need_bytes` (an estimate the
    caller makes from its inputs: a lower bound, so a refusal is certain to be right)."""
    free = free_bytes(out)
    if free is not None and need_bytes > free:
        raise UserError(f"{what} {str(out)!r}: {doing} needs about {need_bytes / 2**20:,.1f} MiB but the disk has "
                        f"{free / 2**20:,.1f} MiB free (no space left on device); free space on that disk or "
                        "choose a path on another disk")


def weights_bytes(model: str | Path) -> int:
    """Bytes of the weight files of a model directory (0 for anything else: a hub id, a GGUF file)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def check_apart(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, holds or lies inside one of the (existing, local) inputs: writing it would
    replace what the command reads."""
    out = Path(os.path.realpath(Path(out).expanduser()))
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue
        inp = Path(os.path.realpath(Path(inp).expanduser()))
        if _inside(out, inp) or _inside(inp, out):
            raise UserError(f"--out {str(out)!r} overlaps the input {str(inp)!r}; choose a separate directory")


def check_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Refuse an output before any work starts; returns `out` resolved. The rules:

    - it must be creatable and writable, a directory (not a file), not a link loop;
    - `out` may not be, contain or lie inside any of `inputs`;
    - a non-empty `out` is accepted only if its marker says prunetune wrote it, and then only with `overwrite`
      when the marker lists a file that is there (a result would be replaced); an interrupted write of
      prunetune's (marker `installing`) is replaced without `overwrite`.
    """
    out = check_writable(out).resolve()
    check_apart(out, inputs)
    if not content(out):
        if out.exists():  # a new result is staged beside `out` and renamed into place: its parent is written too
            check_writable(out.parent, f"the directory holding --out {out}:")
        return out
    marker = read_marker(out)
    if marker is None:
        damaged = "; the list there is unreadable" if (out / MARKER).exists() else ""
        raise UserError(f"--out {str(out)!r} is not empty and holds no prunetune output (no {MARKER}, the list of "
                        f"the files prunetune wrote){damaged}: its files are yours; choose an empty or new directory "
                        "(prunetune never replaces files it did not write)")
    listed = owned_files(out) or []
    if not any((out / name).exists() or (out / name).is_symlink() for name in listed):
        return out  # ours, holding no result of ours yet (e.g. a pipeline stage dir): nothing would be replaced
    if marker.get("state") == INSTALLING:
        return out  # an interrupted write of ours: incomplete, replaced whole by this one
    if not overwrite:
        raise UserError(f"--out {str(out)!r} already holds a prunetune result; pass --overwrite to replace it "
                        "(only prunetune's own files are replaced), or choose another --out")
    return out


def _clear_stale_staging(out: Path) -> None:
    for stale in out.glob(f"{STAGING_PREFIX}*") if out.is_dir() else ():
        pid = stale.name.removeprefix(STAGING_PREFIX).split("-")[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_dir(staged: Path, final: Path) -> None:
    """`staged` becomes `final` by renames on one filesystem: the one way prunetune publishes a directory
    (command outputs, a fine-tuning run's checkpoints and result). An existing `final` is replaced whole, never
    merged: it is renamed aside first and deleted only after the new one is in place."""
    if final.exists() or final.is_symlink():
        aside = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{os.getpid()}")
        _remove(aside)
        os.replace(final, aside)
        os.replace(staged, final)
        _remove(aside)
    else:
        os.replace(staged, final)


def _marker_record(files: Iterable[str], command: str, state: str | None = None) -> dict[str, Any]:
    from prunetune import __version__

    record: dict[str, Any] = {"written_by": f"prunetune {__version__}", "command": command,
                              "files": sorted(set(files)), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if state:
        record["state"] = state
    return record


def _write_marker(directory: Path, record: dict[str, Any]) -> None:
    from prunetune.runinfo import write_json

    write_json(directory / MARKER, record)


def _install(staging: Path, out: Path, command: str) -> list[str]:
    """Move the staged files into `out`, replacing what the marker lists and nothing else. The final marker is
    written in `staging` first (it needs space: before anything in `out` changes); the marker in `out` lists the
    old and the new files (`installing`) while they swap, and the final one is renamed over it at the end."""
    new = sorted(p.name for p in staging.iterdir())
    _write_marker(staging, _marker_record(new, command))
    previous = owned_files(out) or []
    _write_marker(out, _marker_record([*previous, *new], command, INSTALLING))
    phases.boundary("install")
    for name in sorted(set(previous) - set(new)):
        _remove(out / name)
    for name in new:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            publish_dir(staging / name, target)
        else:
            os.replace(staging / name, target)
    os.replace(staging / MARKER, out / MARKER)
    staging.rmdir()
    return new


@contextlib.contextmanager
def staged_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  command: str = "prunetune", what: str = "the result") -> Iterator[Path]:
    """Yield an empty staging directory; write the whole result there. On success it replaces `out`'s previous
    prunetune files (a new `out` appears whole, by one rename); on an exception it is deleted and `out` is as
    before, and an OS failure prunetune can name (a full disk, ...) becomes a one-line UserError saying so.
    Checks as `check_output` (call that too, before long work, to fail early)."""
    inputs = list(inputs)
    out = check_output(out, inputs=inputs, overwrite=overwrite)
    fresh = not content(out)
    state = "not created" if not out.exists() else "unchanged"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fresh:  # stage beside `out`: one rename publishes it whole
            staging = out.parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}"
            _clear_stale_staging(out.parent)
        else:
            staging = out / f"{STAGING_PREFIX}{os.getpid()}"
            _clear_stale_staging(out)
        _remove(staging)
        staging.mkdir()
    except OSError as err:
        raise _failed(err, what, out, state) from None
    try:
        yield staging
        phases.boundary("staged")
        if fresh:
            _write_marker(staging, _marker_record((p.name for p in staging.iterdir()), command))
            if out.is_dir():  # empty but for our bookkeeping (a lock, an old staging dir)
                for leftover in out.iterdir():
                    os.replace(leftover, staging / leftover.name) if leftover.name == LOCK_FILE else _remove(leftover)
                out.rmdir()
            publish_dir(staging, out)
        else:
            _install(staging, out, command)
        phases.boundary("published")
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, UserError):
            translated = _failed(err, what, out, state)
            if translated is not None:
                raise translated from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _failed(err: BaseException, what: str, out: Path, state: str) -> UserError | None:
    if incomplete(out):
        state = "incomplete (its file list says so); run the command again to replace it"
    return user_error(err, f"writing {what} to {out}", out,
                      f"nothing was published: {out} is {state}; run the command again once that is fixed")


def mark_ours(directory: str | Path, command: str, files: Iterable[str] = ()) -> Path:
    """Create `directory` (if needed) and record that prunetune owns it and wrote `files` there (the marker).

    With no files (e.g. a pipeline stage directory made before its stage runs) the directory counts as ours
    but holding nothing to replace: `check_output` accepts it without --overwrite and keeps its other files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_marker(directory, _marker_record(files, command))
    return directory / MARKER


def claim(directory: str | Path, names: Iterable[str], command: str) -> None:
    """Add `names` to the marker of `directory` before they are written there (write-ahead: a process killed
    right after creating one never leaves a file of ours that the marker does not list)."""
    directory = Path(directory)
    marker = read_marker(directory)
    listed = owned_files(directory) or []
    names = [n for n in names if _plain_name(n)]
    if marker is not None and set(names) <= set(listed):
        return
    record = _marker_record([*listed, *names], str((marker or {}).get("command") or command))
    _write_marker(directory, record)


def remove_ours(directory: str | Path, also: Iterable[str] = ()) -> bool:
    """Delete what the marker of `directory` lists (and the bookkeeping names in `also`), then the marker, then
    the directory if nothing else is left. Returns whether the directory is gone; files it does not list stay."""
    directory = Path(directory)
    listed = owned_files(directory)
    if listed is None:
        raise UserError(f"{directory} holds no prunetune file list; nothing in it is removed")
    for name in [*listed, *(n for n in also if _plain_name(n))]:
        _remove(directory / name)
    (directory / MARKER).unlink(missing_ok=True)
    _clear_stale_staging(directory)
    if not any(directory.iterdir()):
        directory.rmdir()
        return True
    return False
