"""Logs of training loops that print a step and a loss in words, one log per line or one header line per log:

    05/14/2019 11:20:05 - INFO - root -   step 23200 batch_loss 0.665586                       (BERT scripts)
    DLL 2022-04-05 02:22:54 - Training Epoch: 1 Training Iteration: 2872  step_loss : 0.695    (DLLogger)
    Iter 25: Train loss 1.593, Learning Rate 7.000e-05, It/sec 0.999, ...                       (MLX-LM)
    Iter 1: Val loss 2.086, Val took 17.177s
    Epoch 1, Step 3, Loss: 0.9670:   3%|▎         | 5/144 [00:07<03:42,  1.60s/it]            (tqdm descriptions)
    ... INFO [step=10/10000,epoch=0]                                                            (OLMo)
        optim/total_grad_norm=1.608
        train/CrossEntropyLoss=9.064

A loss is a number after a key containing `loss` (`val`/`valid`/`eval`/`test` in the key: an evaluation); a tqdm
bar on the same line gives the global step (a `Step k` that restarts every epoch does not); indented `key=value`
lines after a header line with a step belong to that step. Tracebacks end the run as in any console.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import Peek, Source, mark_unfinished, num, split_lines
from prunetune.analysis.sources.jsonl import read_log_bytes
from prunetune.analysis.sources.settings import settings_from_lines

_NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
_STEP = re.compile(r"\b(?:global[_ ]step|step|iter(?:ation)?|it)\b\s*[:=#]?\s*(\d+)(?:\s*/\s*(\d+))?", re.IGNORECASE)
_BAR = re.compile(r"(\d+)/(\d+) \[[\d:]+")
_LOSS = re.compile(rf"((?:[A-Za-z][\w/.-]*\s)?[\w/.-]*loss[\w/.-]*)\s*[:=]?\s*({_NUMBER})(?![\w.])", re.IGNORECASE)
_LR = re.compile(rf"\b(?:learning[_ ]?rate\w*|lr)\b\s*[:=]?\s*({_NUMBER})", re.IGNORECASE)
_GRAD = re.compile(rf"grad(?:ient)?[_ ]?norm\w*\s*[:=]?\s*({_NUMBER})", re.IGNORECASE)
_EPOCH = re.compile(r"\bepoch\b\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_TOTAL = re.compile(r"\b(?:iters|total[_ ]steps|max[_ ]steps|num[_ ]steps|total[_ ]iters)\b\s*[:=]?\s*([\d,]+)",
                    re.IGNORECASE)
_EVAL_KEY = re.compile(r"(?:^|[\W_])(val|valid|validation|eval|test|dev)(?:$|[\W_])", re.IGNORECASE)
_NOT_A_LOSS = re.compile(r"scale|weight|coef|alpha|beta", re.IGNORECASE)
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.IGNORECASE)
_TRACEBACK = re.compile(r"^(?:\^C)?Traceback \(most recent call last\)")
_SIGNAL = re.compile(r"KeyboardInterrupt|got signal|SIGTERM|SignalException", re.IGNORECASE)
_DONE = re.compile(r"\b(?:training (?:time|took|completed?|finished|done)|finished training|train(?:ing)?_runtime)\b",
                   re.IGNORECASE)
"""An end-of-run line (`Training time: 6.9 min`, `Training completed`): after the last log, the run finished."""
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Interrupt|Exit))\b(?::\s*(.*))?$")


def _metrics(line: str) -> dict[str, Any]:
    """The losses, LR, grad norm and epoch a line states."""
    out: dict[str, Any] = {}
    for key, value in _LOSS.findall(line):
        if _NOT_A_LOSS.search(key):
            continue
        name = "eval_loss" if _EVAL_KEY.search(key) else "loss"
        out.setdefault(name, num(value))
    if (m := _LR.search(line)) is not None:
        out["lr"] = num(m.group(1))
    if (m := _GRAD.search(line)) is not None:
        out["grad_norm"] = num(m.group(1))
    if (m := _EPOCH.search(line)) is not None:
        out["epoch"] = num(m.group(1))
    return {k: v for k, v in out.items() if v is not None}


def _unwrap(lines: list[str]) -> list[str]:
    """The lines with a wrapped log line joined again: a line that states a loss but no step, followed by an
    unindented one that states a step but no loss, is one log line a terminal or a paste broke in two
    (`... Loss nan   LearningRate 0.001` / `Epoch: 0   Global Step: 20 ...`)."""
    out: list[str] = []
    for line in lines:
        prev = out[-1] if out else ""
        if (line[:1] not in (" ", "\t") and _step(line)[0] is not None and "loss" not in _metrics(line)
                and "loss" in _metrics(prev) and _step(prev)[0] is None):
            out[-1] = prev.rstrip() + " " + line.lstrip()
        else:
            out.append(line)
    return out


def _step(line: str) -> tuple[int | None, int | None]:
    """(step, total) of a line: a tqdm bar's count (the global step) before a `step N` word."""
    for pattern in (_BAR, _STEP):
        if (m := pattern.search(line)) is not None:
            return int(m.group(1)), int(m.group(2)) if m.group(2) else None
    return None, None


def _records(metrics: dict[str, Any], step: int, total: int | None) -> list[dict[str, Any]]:
    out = []
    if "loss" in metrics:
        rec = {"event": "log", "step": step, **{k: v for k, v in metrics.items() if k != "eval_loss"}}
        if total:
            rec["max_steps"] = total
        out.append(rec)
    if "eval_loss" in metrics:
        out.append({"event": "eval", "step": step, "eval_loss": metrics["eval_loss"]})
    return out


def parse_keyed_lines(text: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = _unwrap(split_lines(text))
    records: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"settings": settings_from_lines(lines), "notes": [], "step_source": "bar"}
    total: int | None = None
    block: tuple[int, dict[str, Any]] | None = None  # a header line's step and the indented metrics after it
    last_step, stop_reason, exception = None, None, None
    finished = False  # an end-of-run line came after the latest log line
    i = 0
    while i < len(lines):
        line = lines[i]
        if (m := _TOTAL.search(line)) is not None:
            total = int(m.group(1).replace(",", "")) or total
        if _TRACEBACK.search(line) or (_SIGNAL.search(line) and not line.startswith(" ")):
            exception = next((m.group(0)[:300] for k in range(i, min(len(lines), i + 400))
                              if (m := _EXCEPTION.match(lines[k].rstrip())) is not None), exception)
            stop_reason = stop_reason or ("signal" if _SIGNAL.search(exception or line) else "crash (traceback)")
        if _OOM.search(line) and not any(r["event"] == "error" for r in records):
            records.append({"event": "error", "kind": "out_of_memory", "step": last_step, "message": line.strip()[:300]})
        step, of = _step(line)
        metrics = _metrics(line)
        finished = (finished or (bool(records) and _DONE.search(line) is not None)) and step is None
        if line[:1] in (" ", "\t") and block is not None and step is None and metrics:
            block[1].update({k: v for k, v in metrics.items() if k not in block[1]})
            i += 1
            continue
        if block is not None:
            records += _records(block[1], block[0], total)
            block = None
        if step is not None and (metrics.get("loss") is not None or metrics.get("eval_loss") is not None):
            total, last_step = of or total, step
            records += _records(metrics, step, total)
        elif step is not None and _STEP.search(line):  # a header line (`[step=10/1000]`), not a stray bar
            total, last_step = of or total, step
            block = (step, metrics)
        i += 1
    if block is not None:
        records += _records(block[1], block[0], total)
    meta["max_steps"] = total
    done = total is not None and last_step is not None and last_step >= total
    if done or (finished and not stop_reason and last_step is not None):
        evidence = f"the log reaches step {total} of {total}" if done else "an end-of-run line after the last log"
        records.append({"event": "train_end", "step": last_step, "evidence": evidence})
        if stop_reason:
            meta["notes"].append(f"a traceback came after training had ended ({exception}): training finished; what "
                                 "ran after it failed")
    elif stop_reason and records:
        steps = [r["step"] for r in records if r["event"] in ("log", "eval")]
        records.append({"event": "stopped", "step": max(steps, default=last_step), "reason": stop_reason,
                        "exception": exception, "message": f"the log ends on a traceback ({exception})"})
    else:
        mark_unfinished(records, total)
    return records, meta


class KeyedLines:
    name = "keyed_lines"
    kind = "console_log"
    describes = "a training loop's log lines with a step and a loss in words (`step 100 loss 2.31`, `Iter 25: " \
                "Train loss 1.59`, `[step=10/1000]` blocks)"

    def detect(self, peek: Peek) -> float:
        if peek.binary or peek.path.suffix in (".json", ".jsonl"):
            return 0.0
        lines = _unwrap(split_lines(peek.head))
        hits = sum(1 for line in lines if _step(line)[0] is not None and "loss" in _metrics(line))
        headers = sum(1 for line in lines if _STEP.search(line) and not {"loss", "eval_loss"} & set(_metrics(line)))
        blocks = sum(1 for line in lines if line[:1] in (" ", "\t") and "loss" in _metrics(line))
        return 0.4 if hits >= 3 or (headers >= 2 and blocks >= 2) else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        return sorted([*directory.glob("*.log"), *directory.glob("*.txt")])

    def read(self, path: Path) -> Source:
        raw = read_log_bytes(path)
        records, meta = parse_keyed_lines(raw.decode("utf-8", errors="replace"))
        return Source(self.kind, path, records, {**meta, "format": self.name, "flavour": "trainer"})
