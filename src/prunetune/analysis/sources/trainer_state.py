"""Transformers Trainer dicts (`trainer_state.json`'s `log_history`, the dicts the Trainer prints) as records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prunetune.analysis.sources.base import num as _num
from prunetune.errors import UserError
from prunetune.records import to_float

LOG_KEYS = {"learning_rate": "lr"}


def record_from_trainer_dict(d: Mapping[str, Any], step: int | None) -> dict[str, Any] | None:
    """One Trainer `log_history` entry / console dict as a record, or None when it is none of log/eval/end."""
    if "eval_loss" not in d:
        # several eval datasets log eval_<name>_loss; the first one stands for "the" eval loss
        named = next((k for k in d if k.startswith("eval_") and k.endswith("_loss")), None)
        if named is not None:
            d = {**d, "eval_loss": d[named]}
    if "eval_loss" in d:
        rec: dict[str, Any] = {"event": "eval", "step": step}
        for key, value in d.items():
            if key.startswith("eval_") or key in ("epoch", "perplexity"):
                num = _num(value)
                if num is not None:
                    rec[key] = num
        if rec.get("eval_loss") is None:
            return None
        loss = to_float(rec["eval_loss"])
        if "perplexity" not in rec and loss is not None:
            rec["perplexity"] = _num(math.exp(loss) if loss < 700 else math.inf)
        return rec
    if "loss" in d and _num(d["loss"]) is not None:
        rec = {"event": "log", "step": step}
        for key, value in d.items():
            num = _num(value)
            if num is not None and key != "step":
                rec[LOG_KEYS.get(key, key)] = num
        return rec
    if "train_runtime" in d:
        rec = {"event": "train_end", "step": step}
        for key, value in d.items():
            num = _num(value)
            if num is not None and key != "step":
                rec[key] = num
        return rec
    return None


def records_from_trainer_state(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    history = state.get("log_history")
    if not isinstance(history, list):
        raise UserError("trainer_state.json has no `log_history` list; pass the run's trainer_state.json or its log")
    max_steps = state.get("max_steps")
    records = []
    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        step = entry.get("step")
        rec = record_from_trainer_dict(entry, int(step) if isinstance(step, (int, float)) else None)
        if rec is None:
            continue
        if rec["event"] == "log" and max_steps:
            rec["max_steps"] = max_steps
        records.append(rec)
    return records
