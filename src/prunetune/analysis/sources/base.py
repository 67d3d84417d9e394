"""What every log reader is (`LogReader`) and returns (`Source`), and the small conversions they share."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prunetune.rundir.records import to_float

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

MAX_STEP = 10**12
"""No training run logs more optimizer steps than this; a larger `step` is corrupt and read as unknown."""

HEAD_BYTES = 65536
"""How much of a file `detect` sees."""


@dataclass
class Source:
    """Records read from one source, and where they came from."""

    kind: str
    """The family of the file the records came from (`--source-kind`): metrics_jsonl, trainer_state,
    trainer_log_jsonl or console_log."""
    path: Path
    """The file the records were read from."""
    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra facts: format (the reader's name), run_config, all_results, max_steps, step_source (`metrics`,
    `trainer_state`, `trainer_log`, `bar`, `table` are stated by the log; `epoch`, `ordinal` are estimates),
    settings ((origin, mapping) pairs the run's configuration was read from, most trusted first), notes."""

    @property
    def run_dir(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class Peek:
    """What a reader sees of a file to decide whether it is its format: the path and its first bytes as text."""

    path: Path
    head: str
    """The first `HEAD_BYTES` decoded as UTF-8 with replacement; '' when unreadable."""
    binary: bool = False
    """A NUL byte in the head: no text log."""

    @classmethod
    def of(cls, path: Path) -> Peek:
        try:
            with path.open("rb") as f:
                raw = f.read(HEAD_BYTES)
        except OSError:
            return cls(path, "")
        return cls(path, raw.decode("utf-8", errors="replace"), b"\x00" in raw)


@runtime_checkable
class LogReader(Protocol):
    """One log format. A new format is one module with one of these and one line in `sources.registry`."""

    name: str
    """The format's name (`Source.meta["format"]`), e.g. `trainer_state`."""
    kind: str
    """The `Source.kind` family it offers for `--source-kind`."""
    describes: str
    """What it reads, for messages: `a Transformers trainer_state.json`."""

    def detect(self, peek: Peek) -> float:
        """How sure this reader is that the file is its format: 0 (not mine) to 1 (certainly mine)."""
        ...

    def in_directory(self, directory: Path) -> list[Path]:
        """The files of this format a run directory offers, best first (may include files it will not detect)."""
        ...

    def read(self, path: Path) -> Source:
        """The records of the file; UserError (one line, naming the file and the fix) when it cannot be read."""
        ...


def num(value: Any) -> float | str | None:
    """A number as float; NaN/Inf kept as the strings the records schema uses; None if not a number. Integers
    too large for a float are infinite (`fmt.to_float`), never an exception."""
    f = to_float(value)
    if f is None:
        return None
    return f if math.isfinite(f) else str(f)


def step_value(value: Any) -> int | None:
    """A logged step as int: a whole number from 0 to `MAX_STEP`; None for anything else (absent, negative,
    fractional, NaN, astronomically large: a corrupt step is unknown, never a number to compute with)."""
    f = num(value)
    if not isinstance(f, float) or isinstance(value, bool) or not 0 <= f <= MAX_STEP or not f.is_integer():
        return None
    return int(f)


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


def clean_value(value: Any) -> Any:
    """`value` with every integer too large for a float made infinite (JSON allows 10**400; no float does), in
    nested mappings and lists too: what the rules and fixes compute with can always be converted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) > 2**62:
        return math.inf if value > 0 else -math.inf
    if isinstance(value, Mapping):
        return {k: clean_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    return value


def clean_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record every rule can compute with: `step` a sane int or None, numbers that overflow a float infinite."""
    out = {k: clean_value(v) for k, v in record.items()}
    if "step" in record:
        out["step"] = step_value(record["step"])
    return out


def _stopped_on_request(records: Sequence[Mapping[str, Any]], max_steps: int | None, last: int,
                        interval: int | None) -> bool:
    """The training loop ended ("Training completed.", its train metrics, should_training_stop) well before its
    planned `max_steps` (by more than a logging interval and 2% of the plan), with no early stopping in sight (no evaluation, or the
    latest one is the best: early stopping ends a run only after its eval loss stopped improving): something
    asked it to stop (a web UI's Abort, a callback), and the run did not do what it planned."""
    ends = [r for r in records if r.get("event") == "train_end"]
    # short by more than a logging interval and more than 2% of the plan: the Trainer's epoch arithmetic (a last,
    # partial accumulation dropped) ends a run that did finish a few steps short of its printed total
    margin = max(interval or 0, 0.02 * (max_steps or 0))
    if not max_steps or not interval or not ends or last + margin >= max_steps \
            or any(isinstance(r.get("step"), int) and r["step"] + margin >= max_steps for r in ends) \
            or any(r.get("event") == "summary" for r in records):
        return False
    evals = [(r["step"], v) for r in records if r.get("event") == "eval" and isinstance(r.get("step"), int)
             and (v := to_float(r.get("eval_loss"))) is not None and math.isfinite(v)]
    return not evals or min(evals, key=lambda e: e[1]) == evals[-1]


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
    ordered = sorted(set(steps))
    gaps = sorted(b - a for a, b in zip(ordered, ordered[1:], strict=False))
    interval = gaps[len(gaps) // 2] if gaps else None
    if reason is None and _stopped_on_request(records, max_steps, max(steps), interval):
        reason = "stopped on request"
        why = (f" (the end of training was printed {max_steps - max(steps)} steps before its planned {max_steps}, "
               "and no early stopping shows in its evaluations: a stop request, such as a web UI's Abort)")
        records.append({"event": "stopped", "step": max(steps), "reason": reason, "max_steps": max_steps,
                        "message": f"training ended at step {max(steps)} of {max_steps}{why}"})
        return reason
    if reason is None:
        if events & {"train_end", "final_eval", "summary"} or not max_steps or max(steps) >= max_steps:
            return None
        if interval and max(steps) + interval > max_steps:
            # the log reached its last logging point: a run logging every `interval` steps logs no later one
            records.append({"event": "train_end", "step": max(steps),
                            "evidence": f"the last log (step {max(steps)}) is within one logging interval ({interval}) "
                                        f"of max_steps ({max_steps})"})
            return None
        reason = "log ends"
    last = max(steps)
    why = " without its end-of-run lines" if reason == "log ends" else f" after a {reason}"
    records.append({"event": "stopped", "step": last, "reason": reason, "max_steps": max_steps,
                    "message": f"the log ends at step {last}" + (f" of {max_steps}" if max_steps else "") + why})
    return reason
