"""A prunetune `train.log`: rendered from the `metrics.jsonl` beside it (`prunetune.finetune.console`), so it is
read through those records, never parsed as text of its own."""

from __future__ import annotations

import re
from pathlib import Path

from prunetune.analysis.sources.base import Peek, Source
from prunetune.analysis.sources.metrics_jsonl import NAME, MetricsJsonl

TRAIN_LOG = "train.log"
_TRAINER_DICT = re.compile(r"""\{\s*['"](?:eval_)?loss['"]\s*:""")


class PrunetuneConsole:
    name = "prunetune_console"
    kind = "console_log"
    describes = "a prunetune train.log (read through the metrics.jsonl beside it)"

    def detect(self, peek: Peek) -> float:
        # a train.log with no Trainer log dict in it, next to a metrics.jsonl
        ours = peek.path.name == TRAIN_LOG and (peek.path.parent / NAME).is_file()
        return 0.95 if ours and not _TRAINER_DICT.search(peek.head) else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        ours = (directory / TRAIN_LOG).is_file() and (directory / NAME).is_file()
        return [directory / TRAIN_LOG] if ours else []

    def read(self, path: Path) -> Source:
        src = MetricsJsonl().read(path.parent / NAME)
        src.meta["notes"].append(f"read {NAME}, the record {path.name} is rendered from")
        return src
