"""`prunetune monitor RUN_DIR`: flags from `MonitorConfig`, then `analysis.monitor.run_monitor`."""

from __future__ import annotations

import argparse

from prunetune.analysis.monitor import MonitorConfig, run_monitor
from prunetune.commands import flags
from prunetune.commands.flags import Flag


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, MonitorConfig, flags={"run_dir": Flag(names=("run_dir",))}, greedy=False)


def main(args: argparse.Namespace) -> int:
    run_monitor(flags.config_from_args(MonitorConfig, args, command="monitor"))
    return 0
