"""The raw console log of a Transformers Trainer run.

The Trainer prints each log as a Python dict repr (`{'loss': 3.4521, ...}`; Transformers 5 prints the numbers
as strings, `{'loss': '3.452', ...}`), between tqdm bar redraws separated by `\\r`, sometimes wrapped across
lines by a terminal or a logger, with bare `nan`/`inf` that no literal parser accepts. The dicts carry no
step: it is read from the training bar (`12/60 [`) that tqdm redraws right after each `tqdm.write`, and
estimated from the epoch when there is no bar. Unknown lines are skipped.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prunetune.analysis.sources import wanda_console
from prunetune.analysis.sources.base import mark_unfinished, split_lines
from prunetune.analysis.sources.base import num as _num
from prunetune.analysis.sources.base import seconds as _seconds
from prunetune.analysis.sources.trainer_state import record_from_trainer_dict, records_from_trainer_dict
from prunetune.rundir.records import to_float

# tqdm: " 17%|█▋        | 10/60 [00:00<00:01, 46.90it/s]" (the rate may be "s/it" or "?it/s")
_BAR = re.compile(
    r"(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)(?:<(?P<remaining>[\d:?]+))?"
    r"(?:,\s*(?P<rate>[\d.?]+)(?P<unit>it/s|s/it))?"
)
_BARE_NONFINITE = re.compile(r"([:,\[(]\s*)(-?(?:nan|NaN|inf|Infinity))(?=\s*[,}\])])")
_TENSOR = re.compile(r"tensor\(\s*([^(),]+?)\s*(?:,[^()]*)?\)")
OOM = re.compile(
    r"(OutOfMemoryError|CUDA out of memory|MPS backend out of memory|DefaultCPUAllocator: can't allocate memory"
    r"|^\s*MemoryError\b)"
)
# Trainer.log_metrics: "***** train metrics *****"; the Wanda fork: "***** Final eval results *****"
_METRICS_HEADER = re.compile(r"\*{3,}\s*(?:(\w+) metrics|Final (eval) results)\s*\*{3,}", re.IGNORECASE)
# "  eval_loss = 2.5733", also behind a logger prefix ("[INFO|trainer.py:123] ... >>", "INFO:__main__:")
_METRIC_LINE = re.compile(r"^(?:\[[^\]]*\][^>]*>>|[A-Z]+:[\w.]+:)?\s+(\w+)\s*=\s*(\S+)\s*$")
_TOTAL_STEPS = re.compile(r"Total optimization steps = ([\d,]+)")
# how a run that did not finish ends its console
_INTERRUPT = re.compile(r"^\s*(?:\^C\s*)?(KeyboardInterrupt)\b|^(Traceback) \(most recent call last\)|\b(KeyboardInterrupt)\b")
# Jupyter's NotebookProgressCallback table, as copied out of a notebook: "Step  Training Loss  Validation Loss"
_TABLE_HEADER = re.compile(r"\b(Step|Epoch)\b.*\bTraining Loss\b")
_TABLE_SPLIT = re.compile(r"\t+|\s{2,}|\s*\|\s*")
TABLE_COLUMNS = {"Step": "step", "Epoch": "epoch", "Training Loss": "loss", "Validation Loss": "eval_loss"}


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


def _console_events(lines: list[str], max_dict_lines: int = 40) -> list[_Event]:
    events: list[_Event] = []
    i = 0
    block: tuple[str, dict[str, Any]] | None = None
    while i < len(lines):
        line = lines[i]
        for m in _BAR.finditer(line):
            events.append(_Event("bar", i, m.groupdict()))
        if OOM.search(line):
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
        if (stop := _INTERRUPT.search(line)) is not None:
            events.append(_Event("interrupt", i, next(g for g in stop.groups() if g)))
        header = _METRICS_HEADER.search(line)
        if header:
            block = ((header.group(1) or header.group(2)).lower(), {})
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


def _block_value(key: str, text: str) -> float | str | None:
    """A `key = value` of a metrics block: numbers, `0:01:23.45` runtimes as seconds, `1234GF` flos as None."""
    if ":" in text and "runtime" in key:
        head, _, frac = text.partition(".")
        whole = _seconds(head)
        return whole + float(f"0.{frac}") if whole is not None and frac.isdigit() else whole
    return _num(text)


def _block_records(name: str, values: Mapping[str, str]) -> list[dict[str, Any]]:
    """Records of an end-of-run metrics block: `train` -> train_end, `eval` -> final_eval (one per eval set)."""
    parsed = {k: v for k, raw in values.items() if (v := _block_value(k, raw)) is not None}
    if name == "train":
        return [{"event": "train_end", "step": None, **parsed}]
    if name == "eval":
        out = []
        for rec in records_from_trainer_dict(parsed, None):
            if rec["event"] == "eval":
                rec["event"] = "final_eval"
                out.append(rec)
        return out
    return []


def _wanda_bars(wanda: list[wanda_console.Event]) -> list[_Event]:
    """The Wanda-fork `Step N/M ... | Loss: x` lines as the run's training bar."""
    return [_Event("bar", e.pos, {"n": str(e.data["n"]), "total": str(e.data["total"]), "loss": e.data["loss"],
                                  "elapsed_s": e.data["elapsed"]}) for e in wanda if e.kind == "step"]


def parse_console_log(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records from a raw Trainer console log (plain, Wanda-fork, notebook table), and meta (max_steps,
    step_source, interrupted, best_checkpoint)."""
    lines = split_lines(text)
    events = _console_events(lines)
    wanda = wanda_console.scan(lines)
    own_bars = _wanda_bars(wanda)
    bars = own_bars or [e for e in events if e.kind == "bar"]
    total = _train_bar_total(bars)
    train_bars = [e for e in bars if e.data["total"] == total]
    meta: dict[str, Any] = {}
    announced = [e.data for e in events if e.kind == "total"]
    if announced:
        meta["max_steps"] = announced[-1]
    elif total is not None:
        meta["max_steps"] = int(total)
    if own_bars:
        meta["format"] = "wanda_console"

    fold = _Fold(meta)
    # a dict on the same line as a bar redraw is printed before it (tqdm.write): it takes that bar's step
    rank = {"dict": 0, "bar": 1}
    stream = sorted([*(e for e in events if e.kind != "bar"), *(e for e in wanda if e.kind != "step"), *train_bars],
                    key=lambda e: (e.pos, rank.get(e.kind, 2)))
    for ev in stream:
        fold.add(ev)
    fold.close()
    records = _settle_steps(fold.records, meta, fold.fixed, bar_steps=bool(train_bars), own_bars=bool(own_bars))
    return records, meta


class _Fold:
    """Console events folded into records in print order: a record takes its step from the next bar redraw."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.records: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # records waiting for the next bar redraw to learn their step
        self.fixed: set[int] = set()  # ids of records whose step the log states (table rows, Wanda lines)
        self.last_bar: dict[str, Any] | None = None

    def add(self, ev: _Event | wanda_console.Event) -> None:
        if isinstance(ev, wanda_console.Event):
            _wanda_event(ev, self.records, self.pending, self.fixed, self.meta, self.final_eval, self.last_bar)
        elif ev.kind == "bar":
            self.last_bar = ev.data
            self.on_bar(ev.data)
        elif ev.kind == "dict":
            for rec in records_from_trainer_dict(ev.data, None):
                if rec["event"] == "eval" and _merge_into_block_eval(rec, self.records):
                    continue
                self.append(rec)
        elif ev.kind == "oom":
            if not any(r["event"] == "error" for r in self.records):
                self.append({"event": "error", "step": None, "kind": "out_of_memory", "message": ev.data})
        elif ev.kind == "interrupt":
            self.meta["interrupted"] = "crash (traceback)" if ev.data == "Traceback" else ev.data
            self.meta["_interrupted_at"] = len(self.records)
        elif ev.kind == "row":
            for rec in _records_from_row(ev.data):
                self.records.append(rec)
                if rec["step"] is not None:
                    self.fixed.add(id(rec))
        elif ev.kind == "block":
            self.on_block(*ev.data)

    def append(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.pending.append(rec)

    def final_eval(self) -> dict[str, Any]:
        rec = next((r for r in reversed(self.records) if r["event"] == "final_eval"), None)
        if rec is None:
            rec = {"event": "final_eval", "step": None}
            self.append(rec)
        return rec

    def on_bar(self, bar: dict[str, Any]) -> None:
        step = int(bar["n"])
        stepped = False
        for rec in self.pending:
            rec["step"] = step
            _bar_extras(rec, bar)
            if rec["event"] == "log" and isinstance(bar.get("loss"), str):
                rec["loss"] = bar["loss"]  # the Step line says nan/inf: that is the evidence to keep
            stepped = stepped or rec["event"] == "log"
        self.pending = []
        if "loss" in bar and not stepped and bar["loss"] is not None:
            # a Wanda `Step` line with no Trainer dict before it is a train-loss point of its own
            rec = {"event": "log", "step": step, "loss": bar["loss"]}
            _bar_extras(rec, bar)
            self.records.append(rec)
            self.fixed.add(id(rec))

    def on_block(self, name: str, values: Mapping[str, str]) -> None:
        for rec in _block_records(name, values):
            if rec["event"] == "final_eval":
                current = next((r for r in reversed(self.records) if r["event"] == "final_eval"), None)
                if current is not None and current.get("eval_set") == rec.get("eval_set"):
                    current.update({k: v for k, v in rec.items() if k != "step"})
                    continue
            self.append(rec)

    def close(self) -> None:
        for rec in self.pending:  # nothing redrawn after them: the last bar is the best estimate
            rec["step"] = int(self.last_bar["n"]) if self.last_bar else None
            if self.last_bar:
                _bar_extras(rec, self.last_bar)


def _settle_steps(records: list[dict[str, Any]], meta: dict[str, Any], fixed: set[int], bar_steps: bool,
                  own_bars: bool) -> list[dict[str, Any]]:
    """The records with resumed stretches dropped, steps re-estimated where the bar cannot be trusted, the run's
    end marked and max_steps on every log; meta says how."""
    if bar_steps and not own_bars:
        kept = _drop_superseded(records)
        if len(kept) < len(records):
            meta["superseded"] = len(records) - len(kept)
            records = kept
    meta["step_source"] = "bar" if bar_steps else "table"
    if not _steps_monotonic(records) or (not bar_steps and len(fixed) < len(records)):
        meta["step_source"] = _steps_from_epochs(records, meta, fixed)
    _mark_unfinished(records, meta)
    if meta.get("max_steps"):
        for rec in records:
            if rec["event"] == "log":
                rec.setdefault("max_steps", meta["max_steps"])
    return records


def _merge_into_block_eval(rec: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """An eval dict printed after its `Eval at step N` block describes the same evaluation: merge it."""
    last = next((r for r in reversed(records) if r["event"] == "eval"), None)
    if last is None or not last.get("_block") or last.get("_dict"):
        return False
    a, b = to_float(last.get("eval_loss")), to_float(rec.get("eval_loss"))
    if a is None or b is None or abs(a - b) > 5e-4 * max(1.0, abs(a)):
        return False
    last.update({k: v for k, v in rec.items() if k not in ("step", "perplexity", "event")})
    last["_dict"] = True
    return True


def _wanda_event(ev: wanda_console.Event, records: list[dict[str, Any]], pending: list[dict[str, Any]],
                 fixed: set[int], meta: dict[str, Any], final_eval: Any, last_bar: Mapping[str, Any] | None) -> None:
    """Fold one Wanda-fork event into the records."""
    data = ev.data
    if ev.kind == "eval":
        # the eval dict printed just before the block is the same evaluation: the block names its step
        waiting = [r for r in pending if r["event"] == "eval" and r.get("step") is None]
        target = waiting[-1] if waiting else None
        if target is None:
            target = {"event": "eval", "step": data["step"], "_block": True}
            records.append(target)
        else:
            pending.remove(target)
        target["step"] = data["step"]
        fixed.add(id(target))
        for key in ("eval_loss", "perplexity", "is_best", "best_before_perplexity"):
            if data.get(key) is not None:
                target[key] = data[key]
    elif ev.kind == "completed":
        end = next((r for r in records if r["event"] == "train_end"), None)
        if end is None:
            end = {"event": "train_end", "step": data["steps"] or (int(last_bar["n"]) if last_bar else None)}
            records.append(end)
        end.setdefault("train_runtime", data["runtime"])
    elif ev.kind == "final_ppl":
        final_eval()["perplexity"] = data
    elif ev.kind == "improved":
        before, after = data
        rec = final_eval()
        rec["pruned_perplexity"] = before
        rec.setdefault("perplexity", after)
    elif ev.kind == "summary":
        if data.get("best checkpoint"):
            meta["best_checkpoint"] = data["best checkpoint"]
        meta["training_summary"] = dict(data)


def _mark_unfinished(records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    for rec in records:
        rec.pop("_block", None)
        rec.pop("_dict", None)
    at = meta.pop("_interrupted_at", None)
    if at is not None and any(r["event"] in ("log", "train_end", "final_eval") for r in records[at:]):
        meta.pop("interrupted")  # resumed after the interrupt: the later lines tell how it ended
    reason = mark_unfinished(records, meta.get("max_steps"), meta.get("interrupted"))
    if reason is not None:
        meta["interrupted"] = reason
    else:
        meta.pop("interrupted", None)


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
    elapsed = bar["elapsed_s"] if bar.get("elapsed_s") is not None else _seconds(bar.get("elapsed"))
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
