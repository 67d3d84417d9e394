"""LLaMA-Factory's `trainer_log.jsonl` (its LogCallback writes one line per Trainer log):

    {"current_steps": 10, "total_steps": 300, "loss": 2.31, "lr": 4.9e-05, "epoch": 0.1, "percentage": 3.33,
     "elapsed_time": "0:00:41", "remaining_time": "0:20:04"}
    {"current_steps": 100, "total_steps": 300, "eval_loss": 2.05, "epoch": 1.0, "percentage": 33.33, ...}

Keys whose value is None or 0 are left out of a line by the writer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from prunetune.analysis.sources.base import mark_unfinished, num
from prunetune.fmt import perplexity_from_loss

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
    for e in entries:
        step = num(e.get("current_steps"))
        if not isinstance(step, float):
            continue
        total = num(e.get("total_steps"))
        if isinstance(total, float) and total > 0:
            max_steps = int(total)
        common: dict[str, Any] = {"step": int(step)}
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
            rec = {"event": "eval", **common, "eval_loss": loss}
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
            records.append({"event": "train_end", "step": int(step), "train_runtime": duration(e.get("elapsed_time"))})
    mark_unfinished(records, max_steps)
    return records, {"max_steps": max_steps, "step_source": "trainer_log"}
