"""`prunetune evaluate`: flags from `EvalConfig`, then `evaluate.run_evaluate` (perplexity, printed and as JSON)."""

from __future__ import annotations

import argparse

from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.evaluate import EvalConfig, run_evaluate

FLAGS = {
    "split": Flag(help="train | validation | test"),
    "data_dir": Flag(metavar="DIR", help="local data directory (repeatable; else $PRUNETUNE_DATA_DIR)"),
    "adapter": Flag(metavar="DIR"),
    "out": Flag(metavar="FILE"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, EvalConfig, flags=FLAGS, skip=("quiet",))


def main(args: argparse.Namespace) -> int:
    run_evaluate(flags.config_from_args(EvalConfig, args, command="evaluate"))
    return 0
