"""The console of the Wanda-fork LoRA scripts (`run_lora_finetune_block.sh` style) our users come from.

Beside the Trainer's own dicts it prints, from callbacks of its own:

    Step 200/2000  [======>       ] 10.0% | Loss: 2.2345 | Time: 0:10:00
    Eval at step 200:
      - Eval Loss: 2.3456
      - Perplexity: 10.44
      - Best so far: Yes ✅ (improved from 10.44)
    Training completed in 1:40:23
    ***** Final eval results *****
      eval_loss = 1.9876
      perplexity = 7.30
    ✅ Final Perplexity: 7.30
       (Improved from 8207.52 → 7.30, reduction: 99.91%)
    ***** Training summary *****
      Best checkpoint: checkpoint-1800

`scan` reads those lines into events the console reader merges with the Trainer dicts: the `Step` lines are
the run's own progress bar (explicit steps), an `Eval at step N` block names the step of the eval dict printed
just before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.analysis.sources.base import Peek, Source, num, seconds

STEP_LINE = re.compile(
    r"^\s*Step\s+(?P<n>\d+)\s*/\s*(?P<total>\d+)\b.*?\|\s*Loss:\s*(?P<loss>[^\s|]+)"
    r"(?:.*?\|\s*Time:\s*(?P<time>[\d:]+))?"
)
EVAL_HEADER = re.compile(r"^\s*Eval(?:uation)? at step (\d+)\s*:?\s*$")
EVAL_ITEM = re.compile(r"^\s*-?\s*(Eval Loss|Perplexity|PPL|Best so far)\s*:\s*(.*?)\s*$", re.IGNORECASE)
IMPROVED_FROM = re.compile(r"improved from\s+([\d.eE+-]+|nan|inf)", re.IGNORECASE)
COMPLETED = re.compile(r"^\s*Training completed in ([\d:]+)(?:\s*\((\d+) steps)?")
FINAL_PPL = re.compile(r"Final Perplexity:\s*([^\s(]+)", re.IGNORECASE)
IMPROVED_LINE = re.compile(
    r"\(\s*(?:Improved|Not improved|Worse)\s+from\s+([^\s]+)\s*(?:→|->)\s*([^\s,)]+)", re.IGNORECASE
)
SUMMARY_HEADER = re.compile(r"\*{3,}\s*Training summary\s*\*{3,}", re.IGNORECASE)
SUMMARY_ITEM = re.compile(r"^\s+([A-Za-z][A-Za-z ]+?)\s*:\s*(\S.*?)\s*$")


@dataclass
class Event:
    """One line (or block) of the console that means something; `pos` is its line index."""

    kind: str  # step | eval | completed | final_ppl | improved | summary
    pos: int
    data: Any


def _eval_block(lines: list[str], i: int) -> tuple[dict[str, Any], int]:
    """The items of the `Eval at step N:` block starting at line i+1; (values, lines consumed)."""
    values: dict[str, Any] = {}
    k = i + 1
    while k < len(lines) and (m := EVAL_ITEM.match(lines[k])):
        key, text = m.group(1).lower(), m.group(2)
        if key == "eval loss":
            values["eval_loss"] = num(text)
        elif key in ("perplexity", "ppl"):
            values["perplexity"] = num(text)
        else:
            values["is_best"] = text.lower().startswith("yes")
            if (imp := IMPROVED_FROM.search(text)) is not None:
                values["best_before_perplexity"] = num(imp.group(1))
        k += 1
    return values, k - i


def scan(lines: list[str]) -> list[Event]:
    """The Wanda-fork events of a console, in line order (empty for any other console)."""
    events: list[Event] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if (m := STEP_LINE.match(line)) is not None:
            events.append(Event("step", i, {"n": int(m.group("n")), "total": int(m.group("total")),
                                            "loss": num(m.group("loss")), "elapsed": seconds(m.group("time"))}))
        elif (m := EVAL_HEADER.match(line)) is not None:
            values, used = _eval_block(lines, i)
            events.append(Event("eval", i, {"step": int(m.group(1)), **values}))
            i += used
            continue
        elif (m := COMPLETED.match(line)) is not None:
            events.append(Event("completed", i, {"runtime": seconds(m.group(1)),
                                                 "steps": int(m.group(2)) if m.group(2) else None}))
        elif (m := FINAL_PPL.search(line)) is not None:
            events.append(Event("final_ppl", i, num(m.group(1))))
        elif (m := IMPROVED_LINE.search(line)) is not None:
            events.append(Event("improved", i, (num(m.group(1)), num(m.group(2)))))
        elif SUMMARY_HEADER.search(line):
            items: dict[str, str] = {}
            k = i + 1
            while k < len(lines) and (s := SUMMARY_ITEM.match(lines[k])) is not None:
                items[s.group(1).strip().lower()] = s.group(2)
                k += 1
            events.append(Event("summary", i, items))
            i = k
            continue
        i += 1
    return events


class WandaConsole:
    """The reader of this console. Its lines are folded with the Trainer dicts it also prints by the console
    reader it is given (`trainer_console.read_console`, whose fold calls `scan`)."""

    name = "wanda_console"
    kind = "console_log"
    describes = "the Wanda-fork LoRA console (`Step N/M ... | Loss:` lines, `Eval at step N:` blocks)"

    def detect(self, peek: Peek) -> float:
        if peek.binary or peek.path.suffix in (".json", ".jsonl"):
            return 0.0
        lines = peek.head.splitlines()
        hits = sum(1 for line in lines if STEP_LINE.match(line) or EVAL_HEADER.match(line) or FINAL_PPL.search(line))
        return 0.9 if hits >= 2 else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        return sorted(directory.glob("*.log"))

    def __init__(self, read_console: Callable[[Path, str], Source]) -> None:
        self._read_console = read_console

    def read(self, path: Path) -> Source:
        return self._read_console(path, self.name)
