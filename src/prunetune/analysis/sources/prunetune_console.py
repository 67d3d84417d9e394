"""`prunetune finetune`'s own console (prunetune.finetune.console), as kept in train.log."""

from __future__ import annotations

import re
from typing import Any

from prunetune.analysis.sources.base import num as _num
from prunetune.analysis.sources.base import seconds as _seconds
from prunetune.analysis.sources.base import split_lines

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
    lines = split_lines(text)
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
