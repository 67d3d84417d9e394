"""Where a fine-tuning run's result is, as the run itself recorded it.

A finished run records its result directory in its own `metrics.jsonl` (the `adapter_saved` record, written when
the result was published). Readers (the pipeline, `merge`, `evaluate`) ask here instead of spelling file names
or guessing which directory a method writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunetune.rundir.names import ADAPTER_CONFIG, METRICS
from prunetune.rundir.records import iter_jsonl


@dataclass(frozen=True)
class RecoveryResult:
    path: Path
    """The result directory (an adapter, or a model directory)."""
    method: str
    """The recovery method that wrote it."""

    @property
    def is_adapter(self) -> bool:
        """A PEFT adapter to apply to (or merge into) the pruned model, rather than a model of its own."""
        return (self.path / ADAPTER_CONFIG).is_file()


def recovery_result(run_dir: str | Path) -> RecoveryResult | None:
    """The result a fine-tuning run in `run_dir` saved last (None when it saved none, or it is gone)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    if not metrics.is_file():
        return None
    saved = [r for r in iter_jsonl(metrics) if r.get("event") == "adapter_saved" and (r.get("result") or r.get("dir"))]
    if not saved:
        return None
    last = saved[-1]
    # `result`: the directory's name inside the run (a run directory may be moved); `dir`: where it was written.
    path = run_dir / str(last["result"]) if last.get("result") else Path(str(last["dir"]))
    if not path.is_dir():
        return None
    return RecoveryResult(path, str(last.get("method") or ""))
