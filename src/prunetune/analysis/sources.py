"""Turn whatever a user has into `prunetune.records` dicts: a prunetune run directory (`metrics.jsonl`), a
Transformers `trainer_state.json` (its `log_history`), or the raw console log of any Trainer run.

Console logs are the hard case. The Trainer prints each log as a Python dict repr (`{'loss': 3.4521, ...}`;
Transformers 5 prints the numbers as strings, `{'loss': '3.452', ...}`), between tqdm bar redraws separated by
`\\r`, sometimes wrapped across lines by a terminal or a logger, with bare `nan`/`inf` that no literal parser
accepts. The dicts carry no step: it is read from the training bar (`12/60 [`) that tqdm redraws right after
each `tqdm.write`, and estimated from the epoch when there is no bar. Unknown lines are skipped.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune.errors import UserError
from prunetune.records import iter_jsonl, to_float

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# tqdm: " 17%|█▋        | 10/60 [00:00<00:01, 46.90it/s]" (the rate may be "s/it" or "?it/s")
_BAR = re.compile(
    r"(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)(?:<(?P<remaining>[\d:?]+))?"
    r"(?:,\s*(?P<rate>[\d.?]+)(?P<unit>it/s|s/it))?"
)
_BARE_NONFINITE = re.compile(r"([:,\[(]\s*)(-?(?:nan|NaN|inf|Infinity))(?=\s*[,}\])])")
_TENSOR = re.compile(r"tensor\(\s*([^(),]+?)\s*(?:,[^()]*)?\)")
_OOM = re.compile(
    r"(OutOfMemoryError|CUDA out of memory|MPS backend out of memory|DefaultCPUAllocator: can't allocate memory"
    r"|^\s*MemoryError\b)"
)
_METRICS_HEADER = re.compile(r"\*{3,}\s*(\w+) metrics\s*\*{3,}")
_METRIC_LINE = re.compile(r"^\s+(\w+)\s*=\s*(\S+)\s*$")
_TOTAL_STEPS = re.compile(r"Total optimization steps = ([\d,]+)")
# Jupyter's NotebookProgressCallback table, as copied out of a notebook: "Step  Training Loss  Validation Loss"
_TABLE_HEADER = re.compile(r"\b(Step|Epoch)\b.*\bTraining Loss\b")
_TABLE_SPLIT = re.compile(r"\t+|\s{2,}|\s*\|\s*")
TABLE_COLUMNS = {"Step": "step", "Epoch": "epoch", "Training Loss": "loss", "Validation Loss": "eval_loss"}

LOG_KEYS = {"learning_rate": "lr"}
SOURCE_KINDS = ("metrics_jsonl", "trainer_state", "console_log")


@dataclass
class Source:
    """Records read from one source, and where they came from."""

    kind: str
    """One of SOURCE_KINDS."""
    path: Path
    """The file the records were read from."""
    records: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra facts: run_config, all_results, max_steps, step_source (`bar`, `table`, `epoch`, `ordinal`), notes."""

    @property
    def run_dir(self) -> Path:
        return self.path.parent


# ---------------------------------------------------------------------------------------------------------
# Trainer dicts -> records (shared by trainer_state.json and console logs)


def _num(value: Any) -> float | str | None:
    """A number as float; NaN/Inf kept as the strings the records schema uses; None if not a number."""
    f = to_float(value)
    if f is None:
        return None
    return f if math.isfinite(f) else str(f)


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


# ---------------------------------------------------------------------------------------------------------
# Console logs


def parse_python_dict(text: str) -> dict[str, Any] | None:
    """A dict printed by Python (or JSON), tolerating bare nan/inf and tensor(...) values; None if not a dict."""
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    cleaned = _TENSOR.sub(r"\1", text)
    cleaned = _BARE_NONFINITE.sub(r"\1'\2'", cleaned)
    try:
        value = ast.literal_eval(cleaned)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _brace_delta(text: str, depth: int, quote: str | None) -> tuple[int, str | None, int]:
    """Scan text, tracking dict depth outside quotes; returns (depth, open quote, index where depth hit 0 or -1)."""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return depth, quote, i
    return depth, quote, -1


@dataclass
class _Event:
    kind: str  # bar | dict | oom | block
    pos: int
    data: Any


def _console_events(text: str, max_dict_lines: int = 40) -> list[_Event]:
    lines = re.split(r"\r\n|\r|\n", _ANSI.sub("", text))
    events: list[_Event] = []
    i = 0
    block: tuple[str, dict[str, Any]] | None = None
    while i < len(lines):
        line = lines[i]
        for m in _BAR.finditer(line):
            events.append(_Event("bar", i, m.groupdict()))
        if _OOM.search(line):
            events.append(_Event("oom", i, line.strip()))
        if (total := _TOTAL_STEPS.search(line)) is not None:
            events.append(_Event("total", i, int(total.group(1).replace(",", ""))))
        if _TABLE_HEADER.search(line):
            columns = [c for c in _TABLE_SPLIT.split(line.strip()) if c]
            i += 1
            while i < len(lines):
                cells = [c for c in _TABLE_SPLIT.split(lines[i].strip()) if c]
                if len(cells) != len(columns) or to_float(cells[0]) is None:
                    break
                events.append(_Event("row", i, dict(zip(columns, cells, strict=True))))
                i += 1
            continue
        header = _METRICS_HEADER.search(line)
        if header:
            block = (header.group(1), {})
            events.append(_Event("block", i, block))
            i += 1
            continue
        if block is not None:
            m = _METRIC_LINE.match(line)
            if m:
                block[1][m.group(1)] = m.group(2)
                i += 1
                continue
            block = None
        start = line.find("{")
        if start >= 0:
            parsed, consumed = _read_dict(lines, i, start, max_dict_lines)
            if parsed is not None:
                events.append(_Event("dict", i, parsed))
                i += consumed
                continue
        i += 1
    return events


def _read_dict(lines: list[str], i: int, start: int, max_lines: int) -> tuple[dict[str, Any] | None, int]:
    """The dict starting at lines[i][start:], joined across wrapped lines; (dict, lines consumed)."""
    parts: list[str] = []
    depth, quote = 0, None
    for k in range(i, min(len(lines), i + max_lines)):
        chunk = lines[k][start:] if k == i else lines[k]
        if k > i and _BAR.search(chunk) and "{" not in chunk and "}" not in chunk:
            continue  # a progress bar redrawn inside a wrapped dict
        depth, quote, end = _brace_delta(chunk, depth, quote)
        if end >= 0:
            parts.append(chunk[: end + 1])
            # a wrapped line may have been broken inside a token; join without and with a space
            for joiner in ("", " "):
                parsed = parse_python_dict(joiner.join(parts))
                if parsed is not None:
                    return parsed, k - i + 1
            return None, 1
        parts.append(chunk)
        if depth <= 0:
            return None, 1
    return None, 1


def _train_bar_total(bars: list[_Event]) -> str | None:
    """The training bar's total: the bar whose count goes back least often (eval bars restart at every
    evaluation; the training bar only at a resume), the first to appear on a tie."""
    seen: dict[str, list[int]] = {}
    for ev in bars:
        seen.setdefault(ev.data["total"], []).append(int(ev.data["n"]))
    if not seen:
        return None
    drops = {t: sum(1 for a, b in zip(ns, ns[1:], strict=False) if b < a) for t, ns in seen.items()}
    order = list(seen)
    return min(order, key=lambda t: (drops[t], order.index(t)))


def _drop_superseded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A resumed run logs again from its checkpoint's step: the later lines replace the earlier ones."""
    out: list[dict[str, Any]] = []
    top = -1
    for rec in records:
        step = rec.get("step")
        if rec["event"] == "log" and isinstance(step, int):
            if step < top:
                out = [r for r in out if not (isinstance(r.get("step"), int) and r["step"] >= step
                                              and r["event"] in ("log", "eval"))]
            top = step
        out.append(rec)
    return out


def _seconds(clock: str | None) -> float | None:
    if not clock or "?" in clock:
        return None
    parts = [int(p) for p in clock.split(":") if p.isdigit()]
    value = 0
    for p in parts:
        value = value * 60 + p
    return float(value)


# `prunetune finetune`'s own console (prunetune.finetune.console), as kept in train.log
_PT_STEP = re.compile(r"^Step (\d+)/(\d+)\b.*?\| Loss: ([^\s|]+)(.*)$")
_PT_FIELDS = {
    "lr": re.compile(r"\| LR: ([^\s|]+)"),
    "grad_norm": re.compile(r"\| Grad norm: ([^\s|]+)"),
    "elapsed": re.compile(r"\| Elapsed ([\d:]+)"),
    "eta_s": re.compile(r"\| ETA ([\d:]+)"),
    "tokens_per_s": re.compile(r"\| ([\d.]+) tok/s"),
}
_PT_EVAL_HEADER = re.compile(r"^--- Evaluation at step (\d+)(?: \(epoch ([^)]+)\))? ---")
_PT_EVAL_LINE = re.compile(r"^\s+eval loss: ([^\s|]+)")
_PT_PPL = re.compile(r"perplexity: ([^\s|]+)")
_PT_RUNTIME = re.compile(r"runtime ([\d.]+)s")
_PT_DONE = re.compile(r"^Training completed in ([\d:]+) \((\d+) steps")
_PT_BASELINE = re.compile(r"^Pruned model before training.*?: eval loss ([^\s|]+) \| perplexity ([^\s|]+)")
_PT_IMPROVED = re.compile(r"Improved from (\S+) → (\S+?),")
_PT_ALERT = re.compile(r"^(?:❌|⚠️?) ALERT \[(\w+)\] at step (\S+): (.*)$")
_PT_OOM = re.compile(r"^❌ .*\bout of memory\b", re.IGNORECASE)


def parse_prunetune_console(text: str) -> list[dict[str, Any]] | None:
    """Records from a `prunetune finetune` train.log; None when the text is not one."""
    lines = re.split(r"\r\n|\r|\n", _ANSI.sub("", text))
    if not any(_PT_STEP.match(line) for line in lines):
        return None
    records: list[dict[str, Any]] = []
    last_step: int | None = None
    eval_step: tuple[int, Any] | None = None
    final = False
    for i, line in enumerate(lines):
        if m := _PT_STEP.match(line):
            last_step = int(m.group(1))
            rec: dict[str, Any] = {"event": "log", "step": last_step, "max_steps": int(m.group(2)),
                                   "loss": _num(m.group(3))}
            for key, rx in _PT_FIELDS.items():
                if f := rx.search(m.group(4)):
                    rec[key] = _seconds(f.group(1)) if key in ("elapsed", "eta_s") else _num(f.group(1))
            records.append({k: v for k, v in rec.items() if v is not None})
        elif m := _PT_EVAL_HEADER.match(line):
            eval_step = (int(m.group(1)), _num(m.group(2)))
        elif (m := _PT_EVAL_LINE.match(line)) and (eval_step is not None or final):
            ppl = _PT_PPL.search(line)
            runtime = _PT_RUNTIME.search(line)
            rec = {"event": "final_eval" if final else "eval",
                   "step": last_step if final else eval_step[0], "eval_loss": _num(m.group(1))}
            if ppl:
                rec["perplexity"] = _num(ppl.group(1))
            if runtime:
                rec["eval_runtime"] = _num(runtime.group(1))
            if not final and eval_step[1] is not None:
                rec["epoch"] = eval_step[1]
            records.append(rec)
            eval_step = None
        elif line.strip() == "Final evaluation":
            final = True
        elif (m := _PT_IMPROVED.search(line)) and records and records[-1]["event"] == "final_eval":
            records[-1]["pruned_perplexity"] = _num(m.group(1))
        elif m := _PT_BASELINE.match(line):
            records.append({"event": "baseline_eval", "step": 0, "eval_loss": _num(m.group(1)),
                            "pruned_perplexity": _num(m.group(2))})
        elif m := _PT_DONE.match(line):
            records.append({"event": "train_end", "step": int(m.group(2)), "train_runtime": _seconds(m.group(1))})
        elif m := _PT_ALERT.match(line):
            rec = {"event": "alert", "step": int(m.group(2)) if m.group(2).isdigit() else None,
                   "kind": m.group(1), "message": m.group(3)}
            for follow in lines[i + 1 : i + 3]:
                if follow.strip().startswith("fix:"):
                    rec["fix"] = follow.strip()[4:].strip()
            records.append(rec)
        elif _PT_OOM.match(line):
            records.append({"event": "error", "step": last_step, "kind": "out_of_memory",
                            "message": line.strip("❌ ").strip()})
    return records


def parse_console_log(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records from a raw Trainer console log (or a prunetune train.log), and meta (max_steps, step_source)."""
    own = parse_prunetune_console(text)
    if own is not None:
        max_steps = next((r["max_steps"] for r in reversed(own) if r.get("max_steps")), None)
        return own, {"step_source": "prunetune", "max_steps": max_steps}
    events = _console_events(text)
    bars = [e for e in events if e.kind == "bar"]
    total = _train_bar_total(bars)
    train_bars = [e for e in bars if e.data["total"] == total]
    meta: dict[str, Any] = {}
    if total is not None:
        meta["max_steps"] = int(total)
    else:
        announced = [e.data for e in events if e.kind == "total"]
        if announced:
            meta["max_steps"] = announced[-1]
    fixed: set[int] = set()  # ids of records whose step the log states (notebook table rows)

    records: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # records waiting for the next bar redraw to learn their step
    last_bar: dict[str, Any] | None = None
    bar_iter = iter(sorted(train_bars, key=lambda e: e.pos))
    next_bar = next(bar_iter, None)
    for ev in events:
        while next_bar is not None and next_bar.pos <= ev.pos and (ev.kind != "dict" or next_bar.pos < ev.pos):
            last_bar = next_bar.data
            for rec in pending:
                rec["step"] = int(last_bar["n"])
                _bar_extras(rec, last_bar)
            pending = []
            next_bar = next(bar_iter, None)
        if ev.kind == "dict":
            rec = record_from_trainer_dict(ev.data, None)
            if rec is None:
                continue
            records.append(rec)
            pending.append(rec)
        elif ev.kind == "oom":
            if not any(r["event"] == "error" for r in records):
                rec = {"event": "error", "step": None, "kind": "out_of_memory", "message": ev.data}
                records.append(rec)
                pending.append(rec)
        elif ev.kind == "row":
            for rec in _records_from_row(ev.data):
                records.append(rec)
                if rec["step"] is not None:
                    fixed.add(id(rec))
        elif ev.kind == "block":
            name, values = ev.data
            if name == "eval" and "eval_loss" in values:
                rec = record_from_trainer_dict(values, None) or {}
                rec["event"] = "final_eval"
                records.append(rec)
                pending.append(rec)
    for rec in pending:  # nothing redrawn after them: the last bar is the best estimate
        rec["step"] = int(last_bar["n"]) if last_bar else None
        if last_bar:
            _bar_extras(rec, last_bar)

    if train_bars:
        kept = _drop_superseded(records)
        if len(kept) < len(records):
            meta["superseded"] = len(records) - len(kept)
            records = kept
    meta["step_source"] = "bar" if train_bars else "table"
    if not _steps_monotonic(records) or (not train_bars and len(fixed) < len(records)):
        meta["step_source"] = _steps_from_epochs(records, meta, fixed)
    if meta.get("max_steps"):
        for rec in records:
            if rec["event"] == "log":
                rec.setdefault("max_steps", meta["max_steps"])
    return records, meta


def _records_from_row(row: Mapping[str, str]) -> list[dict[str, Any]]:
    values = {TABLE_COLUMNS[k]: _num(v) for k, v in row.items() if k in TABLE_COLUMNS}
    step = values.get("step")
    step = int(step) if isinstance(step, float) else None
    extra = {"epoch": values["epoch"]} if values.get("epoch") is not None else {}
    out = []
    if values.get("loss") is not None:
        out.append({"event": "log", "step": step, "loss": values["loss"], **extra})
    if values.get("eval_loss") is not None:
        rec = record_from_trainer_dict({"eval_loss": values["eval_loss"], **extra}, step)
        if rec is not None:
            out.append(rec)
    return out


def _bar_extras(rec: dict[str, Any], bar: Mapping[str, Any]) -> None:
    if rec["event"] != "log":
        return
    elapsed = _seconds(bar.get("elapsed"))
    if elapsed is not None:
        rec.setdefault("elapsed", elapsed)
    remaining = _seconds(bar.get("remaining"))
    if remaining is not None:
        rec.setdefault("eta_s", remaining)
    rate = to_float(bar.get("rate"))
    if rate:
        rec.setdefault("steps_per_s", rate if bar.get("unit") == "it/s" else 1.0 / rate)


def _steps_monotonic(records: list[dict[str, Any]]) -> bool:
    """Bar-read steps are trusted when they never go back and no two train logs share a step (a buffered
    stdout prints all dicts after the last bar, so they would all read the final step)."""
    steps = [r["step"] for r in records if r["event"] in ("log", "eval")]
    log_steps = [r["step"] for r in records if r["event"] == "log"]
    return (
        all(s is not None for s in steps)
        and all(b >= a for a, b in zip(steps, steps[1:], strict=False))
        and len(set(log_steps)) == len(log_steps)
    )


def _steps_from_epochs(records: list[dict[str, Any]], meta: dict[str, Any], fixed: set[int]) -> str:
    """Steps when the bar is missing or out of order (stdout buffered apart from stderr): epoch x steps per
    epoch when the total step count is known, else the log ordinal."""
    end = next((r for r in records if r["event"] == "train_end"), None)
    max_steps = meta.get("max_steps")
    if max_steps is None and end is not None:
        runtime, rate = to_float(end.get("train_runtime")), to_float(end.get("train_steps_per_second"))
        if runtime and rate:
            max_steps = round(runtime * rate)
    epochs = [to_float(r.get("epoch")) for r in records if r["event"] == "log"]
    final_epoch = to_float(end.get("epoch")) if end else (max((e for e in epochs if e), default=None))
    use_epoch = bool(max_steps and final_epoch and all(e is not None for e in epochs))
    ordinal = 0
    for rec in records:
        if id(rec) in fixed:
            continue
        if use_epoch and to_float(rec.get("epoch")) is not None:
            rec["step"] = max(1, round(to_float(rec["epoch"]) / final_epoch * max_steps))
        elif rec["event"] == "log":
            ordinal += 1
            rec["step"] = ordinal
        else:
            rec["step"] = ordinal
    return "epoch" if use_epoch else "ordinal"


# ---------------------------------------------------------------------------------------------------------
# Detection


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
    match = next((line for line in text.splitlines() if _OOM.search(line)), None)
    if match:
        steps = [r.get("step") for r in src.records if isinstance(r.get("step"), int)]
        src.records.append({"event": "error", "step": max(steps) if steps else None, "kind": "out_of_memory",
                            "message": match.strip()})
