"""`prunetune export MODEL_DIR --out DIR [--format NAME]`: flags from `ExportConfig`, then `export.run.run_export`;
prints the sizes before and after, what was verified, and which runtimes load the output today."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.export import registry
from prunetune.export.compressed_tensors import COMPRESSORS
from prunetune.export.gguf import GGUF_TYPES
from prunetune.export.run import ExportConfig, run_export

FLAGS = {
    "model_dir": Flag(names=("model_dir",), metavar="MODEL_DIR"),
    "out": Flag(metavar="DIR"),
    "compressor": Flag(choices=COMPRESSORS),
    "gguf_type": Flag(choices=GGUF_TYPES),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # The format choices are read when the parser is built, not when this module is imported: a format
    # registered later (a plugin, a test) is a valid --format.
    formats = {"format": Flag(choices=registry.names())}
    flags.add_config_flags(parser, ExportConfig, flags={**FLAGS, **formats}, greedy=False)


def main(args: argparse.Namespace) -> int:
    console = Console()
    result = run_export(flags.config_from_args(ExportConfig, args, command="export"), log=console.print)
    mib = 1 << 20
    table = Table(title=f"Export ({result.format}, pattern {result.pattern}, {result.sparsity:.1%} zeros)")
    for column in ("", "before", "exported", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for label, before, after in result.rows:
        table.add_row(label, f"{before / mib:,.1f} MiB", f"{after / mib:,.1f} MiB", f"{after / before:.2f}x" if before else "-")
    console.print(table)
    for note in result.notes:
        console.print(note)
    console.print(f"Wrote {result.out}")
    return 0
