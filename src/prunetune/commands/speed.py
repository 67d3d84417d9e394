"""`prunetune speed MODEL_DIR [--dense MODEL] [--batch 1] [--seqlen 128] [--device cpu|cuda]`: flags from
`SpeedConfig`, then `speed.run_speed`; prints tokens/s and weight memory of each variant and the break-even."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.fmt import fmt_num
from prunetune.speed import SpeedConfig, run_speed, speedup_table

FLAGS = {
    "model_dir": Flag(names=("model_dir",), metavar="MODEL_DIR"),
    "dense": Flag(metavar="MODEL"),
    "batch": Flag(metavar="N,N"),
    "device": Flag(choices=("cpu", "cuda")),
    "out": Flag(metavar="FILE"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, SpeedConfig, flags=FLAGS, greedy=False)


def main(args: argparse.Namespace) -> int:
    console = Console() if Console().is_terminal else Console(width=140)
    result = run_speed(flags.config_from_args(SpeedConfig, args, command="speed"), log=console.print)
    table = Table(title=f"Speed on {result.device}, {result.dtype} (pattern {result.pattern}, sparse kernel {result.kernel})")
    for column in ("variant", "batch", "forward tok/s", "vs first", "generate tok/s", "vs first", "weights MiB", "note"):
        table.add_column(column, justify="left" if column in ("variant", "note") else "right")
    for row in speedup_table(result):
        table.add_row(row["variant"], str(row["batch"]), fmt_num(row["forward_tokens_per_s"], ",.0f", "-"),
                      fmt_num(row["forward_x"], ".2f", "-"), fmt_num(row["generate_tokens_per_s"], ",.1f", "-"),
                      fmt_num(row["generate_x"], ".2f", "-"), fmt_num(row["weight_mib"], ",.1f"), row.get("note") or "")
    console.print(table)
    for point in result.breakeven:
        even = point.get("breakeven_sparsity")
        shape = "x".join(map(str, point.get("shape", [])))
        console.print(f"16x16 BSR vs dense matmul, {shape} weight x {point.get('tokens')} tokens: "
                      + (f"break-even at {even:.0%} sparsity" if isinstance(even, (int, float))
                         else "no break-even in the measured range (BSR slower at every sparsity)"))
    console.print("Serving runtimes (vLLM, llama.cpp) multiply the pruned zeros like any other weight: expect the "
                  "speed of the `pruned (dense kernels)` row there (vLLM CPU measured dense vs pruned: "
                  "bench/RESULTS.md, section runtimes).")
    return 0
