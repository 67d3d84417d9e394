"""`prunetune verify DIR`: the CLI face of `pruning.verify.verify_dir` (exit 0 ok, 1 violation, 2 unreadable)."""

from __future__ import annotations

import argparse

from rich.console import Console

from prunetune.pruning.verify import verify_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="pruned model directory written by `prunetune prune` (or `merge`, a pipeline's merge/)")


def main(args: argparse.Namespace) -> int:
    console = Console()
    result = verify_dir(args.dir)
    if result.ok:
        console.print(f"[green]✅ {args.dir}: {result.checked} matrices match their masks and pattern")
        return 0
    console.print(f"[red]❌ {args.dir}: {len(result.problems)} of {result.checked} matrices fail verification")
    for name, issues in list(result.problems.items())[:50]:
        for issue in issues:
            console.print(f"  {name}: {issue}")
    return 1
