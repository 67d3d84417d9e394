"""`prunetune report SOURCE`: plots and diagnosis of a run directory, trainer_state.json or console log."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunetune.analysis.report import ReportConfig, render_console, run_report
from prunetune.analysis.sources import SOURCE_KINDS
from prunetune.analysis.thresholds import parse_threshold_flags
from prunetune.analysis.verdicts import BAND_PRESETS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path,
                        help="run directory (metrics.jsonl / trainer_state.json / train.log), a trainer_state.json, "
                             "or the console log of any Transformers Trainer run")
    parser.add_argument("--out", type=Path, help="output directory (default: SOURCE_DIR/report)")
    parser.add_argument("--dense-ppl", type=float, help="dense model perplexity, for the relative rating")
    parser.add_argument("--pruned-ppl", type=float, help="pruned model perplexity before recovery")
    parser.add_argument("--bands", choices=BAND_PRESETS, default="relative",
                        help="perplexity bands: relative to the dense model (default) or absolute Llama-2-7B")
    parser.add_argument("--source-kind", choices=SOURCE_KINDS,
                        help="in a directory, read this source instead of the richest one")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a diagnosis threshold (fields of prunetune.analysis.rules.Thresholds)")


def main(args: argparse.Namespace) -> int:
    cfg = ReportConfig(source=args.source, out=args.out, dense_ppl=args.dense_ppl, pruned_ppl=args.pruned_ppl,
                       bands=args.bands, prefer=args.source_kind, thresholds=parse_threshold_flags(args.threshold, "--threshold"))
    data = run_report(cfg)
    print(render_console(data))
    print(f"Report: {data['files']['report.md']} | {data['files']['report.html']} | {data['files']['report.json']}")
    return 0
