"""`prunetune prune`: flags from `PruneConfig`, then `engine.run_prune`."""

from __future__ import annotations

import argparse

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.pruning.config import METHODS, PruneConfig

FLAGS = {
    "method": Flag(choices=METHODS),
    "sequential": Flag(names=("--one-shot",), invert=True,
                       help="calibrate every layer on dense activations instead of the pruned previous layers"),
    "compare": Flag(choices=("row", "matrix", "band", "obs")),
    "data_dir": Flag(metavar="DIR"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, PruneConfig, flags=FLAGS)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    return flags.config_from_args(PruneConfig, args, command="prune")


def main(args: argparse.Namespace) -> int:
    from prunetune.pruning.engine import run_prune

    run_prune(config_from_args(args))
    return 0
