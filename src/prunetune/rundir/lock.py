"""One writer per directory: `run_lock` holds a lock file (pid, host, command) while a command writes there."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prunetune.errors import UserError
from prunetune.oserrors import user_error
from prunetune.rundir.names import LOCK_FILE

_Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)

def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_held: dict[tuple[Path, int], int] = {}  # (lock path, thread) -> depth: re-entrant per thread, not per process


def _try_create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
    except BaseException:
        path.unlink(missing_ok=True)  # a lock a full disk left empty would block the rerun for seconds
        raise
    return True


def _lock_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (the lock file is unreadable)"
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, "
            f"started {info.get('started')})")


@contextlib.contextmanager
def run_lock(directory: str | Path, command: str, *, wait_s: float = 0.0, name: str = LOCK_FILE,
             log: _Log = _stderr) -> Iterator[Path]:
    """Hold `directory/name` (created with the directory) while writing there: one writer per directory.

    The lock file holds pid, host, command and start time. Another live holder: wait up to `wait_s` seconds,
    then a UserError naming it and what to do. A lock left by a dead process on this host is taken over with a
    message. Re-entrant within one process. Yields the lock file's path.
    """
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        translated = user_error(err, f"creating {directory}", directory)
        if translated is None:
            raise
        raise translated from None
    path = (directory / name).resolve()
    key = (path, threading.get_ident())
    if _held.get(key):
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    deadline = time.monotonic() + wait_s
    while not _try_create(path, info):
        holder = _read_lock(path)
        stale = False
        if holder is None:
            # Unreadable: a lock being written this instant, or the remains of a crash; give it a few seconds.
            with contextlib.suppress(OSError):
                stale = time.time() - path.stat().st_mtime > 10
        elif holder.get("host") == host and not pid_alive(int(holder.get("pid") or 0)):
            stale = True
        if stale:
            # Rename, then retry the exclusive create: of two processes taking over at once only one wins.
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)
                aside.unlink()
                log(f"Taking over the lock {path}: {_lock_holder(holder)} is no longer running")
            continue
        if time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        pid = holder.get("pid") if holder else None
        how = (f"wait for it to finish or stop it (kill {pid})" if holder and holder.get("host") == host
               else "wait for it to finish")
        raise UserError(f"{directory} is being written by {_lock_holder(holder)}; {how}; if no such process "
                        f"runs any more, delete {path}")
    _held[key] = 1
    try:
        yield path
    finally:
        _held.pop(key, None)
        holder = _read_lock(path)
        if holder and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
