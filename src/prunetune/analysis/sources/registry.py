"""The log formats `prunetune report`, `monitor` and `compare` read: one reader per format, richest first (in a
run directory the first reader that finds usable records wins).

A new format is one module with a `LogReader` (`base.py`) and one line here.
"""

from __future__ import annotations

from prunetune.analysis.sources import (
    jsonl_metrics,
    keyed_lines,
    llamafactory,
    metrics_jsonl,
    prunetune_console,
    trainer_console,
    trainer_state,
    wanda_console,
)
from prunetune.analysis.sources.base import LogReader

READERS: list[LogReader] = [
    metrics_jsonl.MetricsJsonl(),
    prunetune_console.PrunetuneConsole(),
    trainer_state.TrainerState(),
    llamafactory.TrainerLog(),
    jsonl_metrics.JsonlMetrics(),
    wanda_console.WandaConsole(trainer_console.read_console),
    trainer_console.TrainerConsole(),
    keyed_lines.KeyedLines(),
]


def source_kinds() -> tuple[str, ...]:
    """The `--source-kind` choices: the kinds the registered readers offer, in registry order."""
    return tuple(dict.fromkeys(reader.kind for reader in READERS))
