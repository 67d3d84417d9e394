"""What every log reader returns (`Source`), and the small conversions they share."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune.rundir.records import to_float

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

SOURCE_KINDS = ("metrics_jsonl", "trainer_state", "trainer_log_jsonl", "console_log")


@dataclass
class Source:
    """Records read from one source, and where they came from."""

    kind: str
    """One of SOURCE_KINDS."""
    path: Path
    """The file the records were read from."""
    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra facts: run_config, all_results, max_steps, step_source (`bar`, `table`, `epoch`, `ordinal`), notes."""

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def num(value: Any) -> float | str | None:
    """A number as float; NaN/Inf kept as the strings the records schema uses; None if not a number."""
    f = to_float(value)
    if f is None:
        return None
    return f if math.isfinite(f) else str(f)


def seconds(clock: str | None) -> float | None:
    if not clock or "?" in clock:
        return None
    parts = [int(p) for p in clock.split(":") if p.isdigit()]
    value = 0
    for p in parts:
        value = value * 60 + p
    return float(value)


def split_lines(text: str) -> list[str]:
    """Lines of a console capture: ANSI colours removed, tqdm's `\\r` redraws split like newlines."""
    return re.split(r"\r\n|\r|\n", ANSI.sub("", text))


def mark_unfinished(records: list[dict[str, Any]], max_steps: int | None, reason: str | None = None) -> str | None:
    """Append one `stopped` record at the last step when the run did not finish: the log says why (`reason`:
    a traceback, KeyboardInterrupt) or it has no end-of-run record and ends before `max_steps`. A run that
    stopped early is reported as interrupted at its last step, never as finished. Returns the reason."""
    steps = [r["step"] for r in records if r.get("event") in ("log", "eval") and isinstance(r.get("step"), int)]
    events = {r.get("event") for r in records}
    if events & {"error", "stopped"}:
        return None
    if not steps:
        if events or not max_steps:
            return None
        steps = [0]  # training was announced (its step count printed) but no step was ever logged
    if reason is None:
        if events & {"train_end", "final_eval", "summary"} or not max_steps or max(steps) >= max_steps:
            return None
        reason = "log ends"
    last = max(steps)
    why = " without its end-of-run lines" if reason == "log ends" else f" after a {reason}"
    records.append({"event": "stopped", "step": last, "reason": reason, "max_steps": max_steps,
                    "message": f"the log ends at step {last}" + (f" of {max_steps}" if max_steps else "") + why})
    return reason
