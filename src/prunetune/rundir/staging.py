"""The staged-output guard every writing command uses: nothing half-written, nothing of the user's lost.

A result is written into a staging directory and published whole by renames (`publish_dir`); a directory
prunetune wrote holds `.prunetune-files.json` (the marker), the list of files a later `--overwrite` may replace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from prunetune.errors import UserError
from prunetune.rundir.lock import pid_alive
from prunetune.rundir.names import LOCK_FILE, MARKER, STAGING_PREFIX


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _marker_files(out: Path) -> list[str] | None:
    try:
        files = json.loads((out / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


def _content(out: Path) -> list[Path]:
    """What `out` holds, less our own bookkeeping (marker, lock, leftover staging dirs)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name not in (MARKER, LOCK_FILE) and not p.name.startswith(STAGING_PREFIX)]


def _probe_writable(out: Path, what: str = "--out") -> None:
    """Refuse an `out` that cannot be created or written (read-only fs, a path under a file) before any work."""
    anchor = out
    while not anchor.exists():
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if anchor.exists() and not anchor.is_dir():
        raise UserError(f"{what} {str(out)!r} lies under the file {str(anchor)!r}; choose a directory path")
    try:
        fd = os.open(anchor / f"{STAGING_PREFIX}probe-{os.getpid()}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(anchor / f"{STAGING_PREFIX}probe-{os.getpid()}")
    except FileExistsError:
        pass
    except OSError as err:
        raise UserError(f"{what} {str(out)!r} is not writable ({err.strerror} in {anchor}); "
                        "choose a directory you can write") from None


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output *file* path that is a directory, lies under a file, or cannot be written; before work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, expected a file path")
    _probe_writable(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {str(path)!r}: permission denied; choose a file you can write")
    return path


def check_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 owned: Iterable[str] = ()) -> Path:
    """Refuse an output before any work starts; returns `out` resolved. The rules:

    - `out` may not be, contain or lie inside any of `inputs`;
    - it must be creatable and writable, and a directory (not a file);
    - a non-empty `out` is accepted only if prunetune wrote it (marker file, or one of the `owned` file names
      for directories of older versions) and `overwrite` is set.
    """
    out = Path(out).expanduser().resolve()
    for inp in inputs:
        inp = Path(inp).expanduser().resolve()
        if _inside(out, inp) or _inside(inp, out):
            raise UserError(f"--out {str(out)!r} overlaps the input {str(inp)!r}; choose a separate directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    _probe_writable(out)
    content = _content(out)
    if not content:
        return out
    previous = _marker_files(out)
    if previous is not None and not any((out / name).exists() for name in previous):
        return out  # ours, holding no result of ours yet (e.g. a pipeline stage dir): nothing would be replaced
    ours = previous is not None or any((out / name).exists() for name in owned)
    if not ours:
        raise UserError(f"--out {str(out)!r} is not empty and holds no prunetune output; choose an empty or new "
                        "directory (prunetune never deletes files it did not write)")
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


def _install(staging: Path, out: Path, owned: Iterable[str]) -> list[str]:
    """Move the staged files into `out`: first drop what a previous prunetune run wrote there (per the marker;
    for an older dir without one, the staged names and the `owned` names), never anything else."""
    new = sorted(p.name for p in staging.iterdir())
    previous = _marker_files(out)
    old = set(previous if previous is not None else [*new, *owned])
    # Weight shards are named by count (model-00001-of-00003.safetensors): a previous save's extra shards go too.
    if previous is None and any(n.startswith("model") and ".safetensors" in n for n in new):
        old |= {p.name for p in out.glob("model*.safetensors*")}
    (out / MARKER).unlink(missing_ok=True)  # from here until the new marker, the dir is visibly incomplete
    for name in sorted(old - set(new)):
        if "/" not in name and name not in (MARKER, LOCK_FILE):
            _remove(out / name)
    for name in new:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            publish_dir(staging / name, target)
        else:
            os.replace(staging / name, target)
    staging.rmdir()
    return new


@contextlib.contextmanager
def staged_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  owned: Iterable[str] = (), command: str = "prunetune") -> Iterator[Path]:
    """Yield an empty staging directory; write the whole result there. On success it replaces `out`'s previous
    prunetune files (a new `out` appears whole, by one rename); on an exception it is deleted and `out` is as
    before. Checks as `check_output` (call that too, before long work, to fail early).
    """
    inputs, owned = list(inputs), list(owned)
    out = check_output(out, inputs=inputs, overwrite=overwrite, owned=owned)
    fresh = not _content(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fresh:  # stage beside `out`: one rename publishes it whole
        staging = out.parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}"
        _clear_stale_staging(out.parent)
    else:
        staging = out / f"{STAGING_PREFIX}{os.getpid()}"
        _clear_stale_staging(out)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if fresh:
            files = sorted(p.name for p in staging.iterdir())
            _write_marker(staging, files, command)
            if out.is_dir():  # empty but for our bookkeeping (a lock, an old staging dir)
                for leftover in out.iterdir():
                    os.replace(leftover, staging / leftover.name) if leftover.name == LOCK_FILE else _remove(leftover)
                out.rmdir()
            publish_dir(staging, out)
        else:
            files = _install(staging, out, owned)
            _write_marker(out, files, command)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mark_ours(directory: str | Path, command: str, files: Iterable[str] = ()) -> Path:
    """Create `directory` (if needed) and record that prunetune owns it and wrote `files` there (the marker).

    With no files (e.g. a pipeline stage directory made before its stage runs) the directory counts as ours
    but holding nothing to replace: `check_output` accepts it without --overwrite and keeps its other files.
    """
    from prunetune import __version__
    from prunetune.runinfo import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / MARKER, {"written_by": f"prunetune {__version__}", "command": command,
                                    "files": sorted(files), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return directory / MARKER


def _write_marker(directory: Path, files: list[str], command: str) -> None:
    mark_ours(directory, command, files)


def is_ours(directory: str | Path, owned: Iterable[str] = ()) -> bool:
    """Whether prunetune wrote `directory` (marker, or one of the `owned` names of older layouts)."""
    directory = Path(directory)
    return (directory / MARKER).is_file() or any((directory / name).exists() for name in owned)
