"""Which reader a path needs: a run directory (its richest source), a metrics.jsonl, a trainer_state.json or a
console log."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import SOURCE_KINDS, Source
from prunetune.analysis.sources.trainer_console import OOM, parse_console_log
from prunetune.analysis.sources.trainer_state import records_from_trainer_state
from prunetune.errors import UserError
from prunetune.records import iter_jsonl


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as JSON ({err}); pass a trainer_state.json, metrics.jsonl or a log") from err


def _latest_checkpoint_state(run_dir: Path) -> Path | None:
    states = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
    )
    return states[-1] if states else None


def _dir_meta(run_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name in ("run_config.json", "all_results.json"):
        path = run_dir / name
        if path.is_file():
            try:
                meta[name.removesuffix(".json")] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                meta.setdefault("notes", []).append(f"{name} unreadable, ignored")
    return meta


def candidate_files(path: Path) -> list[tuple[str, Path]]:
    """(kind, file) a directory offers, best first."""
    found: list[tuple[str, Path]] = []
    if (path / "metrics.jsonl").is_file():
        found.append(("metrics_jsonl", path / "metrics.jsonl"))
    state = path / "trainer_state.json"
    if state.is_file():
        found.append(("trainer_state", state))
    elif (ckpt := _latest_checkpoint_state(path)) is not None:
        found.append(("trainer_state", ckpt))
    for name in ("train.log", "console.log"):
        if (path / name).is_file():
            found.append(("console_log", path / name))
    found.extend(("console_log", p) for p in sorted(path.glob("*.log")) if p.name not in ("train.log", "console.log"))
    found.extend(("console_log", p) for p in sorted(path.glob("*.txt")))
    return found


def load_file(path: Path, kind: str | None = None) -> Source:
    """Records of one file; kind guessed from its name and content when not given."""
    if kind is None:
        if path.suffix == ".jsonl":
            kind = "metrics_jsonl"
        elif path.suffix == ".json":
            kind = "trainer_state"
        else:
            kind = "console_log"
    if kind == "metrics_jsonl":
        return Source(kind, path, list(iter_jsonl(path)))
    if kind == "trainer_state":
        state = _read_json(path)
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a trainer_state.json (a JSON object with `log_history`)")
        meta = {k: state[k] for k in ("max_steps", "best_metric", "best_model_checkpoint", "best_global_step",
                                      "logging_steps", "eval_steps", "train_batch_size") if k in state}
        return Source(kind, path, records_from_trainer_state(state), meta)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from err
    records, meta = parse_console_log(text)
    return Source("console_log", path, records, meta)


def _usable(records: Iterable[Mapping[str, Any]]) -> bool:
    return any(r.get("event") in ("log", "eval", "error", "final_eval") for r in records)


def load_source(source: str | Path, prefer: str | None = None) -> Source:
    """Records of SOURCE: a run directory, a metrics.jsonl, a trainer_state.json or a console log.

    In a directory the richest source with usable records wins (metrics.jsonl > trainer_state.json >
    train.log); `prefer` (a SOURCE_KINDS value) picks one explicitly.
    """
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory, metrics.jsonl, trainer_state.json or a log file")
    if prefer is not None and prefer not in SOURCE_KINDS:
        raise UserError(f"unknown source kind {prefer!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if path.is_file():
        src = load_file(path, prefer)
        if not _usable(src.records):
            raise UserError(
                f"{path}: no training records found (no Trainer log dicts like {{'loss': ...}}, no log_history, no "
                "metrics records); pass the console log, trainer_state.json or metrics.jsonl of a training run"
            )
        src.meta.update(_dir_meta(path.parent))
        return src
    candidates = candidate_files(path)
    if prefer is not None:
        candidates = [c for c in candidates if c[0] == prefer]
    tried = []
    for kind, file in candidates:
        src = load_file(file, kind)
        if _usable(src.records):
            src.meta.update(_dir_meta(path))
            if kind == "metrics_jsonl":
                _merge_console_oom(src, path)
            return src
        tried.append(file.name)
    what = f" (tried {', '.join(tried)})" if tried else ""
    raise UserError(
        f"{path}: no usable training records{what}; the directory needs metrics.jsonl, trainer_state.json or a "
        "console log (train.log / *.log) of a training run"
    )


def _merge_console_oom(src: Source, run_dir: Path) -> None:
    """A crash kills the writer before it can record the error; the console log still shows the traceback."""
    if any(r.get("event") == "error" for r in src.records):
        return
    log = run_dir / "train.log"
    if not log.is_file():
        return
    text = log.read_text(encoding="utf-8", errors="replace")
    match = next((line for line in text.splitlines() if OOM.search(line)), None)
    if match:
        steps = [r.get("step") for r in src.records if isinstance(r.get("step"), int)]
        src.records.append({"event": "error", "step": max(steps) if steps else None, "kind": "out_of_memory",
                            "message": match.strip()})
