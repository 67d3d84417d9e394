"""Transformers Trainer dicts (`trainer_state.json`'s `log_history`, the dicts the Trainer prints) as records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunetune.analysis.sources.base import mark_unfinished
from prunetune.analysis.sources.base import num as _num
from prunetune.errors import UserError
from prunetune.fmt import perplexity_from_loss
from prunetune.rundir.records import to_float

LOG_KEYS = {"learning_rate": "lr"}


def _eval_sets(d: Mapping[str, Any]) -> list[str]:
    """Names of the eval sets a dict reports (`eval_<name>_loss`); [] for the plain `eval_loss`."""
    return [k[len("eval_"):-len("_loss")] for k in d
            if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss" and len(k) > len("eval__loss")]


def _eval_record(d: Mapping[str, Any], step: int | None, name: str | None) -> dict[str, Any] | None:
    prefix = f"eval_{name}_" if name else "eval_"
    rec: dict[str, Any] = {"event": "eval", "step": step}
    if name:
        rec["eval_set"] = name
    for key, value in d.items():
        if key.startswith(prefix) or key in ("epoch", "perplexity"):
            num = _num(value)
            if num is not None:
                rec["eval_" + key[len(prefix):] if key.startswith(prefix) else key] = num
    if rec.get("eval_loss") is None:
        return None
    loss = to_float(rec["eval_loss"])
    if "perplexity" not in rec and loss is not None:
        # exp(loss), on the assumption of a language-model loss that the report checks (summary.loss_kind)
        rec["perplexity"] = _num(perplexity_from_loss(loss))
        rec["perplexity_derived"] = True
    return rec


def records_from_trainer_dict(d: Mapping[str, Any], step: int | None) -> list[dict[str, Any]]:
    """One Trainer `log_history` entry / console dict as records: a `log`, a `train_end`, or one `eval` per
    eval set (`eval_<name>_loss` keys give `eval` records with `eval_set: name`, never merged into one)."""
    sets = _eval_sets(d)
    if "eval_loss" in d or sets:
        names: list[str | None] = ([None] if "eval_loss" in d else []) + list(sets)
        return [rec for name in names if (rec := _eval_record(d, step, name)) is not None]
    if "loss" in d and _num(d["loss"]) is not None:
        rec = {"event": "log", "step": step}
        for key, value in d.items():
            num = _num(value)
            if num is not None and key != "step":
                rec[LOG_KEYS.get(key, key)] = num
        return [rec]
    if "train_runtime" in d:
        rec = {"event": "train_end", "step": step}
        for key, value in d.items():
            num = _num(value)
            if num is not None and key != "step":
                rec[key] = num
        return [rec]
    return []


def record_from_trainer_dict(d: Mapping[str, Any], step: int | None) -> dict[str, Any] | None:
    """The first record of `records_from_trainer_dict`, or None."""
    records = records_from_trainer_dict(d, step)
    return records[0] if records else None


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
        for rec in records_from_trainer_dict(entry, int(step) if isinstance(step, (int, float)) else None):
            if rec["event"] == "log" and max_steps:
                rec["max_steps"] = max_steps
            records.append(rec)
    mark_unfinished(records, int(max_steps) if isinstance(max_steps, (int, float)) and max_steps > 0 else None)
    return records
