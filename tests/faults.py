"""Fault injection for the suite: a disk that fills up at the k-th write and stays full, a place that refuses
writes (read-only, permission denied), and a process killed with SIGKILL at a named phase boundary.

`DiskFull(root, k)` patches the write primitives everything prunetune writes through goes to: `open`/`io.open`
(and with them `os.fdopen`, `Path.write_*`, `json.dump` to a file, matplotlib, `shutil.copy*`), `os.open`,
`os.mkdir` (and `Path.mkdir`, `os.makedirs`, `tempfile.mkstemp` through `os.open`), safetensors'
`save_file` and `torch.save` (native writers that never pass through Python's `open`; every module's
reference to them is replaced). Writes under `root` are counted; from the k-th on each fails as the real one
does: an `OSError` with the errno, safetensors' `SafetensorError ... (os error 28)`, torch's writer
`RuntimeError ... unexpected pos` (with `shutil.disk_usage` reporting 0 bytes free from then on, as a full
disk does). The k-th write leaves an empty file behind, as a write cut short by a full disk does. Renames and
deletions still work, as on a real full disk. `k=None` only counts.

`run_cli` runs `prunetune ...` in-process and returns (exit code, stdout, stderr). `run_child` runs it in a
child forked from a forkserver that has already imported torch and Transformers (a fresh interpreter per run
would cost seconds each), with `PRUNETUNE_KILL_AT` set: the child SIGKILLs itself at that phase boundary
(`prunetune.phases`).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from prunetune import cli

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _replace_everywhere(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, str, Any]]:
    """Point every module's global that *is* one of the originals at its replacement (one pass over the loaded
    modules); returns (module, name, original) to undo."""
    wanted = {id(original): (original, replacement) for original, replacement in pairs}
    patched = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            hit = wanted.get(id(value))
            if hit is not None and value is hit[0]:
                setattr(module, name, hit[1])
                patched.append((module, name, value))
    return patched


_DIGITS = re.compile(r"\d+")
_TEMP = re.compile(r"\.(?:[A-Za-z0-9_]{8}|tmp\d+)$")  # mkstemp's suffix, or a pid (any number of digits)


def site(path: str, root: str) -> str:
    """Where a write goes, without what changes between runs (pids, steps, temp-file suffixes): the unit the
    chains fail once each (checkpoint-N/optimizer.pt is one site whatever N)."""
    rel = os.path.relpath(path, root)
    return _DIGITS.sub("N", _TEMP.sub(".TMP", rel))


class DiskFull:
    """Writes under `root` fail with `number` (ENOSPC: the disk fills and stays full) from the k-th on, or from
    the first whose `site` `fail(site)` accepts; neither: only count."""

    def __init__(self, root: Path, k: int | None = None, number: int = errno.ENOSPC,
                 fail: Callable[[str], bool] | None = None) -> None:
        self.root = str(Path(root).resolve())
        self.k = k
        self.fail = fail
        self.number = number
        self.calls: list[str] = []
        self.fired: str | None = None
        """The site of the write that failed first (None: none failed)."""
        self._undo: list[Callable[[], None]] = []

    # -- what counts as a write under root --
    def _under(self, path: Any) -> bool:
        if isinstance(path, int):
            return False
        try:
            text = os.fspath(path)
        except TypeError:
            return False
        text = text.decode() if isinstance(text, bytes) else text
        return os.path.abspath(text).startswith(self.root)

    def _hit(self, path: Any, leave_file: bool) -> bool:
        """Count a write; True when it must fail (the first failing one leaves an empty file where one was being
        written, as a write cut short does)."""
        if not self._under(path):
            return False
        text = os.path.abspath(os.fspath(path) if not isinstance(path, bytes) else path.decode())
        self.calls.append(text)
        if self.fired is None:
            due = (self.k is not None and len(self.calls) >= self.k) or (self.fail is not None and
                                                                           self.fail(site(text, self.root)))
            if not due:
                return False
            self.fired = site(text, self.root)
            if leave_file:
                with contextlib.suppress(OSError):
                    os.close(self._real_os_open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        return True

    def _error(self, path: Any) -> OSError:
        return OSError(self.number, os.strerror(self.number), os.fspath(path))

    # -- the patched primitives --
    def __enter__(self) -> DiskFull:
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        real_save_file, real_torch_save, real_usage = safetensors.torch.save_file, torch.save, shutil.disk_usage
        self._real_os_open = real_os_open

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and self._hit(file, leave_file=True):
                raise self._error(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):  # fails creating the file: no descriptor, no file
            if flags & _WRITE_FLAGS and self._hit(path, leave_file=False):
                raise self._error(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):  # an existing directory is EEXIST, full disk or not
            if not os.path.lexists(path) and self._hit(path, leave_file=False):
                raise self._error(path)
            return real_mkdir(path, *args, **kwargs)

        def save_file(tensors, filename, *args, **kwargs):
            if self._hit(filename, leave_file=True):
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.number)} "
                                      f"(os error {self.number})")
            return real_save_file(tensors, filename, *args, **kwargs)

        def torch_save(obj, f, *args, **kwargs):
            if not isinstance(f, (str, os.PathLike)) or not self._hit(f, leave_file=True):
                return real_torch_save(obj, f, *args, **kwargs)
            if self.number in (errno.ENOSPC, errno.EDQUOT):  # torch's writer carries no errno: only the symptom
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            raise self._error(f)

        def disk_usage(path):
            usage = real_usage(path)
            if self.fired is not None and self.number == errno.ENOSPC and self._under(path):
                return type(usage)(usage.total, usage.total, 0)
            return usage

        patched = _replace_everywhere([(real_open, open_), (real_os_open, os_open), (real_mkdir, mkdir),
                                       (real_save_file, save_file), (real_torch_save, torch_save),
                                       (real_usage, disk_usage)])
        self._undo.append(lambda: [setattr(m, n, original) for m, n, original in patched])
        for holder in (builtins, io):
            if holder.open is not open_:
                holder.open = open_
                self._undo.append(lambda holder=holder: setattr(holder, "open", real_open))
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


@contextlib.contextmanager
def refusing(root: Path, number: int) -> Iterator[DiskFull]:
    """Every write under `root` fails with `number` (EROFS: a read-only file system; EACCES: no permission)."""
    with DiskFull(root, 1, number) as fault:
        yield fault


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """Opening `path` for reading fails with EACCES, as for a file without read permission."""
    real_open = builtins.open
    target = os.path.abspath(path)

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and os.path.abspath(os.fspath(file)) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    patched = _replace_everywhere([(real_open, open_)])
    builtins.open = io.open = open_
    try:
        yield
    finally:
        builtins.open = io.open = real_open
        for module, name, original in patched:
            setattr(module, name, original)


# ---- running the CLI -------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`prunetune ARGV` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def error_line(stderr: str, command: str) -> str:
    """The one error line of a failed command; fails the test on a traceback or a second error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"prunetune {command}: ")]
    assert len(lines) == 1, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == lines[0], stderr[-3000:]
    return lines[0]


def digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (a file: itself), symlinks as their target."""
    path = Path(path)
    if path.is_symlink():
        return {".": "link:" + os.readlink(path)}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    found = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            found[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            found[rel] = "dir"
    return found


# ---- a command in a child that can be killed at a phase boundary ----------------------------------------

_PRELOAD = ["torch", "transformers", "peft", "prunetune.cli", "prunetune.pruning.engine", "prunetune.finetune.engine",
            "prunetune.merge", "prunetune.export.run", "prunetune.evaluate", "prunetune.pipeline.job"]
_context: Any = None


def _context_once() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        code = cli.main(argv)
    os._exit(code)


def run_child(argv: list[str], tmp: Path, kill_at: str | None = None, env: dict[str, str] | None = None,
              timeout: float = 600) -> tuple[int, str, str]:
    """`prunetune ARGV` in a forked child, SIGKILLed at `kill_at`: (exit code, -9 when killed; stdout; stderr)."""
    ctx = _context_once()
    names = {"PRUNETUNE_HOME": os.environ["PRUNETUNE_HOME"], "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "PRUNETUNE_KILL_AT": kill_at or "", **(env or {})}
    out, err = tmp / ".child-stdout", tmp / ".child-stderr"
    process = ctx.Process(target=_child, args=(argv, names, os.getcwd(), str(out), str(err)))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"prunetune {' '.join(argv)} did not end within {timeout} s")
    return process.exitcode, out.read_text(), err.read_text()
