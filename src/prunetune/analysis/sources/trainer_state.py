"""Transformers Trainer dicts (`trainer_state.json`'s `log_history`, the dicts the Trainer prints) as records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import Peek, Source, mark_unfinished, num, step_value
from prunetune.analysis.sources.jsonl import read_log_bytes
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
            value = num(value)
            if value is not None:
                rec["eval_" + key[len(prefix):] if key.startswith(prefix) else key] = value
    if rec.get("eval_loss") is None:
        return None
    loss = to_float(rec["eval_loss"])
    if "perplexity" not in rec and loss is not None:
        # exp(loss), on the assumption of a language-model loss that the report checks (summary.loss_kind)
        rec["perplexity"] = num(perplexity_from_loss(loss))
        rec["perplexity_derived"] = True
    return rec


def records_from_trainer_dict(d: Mapping[str, Any], step: int | None) -> list[dict[str, Any]]:
    """One Trainer `log_history` entry / console dict as records: a `log`, a `train_end`, or one `eval` per
    eval set (`eval_<name>_loss` keys give `eval` records with `eval_set: name`, never merged into one)."""
    sets = _eval_sets(d)
    if "eval_loss" in d or sets:
        names: list[str | None] = ([None] if "eval_loss" in d else []) + list(sets)
        return [rec for name in names if (rec := _eval_record(d, step, name)) is not None]
    if "loss" in d and num(d["loss"]) is not None and not isinstance(d["loss"], bool):
        rec = {"event": "log", "step": step}
        for key, value in d.items():
            value = num(value)
            if value is not None and key != "step":
                rec[LOG_KEYS.get(key, key)] = value
        return [rec]
    if "train_runtime" in d:
        rec = {"event": "train_end", "step": step}
        for key, value in d.items():
            value = num(value)
            if value is not None and key != "step":
                rec[key] = value
        return [rec]
    return []


def record_from_trainer_dict(d: Mapping[str, Any], step: int | None) -> dict[str, Any] | None:
    """The first record of `records_from_trainer_dict`, or None."""
    records = records_from_trainer_dict(d, step)
    return records[0] if records else None


def _should_stop(state: Mapping[str, Any]) -> bool:
    """`should_training_stop` as the state saves it: at the top level (older Transformers) or in the
    TrainerControl of `stateful_callbacks`."""
    control = state.get("stateful_callbacks")
    control = control.get("TrainerControl") if isinstance(control, Mapping) else None
    args = control.get("args") if isinstance(control, Mapping) else None
    flags = [state.get("should_training_stop"), args.get("should_training_stop") if isinstance(args, Mapping) else None]
    return any(flag is True for flag in flags)


def records_from_trainer_state(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Records of a trainer_state.json: its `log_history` in order; evaluations logged after the end-of-training
    entry (`trainer.evaluate()` after `train()`) are `final_eval`s; the run's end from the state's own fields
    (`global_step` = `max_steps` or `should_training_stop`), else a `stopped` record."""
    history = state.get("log_history")
    if not isinstance(history, list):
        raise UserError("trainer_state.json has no `log_history` list; pass the run's trainer_state.json or its log")
    max_steps = step_value(state.get("max_steps")) or None
    global_step = step_value(state.get("global_step"))
    records: list[dict[str, Any]] = []
    ended = False
    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        for rec in records_from_trainer_dict(entry, step_value(entry.get("step"))):
            if rec["event"] == "log" and max_steps:
                rec["max_steps"] = max_steps
            if rec["event"] == "eval" and ended:
                rec["event"] = "final_eval"
            ended = ended or rec["event"] == "train_end"
            records.append(rec)
    logged = [r["step"] for r in records if r["event"] in ("log", "eval") and r.get("step") is not None]
    interval = step_value(state.get("logging_steps")) or 1
    if logged and global_step is not None and not max(logged) <= global_step <= max(logged) + interval:
        global_step = None  # a state whose step its own history contradicts: trust the history
    if not ended and global_step is not None and (_should_stop(state) or (max_steps and global_step >= max_steps)):
        why = "should_training_stop" if _should_stop(state) else f"global_step {global_step} = max_steps"
        records.append({"event": "train_end", "step": global_step, "evidence": f"trainer_state.json: {why}"})
    if not ended and global_step is not None and max_steps and global_step < max_steps and not _should_stop(state):
        # the state states its own step: a checkpoint's state written before the planned end is where the run's
        # record ends, however close to max_steps (the one-logging-interval allowance is for logs that cannot
        # say which step they reached)
        records.append({"event": "stopped", "step": global_step, "reason": "log ends", "max_steps": max_steps,
                        "message": f"trainer_state.json stops at step {global_step} of {max_steps} (a checkpoint's "
                                   "state: no end of training in it)"})
    stop = len(records)
    mark_unfinished(records, max_steps)
    if len(records) > stop and global_step is not None and global_step > (records[-1].get("step") or 0):
        records[-1]["step"] = global_step  # the state's own step: the checkpoint was written there
        records[-1]["message"] = f"trainer_state.json stops at step {global_step} of {max_steps}"
    return records


def state_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a trainer_state.json keeps (per-device batch, logging/eval/save intervals, planned steps)."""
    keys = ("train_batch_size", "logging_steps", "eval_steps", "save_steps", "max_steps", "num_train_epochs")
    return {k: state[k] for k in keys if num(state.get(k)) is not None}


class TrainerState:
    name = "trainer_state"
    kind = "trainer_state"
    describes = "a Transformers trainer_state.json (`log_history`)"

    def detect(self, peek: Peek) -> float:
        if peek.path.suffix != ".json":
            return 0.0
        return 0.95 if '"log_history"' in peek.head else 0.6 if peek.path.name == "trainer_state.json" else 0.3

    def in_directory(self, directory: Path) -> list[Path]:
        state = directory / "trainer_state.json"
        if state.is_file():
            return [state]
        ckpt = _latest_checkpoint_state(directory)
        return [ckpt] if ckpt is not None else []

    def read(self, path: Path) -> Source:
        state = read_json(path)
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a trainer_state.json (a JSON object with `log_history`)")
        meta = {k: state[k] for k in ("best_metric", "best_model_checkpoint", "best_global_step", "logging_steps",
                                      "eval_steps", "train_batch_size") if k in state}
        if (max_steps := step_value(state.get("max_steps"))) is not None:
            meta["max_steps"] = max_steps
        meta.update(format=self.name, flavour="trainer", step_source="trainer_state",
                    settings=[("trainer_state.json", state_settings(state))])
        return Source(self.kind, path, records_from_trainer_state(state), meta)


def _latest_checkpoint_state(run_dir: Path) -> Path | None:
    """The trainer_state.json of the newest `checkpoint-N/` (by N)."""
    states = [(step_value(p.parent.name.rpartition("-")[2]), p) for p in run_dir.glob("checkpoint-*/trainer_state.json")]
    states = [(n, p) for n, p in states if n is not None]
    return max(states)[1] if states else None


def read_json(path: Path) -> Any:
    """Parsed JSON of a log file; a one-line UserError naming the file and the fix otherwise."""
    raw = read_log_bytes(path, "trainer_state.json", ", not a trainer_state.json")
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"cannot read {path} as JSON ({str(err)[:120]}); pass a trainer_state.json, metrics.jsonl "
                        "or a log") from None
