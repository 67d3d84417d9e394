"""`prunetune demo [--quick] [--out DIR]`: the main job end to end on SmolLM2-135M, offline, on a CPU (flags from
`DemoConfig`)."""

from __future__ import annotations

import argparse

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.pipeline.demo import DemoConfig, run_demo

FLAGS = {
    "out": Flag(metavar="DIR"),
    "data_dir": Flag(metavar="DIR"),
    "model": Flag(hidden=True),
    "fit": Flag(names=("--full-size",), invert=True,
                help="run the full demo sizes even where they take longer than ~15 minutes (a slow CPU)."),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, DemoConfig, flags=FLAGS, greedy=False)


def main(args: argparse.Namespace) -> int:
    run_demo(flags.config_from_args(DemoConfig, args, command="demo"))
    return 0
