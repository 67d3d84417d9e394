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
from prunetune.fmt import to_float

# settings files a run directory may hold beside its log, most trusted first (training_args.bin is a pickle:
# never loaded)
SETTINGS_FILES = ("run_config.json", "training_args.yaml", "training_args.json", "adapter_config.json")


def _readers(kind: str | None) -> list[LogReader]:
    return [r for r in registry.READERS if kind is None or r.kind == kind]


def ranked(path: Path, kind: str | None = None) -> list[LogReader]:
    """The registered readers that recognise `path`, most sure first (registry order on a tie)."""
    peek = Peek.of(path)
    if peek.binary:
        raise UserError(f"{path} is a binary file: no training records found in it; pass the run's metrics.jsonl, "
                        "trainer_log.jsonl, trainer_state.json or console log")
    scored = [(reader.detect(peek), -i, reader) for i, reader in enumerate(_readers(kind))]
    return [reader for score, _, reader in sorted(scored, key=lambda s: s[:2], reverse=True) if score > 0]


def detect(path: Path, kind: str | None = None) -> LogReader | None:
    """The registered reader most sure `path` is its format, or None."""
    readers = ranked(path, kind)
    return readers[0] if readers else None


def candidate_files(path: Path, kind: str | None = None) -> list[Path]:
    """The files a directory offers, richest first: each reader's files in registry order."""
    found: list[Path] = []
    for reader in _readers(kind):
        found += [f for f in reader.in_directory(path) if f not in found and f.is_file()]
    return found


def settings_beside(run_dir: Path, notes: list[str] | None = None) -> tuple[list[tuple[str, dict[str, Any]]],
                                                                           dict[str, Any] | None]:
    """([(file name, settings)] of the settings files in `run_dir`, most trusted first; all_results.json or
    None). Unreadable ones are skipped with a note."""
    settings: list[tuple[str, dict[str, Any]]] = []
    results = None
    for name in ("all_results.json", *SETTINGS_FILES):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            value = read_mapping(path, name)  # bounded: huge files and YAML alias bombs are refused
        except UserError as err:
            if notes is not None:
                notes.append(f"{name} ignored: {err}")
            continue
        if name == "all_results.json":
            results = dict(value)
        else:
            settings.append((name, dict(value)))
    return settings, results


def _dir_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    """Add the files beside the log: all_results.json, and the settings files (after the log's own, which
    describe this very run: a dump in the log beats a config file that may have been edited since), except
    prunetune's run_config.json, its exact record of the run, which goes first."""
    notes = meta.setdefault("notes", [])
    beside, results = settings_beside(run_dir, notes)
    if results is not None:
        meta["all_results"] = results
    ours = [(o, f) for o, f in beside if o == "run_config.json"]
    if ours:
        meta["run_config"] = ours[0][1]
    meta["settings"] = ours + list(meta.get("settings") or []) + [(o, f) for o, f in beside if o != "run_config.json"]


def _usable(records: Iterable[Mapping[str, Any]]) -> bool:
    return any(r.get("event") in ("log", "eval", "error", "final_eval", "train_end", "stopped") for r in records)


def _final_eval_from_results(records: list[dict[str, Any]], results: Mapping[str, Any] | None) -> None:
    """The end-of-run evaluation all_results.json holds (the example scripts' and LLaMA-Factory's
    `save_metrics`, as the console's `***** eval metrics *****` block), as a final_eval record when the log has
    none of its own and shows the run's end (a stopped run's directory may hold an older run's results)."""
    events = {r.get("event") for r in records}
    loss = to_float((results or {}).get("eval_loss"))
    if loss is None or "final_eval" in events or events & {"stopped", "error"} \
            or not events & {"train_end", "summary"}:
        return
    records.append({"event": "final_eval", "step": None, "eval_loss": loss,
                    "evidence": "all_results.json beside the log"})


def _finish(src: Source, run_dir: Path) -> Source:
    src.records = [clean_record(r) for r in src.records]
    src.meta.setdefault("notes", [])
    _dir_meta(run_dir, src.meta)
    _final_eval_from_results(src.records, src.meta.get("all_results"))
    src.meta["settings"] = [(origin, clean_value(dict(fields))) for origin, fields in src.meta["settings"]]
    return src


def load_file(path: Path, kind: str | None = None) -> Source:
    """Records of one file, read by the readers that recognise it, most sure first: the first that finds a
    curve (log or eval records) wins (a console that only looks like a Trainer's is read by the next format
    that fits); else the first with any end-of-run record."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass it as the run directory, not as a file of kind {kind}")
    readers = ranked(path, kind)
    if not readers:
        known = "; ".join(r.describes for r in _readers(kind))
        raise UserError(f"{path}: no training records found: not a log format prunetune reads ({known}); pass the "
                        "console log, trainer_state.json or metrics.jsonl of a training run")
    fallback = None
    for reader in readers:
        src = reader.read(path)
        if any(r.get("event") in ("log", "eval") for r in src.records):
            return src  # a curve to judge
        if fallback is None or (_usable(src.records) and not _usable(fallback.records)):
            fallback = src  # only end-of-run records (a crash before the first log): kept unless a curve is found
    return fallback


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
    for file in candidate_files(path, prefer):
        if not ranked(file, prefer):
            continue
        src = load_file(file, prefer)
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
