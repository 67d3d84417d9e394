"""prunetune's own `metrics.jsonl` (`prunetune.rundir.records`): the run's one source of truth, steps exact."""

from __future__ import annotations

from pathlib import Path

from prunetune.analysis.sources.base import Peek, Source
from prunetune.analysis.sources.jsonl import read_jsonl
from prunetune.analysis.sources.trainer_console import OOM

NAME = "metrics.jsonl"


class MetricsJsonl:
    name = "metrics_jsonl"
    kind = "metrics_jsonl"
    describes = "a prunetune metrics.jsonl (JSON records with `event`)"

    def detect(self, peek: Peek) -> float:
        if peek.path.name == NAME:
            return 0.9
        first = next((line for line in peek.head.splitlines() if line.strip()), "")
        return 0.8 if peek.path.suffix == ".jsonl" and first.lstrip().startswith("{") and '"event"' in first else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        return [directory / NAME] if (directory / NAME).is_file() else []

    def read(self, path: Path) -> Source:
        records, skipped = read_jsonl(path)
        notes = [f"{skipped} unreadable line(s) skipped"] if skipped else []
        src = Source(self.kind, path, records, {"format": self.name, "flavour": "prunetune",
                                                "step_source": "metrics", "notes": notes})
        _merge_console_oom(src)
        return src


def _merge_console_oom(src: Source) -> None:
    """A crash kills the writer before it can record the error; the train.log beside still shows the traceback,
    placed at the last step the records reached."""
    if any(r.get("event") == "error" for r in src.records):
        return
    log = src.path.parent / "train.log"
    if not log.is_file():
        return
    text = log.read_text(encoding="utf-8", errors="replace")
    match = next((line for line in text.splitlines() if OOM.search(line)), None)
    if match:
        steps = [r.get("step") for r in src.records if isinstance(r.get("step"), int)]
        src.records.append({"event": "error", "step": max(steps) if steps else None, "kind": "out_of_memory",
                            "message": match.strip()})
