"""LLaMA-Factory's `trainer_log.jsonl` (its LogCallback writes one line per Trainer log):

    {"current_steps": 10, "total_steps": 300, "loss": 2.31, "lr": 4.9e-05, "epoch": 0.1, "percentage": 3.33,
     "elapsed_time": "0:00:41", "remaining_time": "0:20:04"}
    {"current_steps": 100, "total_steps": 300, "eval_loss": 2.05, "epoch": 1.0, "percentage": 33.33, ...}

Keys whose value is None or 0 are left out of a line by the writer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import Peek, Source, mark_unfinished, num, step_value
from prunetune.analysis.sources.jsonl import read_jsonl
from prunetune.fmt import perplexity_from_loss

NAME = "trainer_log.jsonl"

_DURATION = re.compile(r"^(?:(\d+) days?, )?(\d+):(\d{2}):(\d{2})(?:\.\d+)?$")


def is_trainer_log(entries: Sequence[Mapping[str, Any]]) -> bool:
    """Whether JSONL lines look like LLaMA-Factory's trainer_log.jsonl."""
    return any("current_steps" in e for e in entries[:5])


def duration(text: Any) -> float | None:
    """`0:00:41` / `1 day, 2:03:04` (str of a timedelta) in seconds."""
    m = _DURATION.match(str(text).strip()) if text is not None else None
    if m is None:
        return None
    days, h, mnt, s = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + h) * 60 + mnt) * 60 + s)


def records_from_trainer_log(entries: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records and meta (max_steps) of trainer_log.jsonl lines."""
    records: list[dict[str, Any]] = []
    max_steps = None
    ended = False
    for e in entries:
        step = step_value(e.get("current_steps"))
        if step is None:
            continue
        total = step_value(e.get("total_steps"))
        if total:
            max_steps = total
        common: dict[str, Any] = {"step": step}
        if num(e.get("epoch")) is not None:
            common["epoch"] = num(e.get("epoch"))
        if num(e.get("loss")) is not None:
            rec = {"event": "log", **common, "loss": num(e["loss"])}
            for key, name in (("lr", "lr"), ("grad_norm", "grad_norm"), ("throughput", "tokens_per_s"),
                              ("reward", "reward"), ("accuracy", "accuracy")):
                if num(e.get(key)) is not None:
                    rec[name] = num(e[key])
            if max_steps:
                rec["max_steps"] = max_steps
            if (t := duration(e.get("elapsed_time"))) is not None:
                rec["elapsed"] = t
            if (t := duration(e.get("remaining_time"))) is not None:
                rec["eta_s"] = t
            records.append(rec)
        if num(e.get("eval_loss")) is not None:
            loss = num(e["eval_loss"])
            rec = {"event": "final_eval" if ended else "eval", **common, "eval_loss": loss}
            if isinstance(loss, float):
                rec["perplexity"] = perplexity_from_loss(loss)
            for key in ("eval_accuracy", "accuracy", "reward"):
                if num(e.get(key)) is not None:
                    rec[key] = num(e[key])
            records.append(rec)
        elif num(e.get("predict_loss")) is not None:
            records.append({"event": "final_eval", **common, "eval_loss": num(e["predict_loss"])})
        elif num(e.get("loss")) is None and max_steps and step >= max_steps:
            # the line of the Trainer's last log (train_runtime, no loss): training ran to its end
            records.append({"event": "train_end", "step": step, "train_runtime": duration(e.get("elapsed_time"))})
            ended = True
    mark_unfinished(records, max_steps)
    return records, {"max_steps": max_steps, "step_source": "trainer_log"}


class TrainerLog:
    name = "trainer_log_jsonl"
    kind = "trainer_log_jsonl"
    describes = "a LLaMA-Factory trainer_log.jsonl (`current_steps`)"

    def detect(self, peek: Peek) -> float:
        if peek.path.suffix != ".jsonl":
            return 0.0
        return 0.95 if '"current_steps"' in peek.head else 0.5 if peek.path.name == NAME else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        return [directory / NAME] if (directory / NAME).is_file() else []

    def read(self, path: Path) -> Source:
        entries, skipped = read_jsonl(path)
        records, meta = records_from_trainer_log(entries)
        notes = [f"{skipped} unreadable line(s) skipped"] if skipped else []
        return Source(self.kind, path, records, {**meta, "format": self.name, "flavour": "trainer", "notes": notes})
