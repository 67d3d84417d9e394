"""`prunetune export MODEL_DIR --out DIR [--format compressed-tensors]`: flags from `ExportConfig`, then
`export.export_compressed`; prints the sizes dense vs compressed."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.export import COMPRESSORS, FORMATS, ExportConfig, export_compressed

FLAGS = {
    "model_dir": Flag(names=("model_dir",), metavar="MODEL_DIR"),
    "out": Flag(metavar="DIR"),
    "format": Flag(choices=FORMATS),
    "compressor": Flag(choices=COMPRESSORS),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, ExportConfig, flags=FLAGS, greedy=False)


def main(args: argparse.Namespace) -> int:
    console = Console()
    result = export_compressed(flags.config_from_args(ExportConfig, args, command="export"), log=console.print)
    mib = 1 << 20
    table = Table(title=f"Export ({result.compressor}, pattern {result.pattern}, {result.sparsity:.1%} zeros)")
    for column in ("", "dense", "compressed", "ratio"):
        table.add_column(column, justify="right" if column else "left")
    for label, dense, packed in (("whole model", result.dense_bytes, result.compressed_bytes),
                                 (f"{result.matrices} pruned matrices", result.linear_dense_bytes,
                                  result.linear_compressed_bytes)):
        table.add_row(label, f"{dense / mib:,.1f} MiB", f"{packed / mib:,.1f} MiB", f"{packed / dense:.2f}x" if dense else "-")
    console.print(table)
    console.print(f"{result.verified} matrices decompressed by compressed-tensors and bit-identical; wrote {result.out}")
    return 0
