"""The raw console log of a Transformers Trainer run.

The Trainer prints each log as a Python dict repr (`{'loss': 3.4521, ...}`; Transformers 5 prints the numbers
as strings, `{'loss': '3.452', ...}`), between tqdm bar redraws separated by `\\r`, sometimes wrapped across
lines by a terminal or a logger, with bare `nan`/`inf` that no literal parser accepts. The dicts carry no
step: it is read from the training bar (`12/60 [`) that tqdm redraws right after each `tqdm.write`, and
estimated from the epoch when there is no usable bar (such records say `step_estimated`). The run's end is
read from the strongest evidence the console has: the end-of-training dict and metrics blocks, "Training
completed.", a bar at its total, a traceback and where it sits relative to them. Unknown lines are skipped.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.analysis.sources import wanda_console
from prunetune.analysis.sources.base import Peek, Source, mark_unfinished, split_lines, step_value
from prunetune.analysis.sources.base import num as _num
from prunetune.analysis.sources.base import seconds as _seconds
from prunetune.analysis.sources.jsonl import read_log_bytes
from prunetune.analysis.sources.settings import settings_from_lines
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
_INTERRUPT = re.compile(r"^\s*(?:\^C\s*)?(KeyboardInterrupt)\b|^(?:\^C)?(Traceback) \(most recent call last\)|"
                        r"\b(KeyboardInterrupt)\b")
# the exception line that closes a traceback: "torch.OutOfMemoryError: CUDA out of memory ..."
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Interrupt|Exit))\b(?::\s*(.*))?$")
# the Trainer's end of training (logger.info) and its reload of the best checkpoint (load_best_model_at_end)
_COMPLETED = re.compile(r"^(?:\[[^\]]*\][^>]*>>\s*|[A-Z]+:[\w.]+:\s*)?\s*Training completed\.")
# fastai v1's end of fit(): its master bar's "Total time: 110:29:25"
_FASTAI_DONE = re.compile(r"^\s*Total time:\s*\d+(?::\d\d)+\s*$")
_BEST_LOADED = re.compile(r"Loading best (?:model|adapter)[^\n]*? from (\S+?)\s*\(score:\s*([^)]+)\)")
# Jupyter's NotebookProgressCallback table, as copied out of a notebook ("Step  Training Loss  Validation Loss",
# also its HTML: <th>Step</th><th>Training Loss</th>...), and fastai's ("epoch  train_loss  valid_loss  accuracy")
_TABLE_HEADER = re.compile(r"\b(step|epoch)\b.*\b(training loss|train_loss|train loss)\b", re.IGNORECASE)
_TABLE_SPLIT = re.compile(r"\t+|\s{2,}|\s*\|\s*")
TABLE_COLUMNS = {"step": "step", "epoch": "epoch", "training loss": "loss", "train_loss": "loss",
                 "train loss": "loss", "validation loss": "eval_loss", "valid_loss": "eval_loss",
                 "val_loss": "eval_loss", "eval_loss": "eval_loss", "eval loss": "eval_loss"}
# the notebook's progress line: "[411/500 8:59:24 < 3:05:21, 0.01 it/s, Epoch 1.45/2]" (a bar at step 411 of 500;
# the count is padded to the width of the total: "[ 90/495 07:24 < 34:04, ...]"); the training bar names the epoch
_NOTEBOOK_BAR = re.compile(r"\[\s*(?P<n>\d+)/(?P<total>\d+) (?P<elapsed>[\d:]+)(?: < (?P<remaining>[\d:]+))?"
                           r"(?:, (?P<rate>[\d.]+) (?P<unit>it/s|s/it))?(?P<epoch>, Epoch [\d.]+/\d+)?\]")
_HTML_TABLE = re.compile(r"<table\b.*?</table>", re.IGNORECASE | re.DOTALL)
_HTML_ROW = re.compile(r"<tr\b.*?</tr>", re.IGNORECASE | re.DOTALL)
_HTML_CELL = re.compile(r"<t[hd]\b[^>]*>(.*?)</t[hd]>", re.IGNORECASE | re.DOTALL)


def html_tables_as_text(text: str) -> str:
    """Every HTML table of a notebook output as tab-separated lines (header first), so a table printed as HTML
    reads like one printed as text."""
    def rows(match: re.Match[str]) -> str:
        lines = []
        for row in _HTML_ROW.findall(match.group(0)):
            cells = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", c)).strip() for c in _HTML_CELL.findall(row)]
            lines.append("\t".join(cells))
        return "\n" + "\n".join(lines) + "\n"

    return _HTML_TABLE.sub(rows, text) if "<table" in text.lower() else text


def parse_python_dict(text: str) -> dict[str, Any] | None:
    """A dict printed by Python (or JSON), tolerating bare nan/inf and tensor(...) values; None if not a dict."""
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    for candidate in (text, _BARE_NONFINITE.sub(r"\1'\2'", _TENSOR.sub(r"\1", text))):
        try:
            value = ast.literal_eval(candidate)  # the text as printed first: a string may hold "nan" or "tensor("
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, dict) else None
    return None


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
    kind: str  # bar | dict | oom | total | row | interrupt | block | completed | best
    pos: int
    data: Any


def _exception_after(lines: list[str], i: int) -> str | None:
    """The exception line closing the traceback that starts at line i ("RuntimeError: ..."), if any."""
    for k in range(i + 1, min(len(lines), i + 400)):
        line = lines[k].rstrip()
        if (m := _EXCEPTION.match(line)) is not None:
            return (m.group(1) + (f": {m.group(2)}" if m.group(2) else ""))[:300]
    return None


def _console_events(lines: list[str], max_dict_lines: int = 40) -> list[_Event]:
    events: list[_Event] = []
    i = 0
    block: tuple[str, dict[str, Any]] | None = None
    while i < len(lines):
        line = lines[i]
        for m in _BAR.finditer(line):
            events.append(_Event("bar", i, {**m.groupdict(), "desc": _bar_desc(line, m.start())}))
        for m in _NOTEBOOK_BAR.finditer(line):
            events.append(_Event("bar", i, {**m.groupdict(), "notebook": True}))
        if OOM.search(line):
            events.append(_Event("oom", i, line.strip()[:500]))
        if (total := _TOTAL_STEPS.search(line)) is not None:
            events.append(_Event("total", i, int(total.group(1).replace(",", ""))))
        if _COMPLETED.search(line):
            events.append(_Event("completed", i, "'Training completed.' in the log"))
        elif _FASTAI_DONE.match(line):
            events.append(_Event("completed", i, "fastai's 'Total time' at the end of fit()"))
        if (best := _BEST_LOADED.search(line)) is not None:
            events.append(_Event("best", i, {"checkpoint": best.group(1).rstrip(".,"), "score": _num(best.group(2))}))
        if _TABLE_HEADER.search(line):
            columns = [c.lower() for c in _TABLE_SPLIT.split(line.strip()) if c]
            i += 1
            while i < len(lines):
                cells = [c for c in _TABLE_SPLIT.split(lines[i].strip()) if c]
                if len(cells) != len(columns) or to_float(cells[0]) is None:
                    break
                events.append(_Event("row", i, dict(zip(columns, cells, strict=True))))
                i += 1
            continue
        if (stop := _INTERRUPT.search(line)) is not None:
            what = next(g for g in stop.groups() if g)
            exception = _exception_after(lines, i) if what == "Traceback" else "KeyboardInterrupt"
            reason = "KeyboardInterrupt" if exception and exception.startswith("KeyboardInterrupt") else (
                "crash (traceback)" if what == "Traceback" else what)
            events.append(_Event("interrupt", i, {"reason": reason, "exception": exception}))
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


# tqdm descriptions of bars that are not the training loop: loading, tokenising, mapping a dataset, evaluating
_NOT_TRAINING = re.compile(r"load|map|token|download|generat|evaluat|shard|filter|convert|sav|upload|pack|fetch|"
                           r"extract|process|compil|merg|quantiz|writ|read|dataset|example|batch(?:es)? of",
                           re.IGNORECASE)


_TRAINING = re.compile(r"train|epoch|step|iter|fine-?tun", re.IGNORECASE)


def _bar_desc(line: str, start: int) -> str:
    """The description tqdm prints before a bar (`Loading weights:   3%|...`, or without the bar's blocks as
    Colab prints it: `Loading weights: 100% 2011/2011`), '' for none."""
    head = re.split(r"\[A|\r", line[:start])[-1]
    match = re.search(r"([A-Za-z][^|%]*?):?\s*\d+%(?:\|[^|]*\|)?\s*$", head)
    return match.group(1).strip() if match else ""


def _train_bar_total(bars: list[_Event]) -> str | None:
    """The training bar's total: the notebook Trainer's own progress line with its epoch when there is one (a
    user's tqdm loop around the training, "Training characters 0/1", is not it); else, among the bars whose
    description does not name other work (loading weights, tokenising, evaluating), the one whose count goes
    back least often (eval bars restart at every evaluation; the training bar only at a resume), the first to
    appear on a tie."""
    seen: dict[str, list[int]] = {}
    named: dict[str, bool] = {}  # a bar described as something else than training (the Trainer's has no description)
    trainer: set[str] = set()  # totals of the notebook Trainer's training progress line ("..., Epoch 1.45/2]")
    for ev in bars:
        desc = ev.data.get("desc") or ""
        if _NOT_TRAINING.search(desc):
            continue
        seen.setdefault(ev.data["total"], []).append(int(ev.data["n"]))
        named[ev.data["total"]] = named.get(ev.data["total"], False) or bool(desc and not _TRAINING.search(desc))
        if ev.data.get("epoch"):
            trainer.add(ev.data["total"])
    if not seen:
        return None
    drops = {t: sum(1 for a, b in zip(ns, ns[1:], strict=False) if b < a) for t, ns in seen.items()}
    order = list(seen)
    return min(order, key=lambda t: (t not in trainer, named[t], drops[t], order.index(t)))


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


_RUN_END = re.compile(r"""['"]train_runtime['"]\s*:""")
_TRAIN_LOG = re.compile(r"""\{\s*['"]loss['"]\s*:""")
_BAR_START = re.compile(r"\b[01]/\d+ \[")


def _last_run(lines: list[str]) -> list[str]:
    """The lines of the last training run in a log that holds several one after another (a sanity run of 3
    steps, then the real one of 2430): each `Trainer.train()` ends on its `train_runtime` dict, so a progress
    bar starting again and train-loss dicts after one are the next run (a `log_history` printed after the end
    has no new bar). Evaluations and errors after the last run's end stay with it."""
    ends = [i for i, line in enumerate(lines) if _RUN_END.search(line)]
    later = [i for i in ends if any(_BAR_START.search(line) for line in lines[i + 1 :])
             and any(_TRAIN_LOG.search(line) for line in lines[i + 1 :])]
    return lines[later[-1] + 1 :] if later else lines


def parse_console_log(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records from a raw Trainer console log (plain, Wanda-fork, notebook table), and meta (max_steps,
    step_source, interrupted, best_checkpoint, settings, notes)."""
    every_line = split_lines(html_tables_as_text(text))
    lines = _last_run(every_line)
    events = _console_events(lines)
    wanda = wanda_console.scan(lines)
    own_bars = _wanda_bars(wanda)
    bars = own_bars or [e for e in events if e.kind == "bar"]
    total = _train_bar_total(bars)
    train_bars = [e for e in bars if e.data["total"] == total]
    meta: dict[str, Any] = {"settings": settings_from_lines(every_line), "notes": []}
    if len(lines) < len(every_line):
        meta["notes"].append(f"the log holds more than one training run (a train_runtime line, then more training): "
                             f"the last, from line {len(every_line) - len(lines) + 1}, is read")
    announced = [e.data for e in events if e.kind == "total"]
    header = next((f for o, f in meta["settings"] if "header" in o), {})
    if announced:
        meta["max_steps"] = announced[-1]
    elif total is not None:
        meta["max_steps"] = int(total)
    elif isinstance(header.get("max_steps"), int) and header["max_steps"] > 0:
        meta["max_steps"] = header["max_steps"]  # a banner's "Total steps = 300"
    meta["_announced"] = bool(announced or header)
    if own_bars:
        meta["format"] = "wanda_console"

    fold = _Fold(meta, total)
    # a dict on the same line as a bar redraw is printed before it (tqdm.write): it takes that bar's step
    rank = {"dict": 0, "bar": 1}
    stream = sorted([*(e for e in events if e.kind != "bar"), *(e for e in wanda if e.kind != "step"),
                     *(e for e in bars if e.kind == "bar" and e.data["total"] != total and not own_bars),
                     *train_bars],
                    key=lambda e: (e.pos, rank.get(e.kind, 2)))
    for ev in stream:
        fold.add(ev)
    fold.close()
    if fold.last_bar is not None:
        meta["_last_bar_n"] = int(fold.last_bar["n"])
    records = _settle_steps(fold.records, meta, fold.fixed, bar_steps=bool(train_bars), own_bars=bool(own_bars))
    return records, meta


class _Fold:
    """Console events folded into records in print order: a record takes its step from the next redraw of the
    training bar; an error takes the step of the last one drawn before it (a fact: the steps up to it ran)."""

    def __init__(self, meta: dict[str, Any], train_total: str | None) -> None:
        self.meta = meta
        self.train_total = train_total
        self.records: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # records waiting for the next bar redraw to learn their step
        self.fixed: set[int] = set()  # ids of records whose step the log states (table rows, Wanda lines, errors)
        self.last_bar: dict[str, Any] | None = None
        self.last_any_bar: dict[str, Any] | None = None
        self.ended = False  # the end of training was printed (train dict / block, "Training completed.")

    def add(self, ev: _Event | wanda_console.Event) -> None:
        if isinstance(ev, wanda_console.Event):
            _wanda_event(ev, self.records, self.pending, self.fixed, self.meta, self.final_eval, self.last_bar)
            self.ended = self.ended or ev.kind == "completed"
        elif ev.kind == "bar":
            self.last_any_bar = ev.data
            if ev.data["total"] == self.train_total:
                self.last_bar = ev.data
                self.on_bar(ev.data)
        elif ev.kind == "dict":
            own, planned = dict_step(ev.data)
            for rec in records_from_trainer_dict(ev.data, own):
                if rec["event"] == "eval" and _merge_into_block_eval(rec, self.records):
                    continue
                if rec["event"] == "eval" and self.ended:
                    rec["event"] = "final_eval"  # trainer.evaluate() after train(): the model as it ended
                self.ended = self.ended or rec["event"] == "train_end"
                if own is None:
                    self.append(rec)  # stepped by the next progress bar, else by its epoch or its ordinal
                    continue
                if planned and rec["event"] == "log":
                    rec["max_steps"] = planned
                self.records.append(rec)
                self.fixed.add(id(rec))
        elif ev.kind == "oom":
            self.on_oom(ev.data)
        elif ev.kind == "interrupt":
            self.meta["interrupted"] = ev.data["reason"]
            self.meta["_interrupted_at"] = len(self.records)
            self.meta["_ended_before_interrupt"] = self.ended or self._bar_complete()
            if ev.data.get("exception"):
                self.meta["exception"] = ev.data["exception"]
        elif ev.kind == "row":
            for rec in _records_from_row(ev.data):
                self.records.append(rec)
                if rec["step"] is not None:
                    self.fixed.add(id(rec))
        elif ev.kind == "block":
            self.on_block(*ev.data)
        elif ev.kind == "completed":
            self.ended = True
            if not any(r["event"] == "train_end" for r in self.records):
                self.append({"event": "train_end", "step": None, "evidence": ev.data})
        elif ev.kind == "best":
            self.meta["best_checkpoint"] = ev.data["checkpoint"]
            step = _checkpoint_step(ev.data["checkpoint"])
            rec = {"event": "best_loaded", "step": step, "checkpoint": ev.data["checkpoint"],
                   "score": ev.data["score"], "evidence": "'Loading best model from' in the log"}
            self.records.append(rec)
            self.fixed.add(id(rec))

    def _bar_complete(self) -> bool:
        bar = self.last_bar
        return bar is not None and int(bar["total"]) > 0 and int(bar["n"]) >= int(bar["total"])

    def append(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.pending.append(rec)

    def final_eval(self) -> dict[str, Any]:
        rec = next((r for r in reversed(self.records) if r["event"] == "final_eval"), None)
        if rec is None:
            rec = {"event": "final_eval", "step": None}
            self.append(rec)
        return rec

    def on_oom(self, line: str) -> None:
        if any(r["event"] == "error" for r in self.records):
            return
        rec: dict[str, Any] = {"event": "error", "kind": "out_of_memory", "message": line,
                               "step": int(self.last_bar["n"]) if self.last_bar else None}
        if rec["step"] is None and self.meta.get("_announced") and not any(
                r["event"] in ("log", "eval") for r in self.records):
            rec["step"], rec["step_basis"] = 0, "training was announced and no step had completed"
        if self.ended or self._bar_complete():
            rec["after_training"] = True  # training had ended: what ran after it (an evaluation, a next cell)
        if self.last_any_bar is not None and self.last_any_bar is not self.last_bar:
            rec["during"] = "evaluation"  # the last bar drawn before the error was an evaluation's
        if rec["step"] is not None:
            rec.setdefault("step_basis", "the last training progress bar before the error")
        self.records.append(rec)
        self.fixed.add(id(rec))

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
            if rec["event"] == "train_end":
                self.ended = True
                current = next((r for r in self.records if r["event"] == "train_end"), None)
                if current is not None:
                    current.update({k: v for k, v in rec.items() if k != "step"})
                    continue
            self.append(rec)

    def close(self) -> None:
        for rec in self.pending:  # nothing redrawn after them: the last bar is the best estimate
            rec["step"] = int(self.last_bar["n"]) if self.last_bar else None
            if self.last_bar:
                _bar_extras(rec, self.last_bar)
        self.pending = []
        if not any(r["event"] == "train_end" or (r["event"] == "error" and not r.get("after_training"))
                   for r in self.records) and self._bar_complete() \
                and "_interrupted_at" not in self.meta:
            self.records.append({"event": "train_end", "step": int(self.last_bar["n"]),
                                 "evidence": "the training progress bar reached its total"})


def _checkpoint_step(path: str) -> int | None:
    match = re.search(r"checkpoint-(\d+)", path)
    return int(match.group(1)) if match else None


def _settle_steps(records: list[dict[str, Any]], meta: dict[str, Any], fixed: set[int], bar_steps: bool,
                  own_bars: bool) -> list[dict[str, Any]]:
    """The records with resumed stretches dropped, steps re-estimated where the bar cannot be trusted (those
    records say `step_estimated`), the run's end marked and max_steps on every log; meta says how."""
    if bar_steps and not own_bars:
        kept = _drop_superseded(records)
        if len(kept) < len(records):
            meta["superseded"] = len(records) - len(kept)
            records = kept
    stated = all(id(r) in fixed for r in records if r["event"] in ("log", "eval"))  # table rows, Step lines
    meta["step_source"] = "table" if stated and not own_bars else "bar" if bar_steps else "table"
    if bar_steps and not _steps_monotonic(records):
        _repair_clusters(records, meta, fixed)
    if not _steps_monotonic(records) or (not bar_steps and len(fixed) < len(records)):
        meta["step_source"] = _steps_from_epochs(records, meta, fixed)
    _mark_unfinished(records, meta)
    meta.pop("_announced", None)
    if meta.get("max_steps"):
        for rec in records:
            if rec["event"] in ("log", "error"):
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
            if not any(r["event"] == "best_loaded" for r in records):
                # the summary names the checkpoint the final evaluation was run on (load_best_model_at_end)
                records.append({"event": "best_loaded", "step": _checkpoint_step(data["best checkpoint"]),
                                "checkpoint": data["best checkpoint"],
                                "evidence": "the training summary's 'Best checkpoint' line"})
        meta["training_summary"] = dict(data)


def _mark_unfinished(records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    for rec in records:
        rec.pop("_block", None)
        rec.pop("_dict", None)
    at = meta.pop("_interrupted_at", None)
    ended_before = meta.pop("_ended_before_interrupt", False)
    exception = meta.get("exception")
    if at is not None and any(r["event"] in ("log", "train_end", "final_eval") for r in records[at:]) \
            and not ended_before:
        meta.pop("interrupted")  # resumed after the interrupt: the later lines tell how it ended
    elif at is not None and (ended_before or any(r["event"] in ("train_end", "final_eval") for r in records[:at])):
        # training had ended when the traceback came (saving, pushing, a later evaluation failed): finished
        meta.pop("interrupted")
        meta["notes"].append("a traceback came after training had ended" + (f" ({exception})" if exception else "")
                             + ": training finished; what ran after it failed")
        if not any(r["event"] == "train_end" for r in records):
            last = [r["step"] for r in records if r["event"] in ("log", "eval") and isinstance(r.get("step"), int)]
            records.append({"event": "train_end", "step": max(last) if last else None,
                            "evidence": "the training progress bar reached its total before the traceback"})
    reason = mark_unfinished(records, meta.get("max_steps"), meta.get("interrupted"))
    last_bar = meta.pop("_last_bar_n", None)
    if reason is not None:
        meta["interrupted"] = reason
        if last_bar is not None and last_bar > (records[-1].get("step") or 0):
            records[-1]["step"] = last_bar  # the progress bar went on after the last logged step
        if exception and reason != "KeyboardInterrupt":
            records[-1]["exception"] = exception
    else:
        meta.pop("interrupted", None)


def _records_from_row(row: Mapping[str, str]) -> list[dict[str, Any]]:
    values = {TABLE_COLUMNS[k]: _num(v) for k, v in row.items() if k in TABLE_COLUMNS}
    # the table's other columns ("Rewards / chosen", "Accuracy") travel with the train log: they tell what the
    # loss is (a preference loss, a classifier's)
    others = {re.sub(r"\s*/\s*", "/", k).replace(" ", "_"): v for k, raw in row.items()
              if k not in TABLE_COLUMNS and (v := _num(raw)) is not None}
    step = values.get("step")
    step = int(step) if isinstance(step, float) and step.is_integer() and 0 <= step <= 10**12 else None
    extra = {"epoch": values["epoch"]} if values.get("epoch") is not None else {}
    out = []
    if values.get("loss") is not None:
        out.append({"event": "log", "step": step, "loss": values["loss"], **extra, **others})
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


def _logging_steps(meta: Mapping[str, Any]) -> int | None:
    """The logging interval the log's settings state (a TrainingArguments dump, a banner)."""
    for _, fields in meta.get("settings", []):
        value = to_float(fields.get("logging_steps"))
        if value and value >= 1 and value.is_integer():
            return int(value)
    return None


def _repair_clusters(records: list[dict[str, Any]], meta: dict[str, Any], fixed: set[int]) -> None:
    """Train logs that read the same bar step were printed together (stdout flushed in chunks apart from the
    bars on stderr): the bar step is where the last of them was logged, the others came before it. Each such
    cluster is spread back from its bar step: by the epoch each line reports where the log states the steps
    per epoch, else by the stated logging interval, else evenly since the previous cluster. Records re-stepped
    say `step_estimated`; evaluations take the step of the train log before them."""
    per_epoch = _steps_per_epoch(records, meta)
    interval = _logging_steps(meta)
    logs = [r for r in records if r["event"] == "log" and id(r) not in fixed and r.get("step") is not None]
    clusters: list[list[dict[str, Any]]] = []
    for rec in logs:
        if clusters and clusters[-1][0]["step"] == rec["step"]:
            clusters[-1].append(rec)
        else:
            clusters.append([rec])
    previous = 0
    for cluster in clusters:
        top = cluster[0]["step"]
        k = len(cluster)
        if k > 1:
            epochs = [to_float(r.get("epoch")) for r in cluster]
            for j, rec in enumerate(cluster):
                if per_epoch and all(e is not None for e in epochs):
                    step, how = max(1, round(epochs[j] * per_epoch)), "epoch"
                elif interval:
                    step, how = top - (k - 1 - j) * interval, "bar"
                else:
                    step, how = round(previous + (top - previous) * (j + 1) / k), "bar"
                if step != rec["step"] or how == "epoch":
                    rec["step"], rec["step_estimated"] = max(1, min(step, top)), how
        previous = top
    last_log = None
    for rec in records:
        if rec["event"] == "log":
            last_log = rec
        elif rec["event"] == "eval" and last_log is not None and last_log.get("step_estimated") \
                and id(rec) not in fixed and rec.get("step") is not None and rec["step"] > last_log["step"]:
            rec["step"], rec["step_estimated"] = last_log["step"], last_log["step_estimated"]
    if any(r.get("step_estimated") == "epoch" for r in records):
        meta["step_source"] = "epoch"


def _steps_per_epoch(records: list[dict[str, Any]], meta: dict[str, Any]) -> float | None:
    """Optimizer steps per epoch from what the log states: the header's total steps over its epochs, else the
    end-of-training record's runtime x steps/s (or max_steps) over its epoch. Never from the last epoch a log
    reached: a run that stopped early did not reach max_steps there."""
    max_steps = meta.get("max_steps")
    header = next((fields for origin, fields in meta.get("settings", []) if "training header" in origin), {})
    epochs = to_float(header.get("num_train_epochs"))
    if max_steps and epochs and epochs > 0 and (to_float(header.get("max_steps")) or max_steps) == max_steps:
        return max_steps / epochs
    end = next((r for r in records if r["event"] == "train_end"), None)
    if end is None:
        return None
    runtime, rate = to_float(end.get("train_runtime")), to_float(end.get("train_steps_per_second"))
    total = round(runtime * rate) if runtime and rate else max_steps
    final_epoch = to_float(end.get("epoch"))
    if final_epoch is None:
        final_epoch = max((e for r in records if r["event"] == "log" and (e := to_float(r.get("epoch")))), default=None)
    if not total or not final_epoch:
        return None
    meta.setdefault("max_steps", total)
    return total / final_epoch


_OWN_STEP = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def dict_step(d: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(step, planned steps) a console dict states itself: ms-swift's `"global_step/max_steps": "8270/11043"`,
    else a `global_step` key (a Trainer dict states neither: its step comes from the progress bar)."""
    for key, value in d.items():
        if "step" in str(key).lower() and isinstance(value, str) and (m := _OWN_STEP.match(value)) is not None:
            return step_value(m.group(1)), step_value(m.group(2))
    return step_value(d.get("global_step")), None


def _steps_from_epochs(records: list[dict[str, Any]], meta: dict[str, Any], fixed: set[int]) -> str:
    """Steps when the bar is missing or out of order (stdout buffered apart from stderr): epoch x steps per
    epoch when the log states both, else the log ordinal. Every record re-stepped says `step_estimated`."""
    per_epoch = _steps_per_epoch(records, meta)
    logs = [r for r in records if r["event"] == "log" and id(r) not in fixed]
    use_epoch = bool(per_epoch and all(to_float(r.get("epoch")) is not None for r in logs))
    ordinal = 0
    for rec in records:
        if id(rec) in fixed or rec["event"] not in ("log", "eval", "final_eval", "train_end"):
            continue
        if rec["event"] in ("final_eval", "train_end") and rec.get("step") is None:
            continue
        if use_epoch and to_float(rec.get("epoch")) is not None:
            rec["step"] = max(1, round(to_float(rec["epoch"]) * per_epoch))
            rec["step_estimated"] = "epoch"
        elif rec["event"] == "log":
            ordinal += 1
            rec["step"] = ordinal
            rec["step_estimated"] = "ordinal"
        elif rec["event"] == "eval":
            rec["step"] = ordinal
            rec["step_estimated"] = "ordinal"
    return "epoch" if use_epoch else "ordinal"


def read_console(path: Path, name: str) -> Source:
    """A console log file as a Source (`name`: the format that detected it)."""
    raw = read_log_bytes(path)
    records, meta = parse_console_log(raw.decode("utf-8", errors="replace"))
    meta.setdefault("format", name)
    meta["flavour"] = "trainer"
    return Source("console_log", path, records, meta)


class TrainerConsole:
    name = "trainer_console"
    kind = "console_log"
    describes = "the console log of a Transformers Trainer run (dicts, tqdm bars, metrics blocks)"
    _SIGNS = re.compile(r"""\{\s*['"](?:eval_)?loss['"]\s*:|\*{5} (?:Running training|\w+ metrics) \*{5}|"""
                        r"""Training Loss\s|\d+/\d+ \[\d""")

    def detect(self, peek: Peek) -> float:
        if peek.path.suffix in (".json", ".jsonl") or peek.binary:
            return 0.0
        return 0.5 if self._SIGNS.search(peek.head) else 0.1  # any text may hold a training log further down

    def in_directory(self, directory: Path) -> list[Path]:
        names = ["train.log", "console.log"]
        found = [directory / n for n in names if (directory / n).is_file()]
        found += [p for p in sorted(directory.glob("*.log")) if p.name not in names]
        found += sorted(directory.glob("*.txt"))
        return found

    def read(self, path: Path) -> Source:
        return read_console(path, self.name)
