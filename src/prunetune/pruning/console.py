"""What `prune` shows: the progress bar and the sparsity table, rendered from the prune.json records."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from prunetune.architecture import module_type


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def sparsity_table(matrices: dict[str, dict[str, Any]]) -> Table:
    """Per module type and overall: target and achieved sparsity, rendered from the prune.json records."""
    zeros: dict[str, float] = defaultdict(float)
    target: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for name, rec in matrices.items():
        kind = module_type(name)
        numel = rec["shape"][0] * rec["shape"][1]
        zeros[kind] += rec["achieved"] * numel
        target[kind] += rec["target"] * numel
        total[kind] += numel
        counts[kind] += 1
    table = Table(title="Sparsity by module type")
    for col in ("module", "matrices", "params", "target", "achieved"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for kind in total:
        table.add_row(kind, str(counts[kind]), f"{total[kind]:,}", f"{target[kind] / total[kind]:.2%}",
                      f"{zeros[kind] / total[kind]:.2%}")
    all_total = sum(total.values()) or 1
    table.add_row("[bold]overall", str(len(matrices)), f"{sum(total.values()):,}",
                  f"{sum(target.values()) / all_total:.2%}", f"[bold]{sum(zeros.values()) / all_total:.2%}")
    return table


def memory_line(memory: dict[str, Any]) -> str:
    """The memory the run took, from prune.json's `memory` record: what the model added to the process."""
    share = memory["model_share_of_weights"]
    return (f"Memory: peak RSS {memory['peak_rss_mib']:,.0f} MiB, {memory['rss_before_model_mib']:,.0f} MiB before the "
            f"model loaded: the model took {memory['model_mib']:,.0f} MiB = {share:.0%} of its "
            f"{memory['weight_mib']:,.0f} MiB of weights ({memory['weights']})")
