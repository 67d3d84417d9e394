"""Which reader a path needs: for a file, the registered reader most sure it is its format; for a run directory,
its richest source with usable records. The settings files beside a log (run_config.json, adapter_config.json,
training_args.yaml, all_results.json) are read the same way for every format."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.analysis.sources import registry
from prunetune.analysis.sources.base import LogReader, Peek, Source, clean_record, clean_value
from prunetune.configfile import read_mapping
from prunetune.errors import UserError

# settings files a run directory may hold beside its log, most trusted first (training_args.bin is a pickle:
# never loaded)
SETTINGS_FILES = ("run_config.json", "training_args.yaml", "training_args.json", "adapter_config.json")


def _readers(kind: str | None) -> list[LogReader]:
    return [r for r in registry.READERS if kind is None or r.kind == kind]


def detect(path: Path, kind: str | None = None) -> LogReader | None:
    """The registered reader most sure `path` is its format (first registered wins a tie), or None."""
    peek = Peek.of(path)
    if peek.binary:
        raise UserError(f"{path} is a binary file: no training records found in it; pass the run's metrics.jsonl, "
                        "trainer_log.jsonl, trainer_state.json or console log")
    scored = [(reader.detect(peek), -i, reader) for i, reader in enumerate(_readers(kind))]
    best = max(scored, key=lambda s: s[:2], default=None)
    return best[2] if best is not None and best[0] > 0 else None


def candidate_files(path: Path, kind: str | None = None) -> list[tuple[LogReader, Path]]:
    """(reader, file) a directory offers, richest first: each reader's files in registry order, each file read
    by the reader most sure of it."""
    found: list[tuple[LogReader, Path]] = []
    seen: set[Path] = set()
    for reader in _readers(kind):
        for file in reader.in_directory(path):
            if file in seen or not file.is_file():
                continue
            seen.add(file)
            best = detect(file, kind)
            if best is not None:
                found.append((best, file))
    return found


def _dir_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Add the files beside the log: all_results.json, and the settings files (after the log's own, which
    describe this very run: a dump in the log beats a config file that may have been edited since)."""
    notes = meta.setdefault("notes", [])
    settings = list(meta.get("settings") or [])
    for name in ("all_results.json", *SETTINGS_FILES):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            value = read_mapping(path, name)  # bounded: huge files and YAML alias bombs are refused
        except UserError as err:
            notes.append(f"{name} ignored: {err}")
            continue
        if name == "all_results.json":
            meta["all_results"] = dict(value)
            continue
        if name == "run_config.json":
            meta["run_config"] = dict(value)
            settings.insert(0, (name, dict(value)))  # prunetune's own record of the run: exact
        else:
            settings.append((name, dict(value)))
    meta["settings"] = settings


def _usable(records: Iterable[Mapping[str, Any]]) -> bool:
    return any(r.get("event") in ("log", "eval", "error", "final_eval", "train_end", "stopped") for r in records)


def _finish(src: Source, run_dir: Path) -> Source:
    src.records = [clean_record(r) for r in src.records]
    src.meta.setdefault("notes", [])
    _dir_meta(run_dir, src.meta)
    src.meta["settings"] = [(origin, clean_value(dict(fields))) for origin, fields in src.meta["settings"]]
    return src


def load_file(path: Path, kind: str | None = None) -> Source:
    """Records of one file, read by the reader that detects it (among those of `kind`, when given)."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass it as the run directory, not as a file of kind {kind}")
    reader = detect(path, kind)
    if reader is None:
        known = "; ".join(r.describes for r in _readers(kind))
        raise UserError(f"{path}: no training records found: not a log format prunetune reads ({known}); pass the "
                        "console log, trainer_state.json or metrics.jsonl of a training run")
    return reader.read(path)


def load_source(source: str | Path, prefer: str | None = None) -> Source:
    """Records of SOURCE: a run directory or one log file of a registered format.

    In a directory the richest source with usable records wins (registry order: metrics.jsonl >
    trainer_state.json > trainer_log.jsonl > console logs); `prefer` (a `--source-kind`) picks one family.
    """
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory, metrics.jsonl, trainer_state.json or a log file")
    kinds = registry.source_kinds()
    if prefer is not None and prefer not in kinds:
        raise UserError(f"unknown source kind {prefer!r}; choose one of {', '.join(kinds)}")
    if path.is_file():
        src = load_file(path, prefer)
        if not _usable(src.records):
            raise UserError(
                f"{path}: no training records found (no Trainer log dicts like {{'loss': ...}}, no log_history, no "
                "metrics records); pass the console log, trainer_state.json or metrics.jsonl of a training run"
            )
        return _finish(src, path.parent)
    tried: list[str] = []
    for reader, file in candidate_files(path, prefer):
        src = reader.read(file)
        if _usable(src.records):
            return _finish(src, path)
        tried.append(file.name)
    what = f" (tried {', '.join(tried)})" if tried else ""
    raise UserError(
        f"{path}: no usable training records{what}; the directory needs metrics.jsonl, trainer_state.json or a "
        "console log (train.log / *.log) of a training run"
    )


def formats() -> Sequence[str]:
    """The names of the registered formats, for messages and documentation."""
    return [r.name for r in registry.READERS]
