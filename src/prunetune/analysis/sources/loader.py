"""Which reader a path needs: a run directory (its richest source), a metrics.jsonl, a trainer_state.json or a
console log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import SOURCE_KINDS, Source
from prunetune.analysis.sources.jsonl import read_jsonl, read_log_bytes
from prunetune.analysis.sources.llamafactory import is_trainer_log, records_from_trainer_log
from prunetune.analysis.sources.trainer_console import OOM, parse_console_log
from prunetune.analysis.sources.trainer_state import records_from_trainer_state
from prunetune.errors import UserError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable (chmod +r) or copy it") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} as JSON ({err}); pass a trainer_state.json, metrics.jsonl or a log") from err


def _latest_checkpoint_state(run_dir: Path) -> Path | None:
    states = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1,
    )
    return states[-1] if states else None


def _dir_meta(run_dir: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """run_config.json / all_results.json beside the log, and the reader's notes so far."""
    meta: dict[str, Any] = {"notes": list(notes or [])}
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
    if (path / "trainer_log.jsonl").is_file():
        found.append(("trainer_log_jsonl", path / "trainer_log.jsonl"))
    for name in ("train.log", "console.log"):
        if (path / name).is_file():
            found.append(("console_log", path / name))
    found.extend(("console_log", p) for p in sorted(path.glob("*.log")) if p.name not in ("train.log", "console.log"))
    found.extend(("console_log", p) for p in sorted(path.glob("*.txt")))
    return found


def _jsonl_source(path: Path, kind: str | None) -> Source:
    entries, skipped = read_jsonl(path)
    notes = [f"{skipped} unreadable line(s) skipped"] if skipped else []
    if kind == "trainer_log_jsonl" or (kind is None and is_trainer_log(entries)):
        records, meta = records_from_trainer_log(entries)
        return Source("trainer_log_jsonl", path, records, {**meta, "flavour": "trainer", "notes": notes})
    if entries and not any("event" in e for e in entries[:20]) and not is_trainer_log(entries):
        raise UserError(f"{path} is JSONL but neither a prunetune metrics.jsonl (records with `event`) nor a "
                        "LLaMA-Factory trainer_log.jsonl (`current_steps`); pass the run's log")
    return Source("metrics_jsonl", path, entries, {"flavour": "prunetune", "step_source": "metrics",
                                                   "notes": notes})


def _own_console(path: Path) -> Path | None:
    """The metrics.jsonl a prunetune train.log was rendered from (the one source of truth), if beside it: a
    train.log with no Trainer log dict in it, next to a metrics.jsonl."""
    metrics = path.parent / "metrics.jsonl"
    if path.name != "train.log" or not metrics.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None if re.search(r"""\{\s*['"](?:eval_)?loss['"]\s*:""", text) else metrics


def load_file(path: Path, kind: str | None = None) -> Source:
    """Records of one file; kind guessed from its name and content when not given."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass it as the run directory, not as a file of kind {kind}")
    if kind is None:
        if path.suffix == ".jsonl":
            return _jsonl_source(path, None)
        kind = "trainer_state" if path.suffix == ".json" else "console_log"
    if kind in ("metrics_jsonl", "trainer_log_jsonl"):
        return _jsonl_source(path, kind)
    if kind == "trainer_state":
        state = _read_json(path)
        if not isinstance(state, dict):
            raise UserError(f"{path} is not a trainer_state.json (a JSON object with `log_history`)")
        meta = {k: state[k] for k in ("max_steps", "best_metric", "best_model_checkpoint", "best_global_step",
                                      "logging_steps", "eval_steps", "train_batch_size") if k in state}
        meta["flavour"] = "trainer"
        return Source(kind, path, records_from_trainer_state(state), meta)
    if (metrics := _own_console(path)) is not None:
        src = _jsonl_source(metrics, "metrics_jsonl")
        src.meta["notes"].append(f"read {metrics.name}, the record {path.name} is rendered from")
        return src
    raw = read_log_bytes(path)
    records, meta = parse_console_log(raw.decode("utf-8", errors="replace"))
    meta["flavour"] = "trainer"
    return Source("console_log", path, records, meta)


def _usable(records: Iterable[Mapping[str, Any]]) -> bool:
    return any(r.get("event") in ("log", "eval", "error", "final_eval", "train_end", "stopped") for r in records)


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
        src.meta.update(_dir_meta(path.parent, src.meta.get("notes")))
        return src
    candidates = candidate_files(path)
    if prefer is not None:
        candidates = [c for c in candidates if c[0] == prefer]
    tried = []
    for kind, file in candidates:
        src = load_file(file, kind)
        if _usable(src.records):
            src.meta.update(_dir_meta(path, src.meta.get("notes")))
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
