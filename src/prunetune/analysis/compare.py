"""Several runs side by side: their loss curves overlaid (compare.png) and their results tabulated
(compare.md, compare.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.analysis import plots
from prunetune.analysis.report import render_markdown
from prunetune.analysis.sources import load_source
from prunetune.analysis.summary import summarize
from prunetune.errors import UserError
from prunetune.fmt import fmt_sig, hms
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
    table_rows = [[r["run"], str(r["steps"]), fmt_sig(r["final_perplexity"]), fmt_sig(r["best_perplexity"]),
                   str(r["best_step"]), fmt_sig(r["final_train_loss"]), hms(r["time_s"], "-"),
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
