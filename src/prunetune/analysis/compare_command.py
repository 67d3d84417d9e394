"""`prunetune compare RUN_A RUN_B ...`: overlay the loss curves of several runs and tabulate their results."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prunetune.analysis import plots
from prunetune.analysis.report import render_markdown
from prunetune.analysis.sources import load_source
from prunetune.analysis.summary import fmt_duration, fmt_num, summarize
from prunetune.errors import UserError
from prunetune.runinfo import write_json

COLUMNS = ("run", "steps", "final ppl", "best ppl", "best step", "final train loss", "time", "tokens/s")


@dataclass(frozen=True)
class CompareConfig:
    """Runs to put side by side."""

    runs: tuple[Path, ...]
    """Run directories, trainer_state.json files or console logs (anything `prunetune report` reads)."""
    out: Path | None = None
    """Output directory for compare.png/.md/.json; default `compare/` beside the first run."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "runs", tuple(Path(r) for r in self.runs))
        if len(self.runs) < 1:
            raise UserError("compare needs at least one run; pass RUN_A RUN_B ...")
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))


def _names(paths: tuple[Path, ...]) -> list[str]:
    # a directory is known by its name; a file by its directory (console.log files all share one name)
    names = [p.name if p.is_dir() else f"{p.parent.name}/{p.name}" for p in paths]
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return unique


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    sources = [load_source(p) for p in cfg.runs]
    names = _names(cfg.runs)
    rows = []
    for name, src in zip(names, sources, strict=True):
        s = summarize(src.records)
        rows.append({"run": name, "path": str(src.path), **s.to_dict()})
    first = cfg.runs[0]
    out = cfg.out or (first if first.is_dir() else first.parent).parent / "compare"
    out.mkdir(parents=True, exist_ok=True)
    png = plots.plot_compare(list(zip(names, [s.records for s in sources], strict=True)), out / "compare.png")
    table_rows = [[r["run"], str(r["steps"]), fmt_num(r["final_perplexity"]), fmt_num(r["best_perplexity"]),
                   str(r["best_step"]), fmt_num(r["final_train_loss"]), fmt_duration(r["time_s"]),
                   f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"] for r in rows]
    blocks = [("h1", "Run comparison"), ("table", list(COLUMNS), table_rows)]
    if png:
        blocks.append(("img", "Loss curves", png))
    (out / "compare.md").write_text(render_markdown(blocks), encoding="utf-8")
    result = {"runs": rows, "table": [dict(zip(COLUMNS, r, strict=True)) for r in table_rows],
              "files": {"compare.md": str(out / "compare.md"), "compare.json": str(out / "compare.json"),
                        **({"compare.png": str(png)} if png else {})}}
    write_json(out / "compare.json", result)
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, trainer_state.json files or logs")
    parser.add_argument("--out", type=Path, help="output directory (default: compare/ beside the first run)")


def main(args: argparse.Namespace) -> int:
    result = run_compare(CompareConfig(runs=tuple(args.runs), out=args.out))
    table = Table(title="Runs")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "run" else "right")
    for row in result["table"]:
        table.add_row(*row.values())
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or file has no width; do not squeeze run names into "…"
    console.print(table)
    console.print(" | ".join(result["files"].values()))
    return 0
