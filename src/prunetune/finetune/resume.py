"""Resuming a run: which checkpoint (`auto` = the newest *complete* one), whether it is whole before anything
is touched, what the interrupted session wrote that the resumed one supersedes, and what it carries over
(best evaluation, baseline, the earlier sessions' time and loss).

A checkpoint is complete when its trainer state, adapter (or model) weights and optimizer state all read
back; `PrunetuneTrainer` writes checkpoints complete-or-absent, and this module still checks, because a
checkpoint may come from an older version, another tool, or a disk that filled up.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune import rundir
from prunetune.errors import UserError
from prunetune.finetune import checkpoint_layout
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.trainer import CHECKPOINT_STAGING, SESSIONS
from prunetune.recovery import registry as recovery_methods
from prunetune.rundir import METRICS, RUN_CONFIG
from prunetune.rundir.records import read_jsonl, to_float

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
# Training records an interrupted run wrote after its last checkpoint; a resumed run writes them again.
SUPERSEDED_EVENTS = ("log", "eval", "checkpoint", "alert", "message")
# How the interrupted session ended: a resumed run is not finished, so readers (monitor) must not see these.
ENDING_EVENTS = ("train_end", "stopped", "error", "best_loaded", "final_eval", "sparsity_check", "adapter_saved",
                 "summary")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# What a resumed session must share with the run it continues: the model, what trains, the data and its order.
# (The LR may change: the restored schedule is rescaled; evaluation and logging settings may change freely.)
FIXED_ON_RESUME = ("pruned", "dataset", "block_size", "max_train_samples", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "seed", "method", "lora_r", "lora_alpha", "lora_targets",
                   "sparse_ft_targets")


def changed_settings(cfg: FinetuneConfig, out: Path) -> list[tuple[str, Any, Any]]:
    """(setting, the run's value, this session's value) for every FIXED_ON_RESUME setting that differs from the
    run's own `run_config.json`; empty when it has none (an older run)."""
    path = out / RUN_CONFIG
    try:
        saved = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return []
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    return [(key, saved[key], now[key]) for key in FIXED_ON_RESUME
            if key in saved and _same_form(saved[key]) != _same_form(now.get(key))]


def _same_form(value: Any) -> Any:
    """A path given relative in one session and absolute in the other is the same setting."""
    if isinstance(value, str) and ("/" in value or value.startswith(".")) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    step: int
    skipped: tuple[str, ...] = ()
    """Incomplete or unreadable checkpoints passed over, one line each (said on the console)."""


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (missing or unreadable file), or None when it is complete."""
    state = path / TRAINER_STATE
    try:
        json.loads(state.read_text())["global_step"]
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is unreadable"
    if checkpoint_layout.is_sharded(path):  # FSDP's layout: every rank's shards, no whole weights file
        return checkpoint_layout.sharded_problem(path)
    names = recovery_methods.checkpoint_weights()  # whichever method wrote it
    weights = next((path / name for name in names if (path / name).is_file()), None)
    if weights is None:
        return f"no {' or '.join(names)}"
    try:
        rundir.check_safetensors(weights, weights.name)  # header and length: a truncated file fails here
    except UserError:
        return f"{weights.name} is unreadable (truncated or corrupt)"
    if not (path / OPTIMIZER).is_file():
        return f"no {OPTIMIZER}"
    try:
        with zipfile.ZipFile(path / OPTIMIZER) as archive:
            bad = archive.testzip()  # CRC of every member: a truncated or corrupted file fails here
    except (OSError, zipfile.BadZipFile) as err:
        return f"{OPTIMIZER} is unreadable ({type(err).__name__})"
    return f"{OPTIMIZER} is corrupt ({bad})" if bad else None


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` directories of a run, newest (highest N) first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def _step(path: Path) -> int:
    return int(json.loads((path / TRAINER_STATE).read_text()).get("global_step", 0))


def select_checkpoint(cfg: FinetuneConfig, out: Path) -> ResumePoint | None:
    """The checkpoint to resume from (`auto`: the newest complete one in `out`; None when there is none), or
    a one-line UserError. Nothing in `out` is changed here."""
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint != "auto":
        path = Path(cfg.resume_from_checkpoint).expanduser()
        problem = checkpoint_problem(path) if path.is_dir() else "not a directory"
        if problem is None:
            return ResumePoint(path, _step(path))
        hint = "give a complete checkpoint-N directory or `auto` (the newest complete one)"
        raise UserError(f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} cannot be resumed: {problem}; "
                        f"{hint}")
    finished = finished_step(out)
    if finished is not None:
        result = rundir.recovery_result(out)
        saved = f"its result {result.path.name}/ saved" if result is not None else \
            "its result is no longer in the directory"
        raise UserError(
            f"{out} holds a finished run (step {finished}, {saved}); `--resume_from_checkpoint auto` never "
            f"restarts a finished run: to train again add --overwrite (replaces it) or choose another --out"
        )
    skipped = []
    if (out / CHECKPOINT_STAGING).exists():
        skipped.append(f"{out / CHECKPOINT_STAGING}: a checkpoint whose save was interrupted")
    damaged = []
    for _, path in checkpoints(out):
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumePoint(path, _step(path), tuple(skipped + damaged))
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise UserError(f"no complete checkpoint to resume from in {out} ({'; '.join(skipped + damaged)}); "
                        "add --overwrite to start the run over")
    return None  # at most a save that never completed: nothing to resume, the run starts over


def finished_step(out: Path) -> int | None:
    """The last step of a finished run, as its records say: its last session ended with a `summary` (written
    after the result was saved). A property of the records, not of the result directory: a finished run whose
    result was deleted is still finished, and never trained again by `auto`."""
    path = out / METRICS
    if not path.is_file():
        return None
    endings = [r for r in read_jsonl(path) if r.get("event") in ENDING_EVENTS or r.get("event") == "resume"]
    if endings and endings[-1].get("event") == "summary":
        return int(endings[-1].get("step") or 0)
    return None


def drop_superseded(out: Path, resume_step: int, write: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Drop the records of the interrupted session after the checkpoint it resumes from: the resumed run writes
    them again, so a reader sees one history. Returns (kept records, dropped count); `write=False` only reads."""
    path = out / METRICS
    if not path.is_file():
        return [], 0
    records = read_jsonl(path)
    kept = [r for r in records if r.get("event") not in ENDING_EVENTS
            and not (r.get("event") in SUPERSEDED_EVENTS and (r.get("step") or 0) > resume_step)]
    if not write:
        return kept, len(records) - len(kept)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept, len(records) - len(kept)


@dataclass
class PriorRun:
    """What the sessions before this one left that this one carries on with."""

    records: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    """One entry per earlier session, up to the checkpoint resumed from: steps, seconds, loss sum."""

    def best(self, out: Path) -> tuple[float, int, str | None] | None:
        """(eval loss, step, checkpoint or None) of the best finite evaluation so far."""
        evals = [r for r in self.records if r.get("event") == "eval" and to_float(r.get("eval_loss")) is not None]
        if not evals:
            return None
        top = min(evals, key=lambda r: to_float(r["eval_loss"]))
        ckpt = out / f"checkpoint-{top['step']}"
        return to_float(top["eval_loss"]), int(top["step"]), str(ckpt) if ckpt.is_dir() else None

    def evals(self) -> dict[int, dict[str, Any]]:
        """The earlier sessions' evaluations during training, by step (records up to the resumed checkpoint)."""
        return {int(r["step"]): r for r in self.records if r.get("event") == "eval" and r.get("step") is not None}

    def baseline(self) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("event") == "baseline_eval"), None)


def read_sessions(checkpoint: Path) -> list[dict[str, Any]]:
    path = checkpoint / SESSIONS
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return []


def load_prior(out: Path, resume: ResumePoint | None, is_main: bool) -> tuple[PriorRun, int]:
    """The prior run to carry on (empty for a fresh run), and how many superseded records were dropped."""
    if resume is None:
        return PriorRun(), 0
    # Every rank needs the same history (under FSDP each evaluation is collective: all evaluate, or none);
    # the main process alone rewrites the file.
    records, dropped = drop_superseded(out, resume.step, write=is_main)
    return PriorRun(records, read_sessions(resume.path)), dropped
