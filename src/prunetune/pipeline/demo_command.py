"""`prunetune demo [--quick] [--out DIR]`: the main job end to end on SmolLM2-135M, offline, on a CPU."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from prunetune.pipeline.demo import run_demo


@dataclass
class DemoConfig:
    """One invocation of `prunetune demo`."""

    quick: bool = False
    """The smoke-test sizes (under 3 minutes) instead of the full demo (~15 minutes)."""
    out: str | None = None
    """Run directory (default runs/demo, or runs/demo-quick)."""
    data_dir: str | None = None
    """Local data directory holding WikiText-2 (else $PRUNETUNE_DATA_DIR; without one: wikipedia-vital)."""
    force: bool = False
    """Re-run every stage even when it is up to date."""
    model: str | None = None
    """Replace SmolLM2-135M (for tests on a tiny model); not shown in --help."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, under 3 minutes")
    parser.add_argument("--out", help="run directory (default runs/demo or runs/demo-quick)")
    parser.add_argument("--data-dir", help="directory with a local WikiText-2 copy (default: $PRUNETUNE_DATA_DIR)")
    parser.add_argument("--force", action="store_true", help="re-run every stage, even the finished ones")
    parser.add_argument("--model", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    cfg = DemoConfig(quick=args.quick, out=args.out, data_dir=args.data_dir, force=args.force, model=args.model)
    run_demo(quick=cfg.quick, out=cfg.out, data_dir=cfg.data_dir, force=cfg.force, model=cfg.model)
    return 0
