"""Named phase boundaries of the commands that write: the points between which a command may be killed.

Each writing command calls `boundary(name)` where one phase ends and the next begins (the output checked, the
result staged, published, a checkpoint staged, a pipeline stage done, ...). Nothing happens there in normal
use. The crash tests set `PRUNETUNE_KILL_AT=name` (`name#N`: its N-th occurrence) to have the process SIGKILL
itself at exactly that point, and `PRUNETUNE_PHASE_LOG=FILE` to learn the boundaries a command passes: this is
how "killed at any phase boundary, the output is complete or absent and a rerun recovers" is tested without
racing a timer."""

from __future__ import annotations

import os
import signal

_KILL_AT = "PRUNETUNE_KILL_AT"
_PHASE_LOG = "PRUNETUNE_PHASE_LOG"
_seen: dict[str, int] = {}


def boundary(name: str) -> None:
    """Mark the end of one phase of a writing command (see the module docstring)."""
    count = _seen[name] = _seen.get(name, 0) + 1
    log = os.environ.get(_PHASE_LOG)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{name}#{count}\n")
    target = os.environ.get(_KILL_AT)
    if target and target in (name, f"{name}#{count}"):
        os.kill(os.getpid(), signal.SIGKILL)
