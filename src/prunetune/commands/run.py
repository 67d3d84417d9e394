"""`prunetune run pipeline.yaml [--stage NAME] [--out DIR] [--force] [--plan]`: the prune -> finetune -> merge ->
eval -> report job as one restartable command (flags from `RunConfig`)."""

from __future__ import annotations

import argparse

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.pipeline.config import STAGES
from prunetune.pipeline.job import RunConfig, run_from_file

FLAGS = {
    "pipeline": Flag(names=("pipeline",)),
    "stage": Flag(choices=STAGES),
    "out": Flag(metavar="DIR"),
    "data_dir": Flag(metavar="DIR"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, RunConfig, flags=FLAGS, greedy=False)


def main(args: argparse.Namespace) -> int:
    run_from_file(flags.config_from_args(RunConfig, args, command="run"))
    return 0
