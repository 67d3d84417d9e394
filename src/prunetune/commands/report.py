"""`prunetune report SOURCE`: flags from `ReportConfig`, then `analysis.report.run_report`."""

from __future__ import annotations

import argparse

from prunetune.analysis.report import ReportConfig, render_console, run_report
from prunetune.analysis.sources import SOURCE_KINDS
from prunetune.analysis.thresholds import parse_threshold_flags
from prunetune.analysis.verdicts import BAND_PRESETS
from prunetune.commands import flags
from prunetune.commands.flags import Flag

FLAGS = {
    "source": Flag(names=("source",)),
    "out": Flag(metavar="DIR"),
    "bands": Flag(choices=BAND_PRESETS),
    "prefer": Flag(names=("--source-kind", "--source_kind"), choices=SOURCE_KINDS),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    flags.add_config_flags(parser, ReportConfig, flags=FLAGS, skip=("thresholds",), greedy=False)
    parser.add_argument("--threshold", dest="threshold_flags", action="append", default=[], metavar="NAME=VALUE",
                        help="override a diagnosis threshold (fields of prunetune.analysis.thresholds.Thresholds)")


def main(args: argparse.Namespace) -> int:
    extra = {"thresholds": parse_threshold_flags(args.threshold_flags, "--threshold")}
    data = run_report(flags.config_from_args(ReportConfig, args, command="report", extra=extra))
    print(render_console(data))
    print(f"Report: {data['files']['report.md']} | {data['files']['report.html']} | {data['files']['report.json']}")
    return 0
