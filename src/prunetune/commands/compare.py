"""`prunetune compare RUN_A RUN_B ...`: flags from `CompareConfig`, then `analysis.compare.run_compare`; prints
the table."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunetune.analysis.compare import COLUMNS, CompareConfig, run_compare
from prunetune.commands import flags
from prunetune.commands.flags import Flag

FLAGS = {"runs": Flag(names=("runs",), nargs="+"), "out": Flag(metavar="DIR")}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, CompareConfig, flags=FLAGS, greedy=False)


def main(args: argparse.Namespace) -> int:
    result = run_compare(flags.config_from_args(CompareConfig, args, command="compare"))
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
