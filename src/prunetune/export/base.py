"""What every export format is given and returns.

`run_export` loads the source once (`ExportSource`: the model, its tokenizer, the pattern from `prune.json`,
the matrices to export) and hands it to the format's `write`, which writes into a staging directory that is
published whole only when `write` returns. A format says which runtimes load its output today, so the console
and `export.json` never claim more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from prunetune.errors import UserError
from prunetune.rundir import MASKS_FILE, read_pruned
from prunetune.sparsity.patterns import parse_pattern

Log = Callable[[str], None]


@dataclass
class ExportSource:
    """The model to export, loaded once by `run_export`."""

    model_dir: Path
    model: Any
    """The Transformers model (in the requested dtype)."""
    tokenizer: Any
    pattern: str
    """The pattern `prune.json` records (unstructured without a record)."""
    linears: dict[str, nn.Linear]
    """The pruned matrices (the model's prunable linears less those prune.json lists as skipped)."""
    prune_summary: dict[str, Any]
    """What export.json repeats of prune.json."""


@dataclass
class Written:
    """What a format's `write` returns."""

    record: dict[str, Any]
    """Format-specific fields of export.json."""
    rows: list[tuple[str, int, int]] = field(default_factory=list)
    """(what, bytes before, bytes exported) for the console's size table."""
    verified: int = 0
    """Matrices read back from the written files and found identical to the source."""
    notes: list[str] = field(default_factory=list)
    """Lines the console prints after the table (what loads it, what was checked)."""


class ExportFormat(Protocol):
    name: str
    """The `--format` value."""
    runtimes: str
    """Which runtimes load this output today (dated, with the source), for the console and export.json."""

    def check(self, cfg: Any) -> None:
        """Refuse options this format cannot honour (a UserError), before any work."""
        ...

    def write(self, source: ExportSource, cfg: Any, staging: Path, log: Log) -> Written:
        """Write the export into the empty `staging` directory; verify what it wrote."""
        ...


def safetensors_bytes(directory: Path) -> int:
    """Bytes of a model directory's weight files (prunetune's masks file excluded)."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors") if p.name != MASKS_FILE)


def pattern_of(model_dir: Path) -> tuple[str, list[str], dict[str, Any]]:
    """(pattern name from prune.json, modules it lists as skipped, what export.json repeats of it); unstructured
    without a record."""
    info = read_pruned(model_dir)
    record = info.prune_json
    cfg = record.get("config", record) if isinstance(record.get("config", record), dict) else {}
    pattern = str(cfg.get("pattern") or record.get("pattern") or "unstructured")
    try:
        pattern = parse_pattern(pattern).name
    except ValueError:
        raise UserError(f"{model_dir}/prune.json names an unknown pattern {pattern!r}; re-run `prunetune prune`") from None
    skipped = [str(s) for s in record.get("skipped", []) if isinstance(s, str)]
    summary = {"base_model": info.base_model, "pruning": info.pruning, "overall": record.get("overall"),
               "pruned_perplexity": info.pruned_perplexity}
    return pattern, skipped, summary
