"""`prunetune compare RUN_A RUN_B ...`: overlay the loss curves of several runs and tabulate their results."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prunetune.analysis.compare import COLUMNS, CompareConfig, run_compare


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, trainer_state.json files or logs")
    parser.add_argument("--out", type=Path, help="output directory (default: compare/ beside the first run)")


def main(args: argparse.Namespace) -> int:
    result = run_compare(CompareConfig(runs=tuple(args.runs), out=args.out))
    table = Table(title="Runs")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in result["table"]:
        table.add_row(*row.values())
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or file has no width; do not squeeze run names into "…"
    console.print(table)
    console.print(" | ".join(result["files"].values()))
    return 0
