"""JSONL metrics a training loop writes itself, one object per log: `{"step": 10, "loss": 2.31, "learning_rate":
1e-5}` (no prunetune `event`, no LLaMA-Factory `current_steps`). A file whose name says evaluation
(`eval_metrics.jsonl`, `val_log.jsonl`) holds eval losses; a training file reads its evaluation siblings beside
it (`train_metrics.jsonl` + `eval_metrics.jsonl` in one run directory are one run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import Peek, Source, num, step_value
from prunetune.analysis.sources.jsonl import read_jsonl

_LOSS_KEYS = ("loss", "train_loss", "training_loss", "eval_loss", "val_loss", "valid_loss", "validation_loss")
_STEP_KEYS = ("step", "global_step", "iteration", "iter", "it", "steps")
_EVAL_NAME = re.compile(r"(?:^|[\W_])(eval|val|valid|validation|test|dev)(?:$|[\W_])", re.IGNORECASE)


def _is_metrics(entry: Any) -> bool:
    return isinstance(entry, Mapping) and any(k in entry for k in _LOSS_KEYS) and not (
        "event" in entry or "current_steps" in entry)


def records_of(entries: list[Mapping[str, Any]], evaluation: bool) -> list[dict[str, Any]]:
    """Records of the objects of one file; `evaluation`: the file holds evaluations (its `loss` is an eval loss)."""
    out: list[dict[str, Any]] = []
    for ordinal, e in enumerate(entries, 1):
        step = next((s for k in _STEP_KEYS if (s := step_value(e.get(k))) is not None), None)
        estimated = step is None
        step = ordinal if step is None else step
        extra = {"step_estimated": "ordinal"} if estimated else {}
        train = num(e.get("train_loss", e.get("training_loss", None if evaluation else e.get("loss"))))
        if train is not None:
            rec = {"event": "log", "step": step, "loss": train, **extra}
            for key, name in (("learning_rate", "lr"), ("lr", "lr"), ("grad_norm", "grad_norm"), ("epoch", "epoch")):
                if (value := num(e.get(key))) is not None:
                    rec.setdefault(name, value)
            out.append(rec)
        ev = num(next((e[k] for k in ("eval_loss", "val_loss", "valid_loss", "validation_loss") if k in e),
                      e.get("loss") if evaluation else None))
        if ev is not None:
            out.append({"event": "eval", "step": step, "eval_loss": ev, **extra})
    return out


class JsonlMetrics:
    name = "jsonl_metrics"
    kind = "console_log"
    describes = "JSONL metrics a training loop writes (`{\"step\": 10, \"loss\": 2.31}` per line)"

    def detect(self, peek: Peek) -> float:
        if peek.path.suffix != ".jsonl" or peek.binary:
            return 0.0
        for line in peek.head.splitlines()[:5]:
            try:
                if _is_metrics(json.loads(line)):
                    return 0.7
            except ValueError:
                continue
        return 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        files = sorted(directory.glob("*.jsonl"))
        return sorted(files, key=lambda p: bool(_EVAL_NAME.search(p.stem)))  # training files first

    def read(self, path: Path) -> Source:
        entries, skipped = read_jsonl(path)
        evaluation = bool(_EVAL_NAME.search(path.stem))
        records = records_of([e for e in entries if _is_metrics(e)], evaluation)
        notes = [f"{skipped} unreadable line(s) skipped"] if skipped else []
        if not evaluation:
            for sibling in sorted(path.parent.glob("*.jsonl")):
                if sibling != path and _EVAL_NAME.search(sibling.stem) and self.detect(Peek.of(sibling)):
                    evals, _ = read_jsonl(sibling)
                    records += [r for r in records_of([e for e in evals if _is_metrics(e)], True)
                                if r["event"] == "eval"]
                    notes.append(f"evaluations read from {sibling.name}")
        records.sort(key=lambda r: (r["step"], r["event"] == "eval"))
        return Source(self.kind, path, records, {"format": self.name, "flavour": "trainer", "notes": notes,
                                                 "step_source": "jsonl"})
