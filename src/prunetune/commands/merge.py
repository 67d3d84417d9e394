"""`prunetune merge`: flags from `MergeConfig`, then `merge.run_merge` (fold a LoRA adapter into its pruned
base, keeping the pruned pattern)."""

from __future__ import annotations

import argparse

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.merge import MergeConfig, run_merge

FLAGS = {
    "adapter": Flag(metavar="DIR"),
    "out": Flag(metavar="DIR"),
    "model": Flag(metavar="DIR"),
    "data_dir": Flag(metavar="DIR"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, MergeConfig, flags=FLAGS)


def main(args: argparse.Namespace) -> int:
    run_merge(flags.config_from_args(MergeConfig, args, command="merge"))
    return 0
