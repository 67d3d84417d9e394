"""Several runs side by side: their loss curves overlaid (compare.png) and their results tabulated
(compare.md, compare.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune import rundir
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
    """Read every run, write compare.md/.json/.png into the output directory (staged, swapped in whole: a
    previous comparison there is replaced, anything else refused); returns compare.json's data."""
    first = cfg.runs[0]
    out = cfg.out or (first if first.is_dir() else first.parent).parent / "compare"
    flag = f"--out {out}" if cfg.out is not None else f"the default output directory {out}"
    if out.is_dir() and any(out.iterdir()) and not rundir.is_ours(out):
        raise UserError(f"{flag} already holds files prunetune did not write; pass --out DIR (a new or empty "
                        "directory): prunetune never overwrites your files")
    out = rundir.check_output(out, inputs=cfg.runs, overwrite=True)
    sources = [load_source(p) for p in cfg.runs]
    names = _names(cfg.runs)
    rows = []
    for name, src in zip(names, sources, strict=True):
        s = summarize(src.records)
        rows.append({"run": name, "path": str(src.path), **s.to_dict()})
    with rundir.staged_output(out, inputs=cfg.runs, overwrite=True, command="compare") as stage:
        return _write(stage, out, names, sources, rows)


def _write(stage: Path, out: Path, names: list[str], sources: list[Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    png = plots.plot_compare(list(zip(names, [s.records for s in sources], strict=True)), stage / "compare.png")
    table_rows = [[r["run"], str(r["steps"]), fmt_sig(r["final_perplexity"]), fmt_sig(r["best_perplexity"]),
                   str(r["best_step"]), fmt_sig(r["final_train_loss"]), hms(r["time_s"], "-"),
                   f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"] for r in rows]
    blocks = [("h1", "Run comparison"), ("table", list(COLUMNS), table_rows)]
    if png:
        blocks.append(("img", "Loss curves", png))
    (stage / "compare.md").write_text(render_markdown(blocks), encoding="utf-8")
    result = {"runs": rows, "table": [dict(zip(COLUMNS, r, strict=True)) for r in table_rows],
              "files": {"compare.md": str(out / "compare.md"), "compare.json": str(out / "compare.json"),
                        **({"compare.png": str(out / "compare.png")} if png else {})}}
    write_json(stage / "compare.json", result)
    return result
