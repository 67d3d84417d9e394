"""`prunetune monitor RUN_DIR`: live view of a training run from another terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunetune.analysis.monitor import MonitorConfig, run_monitor


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="the run directory (`prunetune finetune --out`)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit (scripts, tests)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")


def main(args: argparse.Namespace) -> int:
    run_monitor(MonitorConfig(run_dir=args.run_dir, once=args.once, interval=args.interval))
    return 0
