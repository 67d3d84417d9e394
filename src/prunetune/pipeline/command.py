"""`prunetune run pipeline.yaml [--stage NAME] [--out DIR] [--force]`: the prune -> finetune -> eval -> report
job as one restartable command. Stages already done with the same config are skipped, an interrupted
fine-tuning resumes from its last checkpoint, and a changed config re-runs exactly the stages it affects."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from prunetune.errors import UserError
from prunetune.pipeline.config import SCHEMAS, STAGES, PipelineConfig, load_pipeline
from prunetune.pipeline.stages import PipelineRun, RunLayout, Stage, check_run_dir, read_stage
from prunetune.pipeline.steps import DataChoice, build_stages, choose_data


@dataclass
class RunConfig:
    """One invocation of `prunetune run`."""

    pipeline: str
    """The pipeline YAML file."""
    out: str | None = None
    """Run directory; overrides the YAML's `out` (default runs/<name or file stem>)."""
    stage: str | None = None
    """Run only this stage (prune | finetune | eval | report); its inputs must be up to date."""
    force: bool = False
    """Re-run the selected stages even when they are up to date."""
    data_dir: str | None = None
    """Local data directory; overrides the YAML's data.data_dir."""
    plan: bool = False
    """Only print which stages would run or be skipped, and why; write nothing."""

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage not in STAGES:
            raise UserError(f"unknown --stage {self.stage!r}; choose one of: {', '.join(STAGES)}")


def default_out(cfg: PipelineConfig, source: str | None) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stem = cfg.name or (Path(source).stem if source else "pipeline")
    return Path("runs") / stem


def _plain(value: Any) -> Any:
    """YAML-safe: tuples as lists, paths as strings."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def resolved_yaml(cfg: PipelineConfig, root: Path, data: DataChoice, stages: list[Stage]) -> str:
    """The pipeline as it runs: every stage option with its default filled in, and the data actually used.
    It is itself a valid pipeline file (`prunetune run RUN/pipeline.yaml` reproduces the run)."""
    doc: dict[str, Any] = {
        "name": cfg.name, "model": cfg.model, "out": str(root),
        "data": {"dataset": data.dataset, "data_dir": data.data_dir, "fallback": cfg.data.fallback},
    }
    for stage in stages:
        owned = set(SCHEMAS[stage.name].owned)
        doc[stage.name] = {k: v for k, v in dataclasses.asdict(stage.config).items() if k not in owned}
    header = (f"# Resolved by prunetune run: every option with its value for this run (data: {data.reason}).\n"
              "# Editing a stage's options here and re-running re-runs that stage and the ones after it.\n")
    return header + yaml.safe_dump(_plain(doc), sort_keys=False, allow_unicode=True)


def perplexity_story(root: Path) -> dict[str, Any]:
    """dense -> pruned -> recovered perplexity, on the fine-tuning eval set (the numbers of the finetune
    console and the report) and on the held-out split of the eval stage; and where the report is."""
    story: dict[str, Any] = {}
    eval_result = (read_stage(root / "eval") or {}).get("result") or {}
    report_state = read_stage(root / "report") or {}
    report_result = report_state.get("result") or {}
    summary = report_result.get("summary") or {}
    same_set = eval_result.get("finetune_eval_set") or {}
    if summary.get("final_perplexity") is not None:
        story["finetune_eval_set"] = {
            **{k: same_set.get(k) for k in ("dataset", "split", "seqlen", "max_windows")},
            "dense": summary.get("dense_perplexity"), "pruned": summary.get("pruned_perplexity"),
            "recovered": summary.get("final_perplexity"),
        }
    test = eval_result.get("test") or {}
    if test:
        story["test"] = {
            **{k: test.get(k) for k in ("dataset", "split", "seqlen", "max_windows")},
            **{m: (test.get(m) or {}).get("perplexity") for m in ("dense", "pruned", "recovered")},
        }
    if report_state.get("complete"):
        files = report_result.get("files") or {}
        story["report"] = files.get("report.html") or str(root / "report")
        story["rating"] = report_result.get("rating")
    return story


def fmt_ppl(value: Any) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-" if value is None else str(value)
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def print_story(console: Console, story: dict[str, Any]) -> None:
    rows = [("fine-tuning eval set", story.get("finetune_eval_set")), ("held-out test", story.get("test"))]
    rows = [(label, r) for label, r in rows if r]
    if rows:
        table = Table(title="Perplexity (lower is better)", title_justify="left", show_edge=False)
        for column in ("measured on", "data", "dense", "pruned", "recovered"):
            table.add_column(column, justify="right" if column in ("dense", "pruned", "recovered") else "left")
        for label, r in rows:
            windows = f"{r['max_windows']} x {r['seqlen']} tokens" if r.get("max_windows") else f"seqlen {r.get('seqlen')}"
            table.add_row(label, f"{r.get('dataset')}/{r.get('split')}, {windows}", fmt_ppl(r.get("dense")),
                          f"[red]{fmt_ppl(r.get('pruned'))}[/]", f"[bold green]{fmt_ppl(r.get('recovered'))}[/]")
        console.print(table)
        label, r = rows[0]  # the report's numbers (and its rating) lead; the held-out row is the cross-check
        dense, pruned, recovered = r.get("dense"), r.get("pruned"), r.get("recovered")
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (dense, pruned, recovered)):
            console.print(
                f"[bold]dense {fmt_ppl(dense)} → pruned {fmt_ppl(pruned)} → recovered {fmt_ppl(recovered)}[/] "
                f"({label}): the recovered model is {recovered / dense:.2f}x the dense perplexity"
                # In loss terms (log perplexity): on a linear scale 49,090 -> 7,689 would read as "84% recovered".
                # The share means something only when pruning opened a real gap.
                + (f"; LoRA closed {math.log(pruned / recovered) / math.log(pruned / dense):.0%} of the loss gap "
                   "pruning opened" if pruned > 1.05 * dense and recovered > 0 else "")
                + (f"; rating: {story['rating']}" if story.get("rating") else "")
            )
    if "report" in story:
        console.print(f"[bold]Report:[/] {story['report']}")


def print_timings(console: Console, root: Path, stages: list[Stage]) -> None:
    table = Table(title="Stages", show_edge=False)
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    table.add_column("fingerprint")
    for stage in stages:
        state = read_stage(root / stage.name) or {}
        seconds = state.get("seconds")
        table.add_row(
            stage.name, "complete" if state.get("complete") else "not complete",
            f"{seconds:.0f}s" if isinstance(seconds, (int, float)) else "-", str(state.get("fingerprint", "-")),
        )
    console.print(table)


def make_console() -> Console:
    """Rich console; when piped to a file, 120 columns instead of 80 so the tables do not wrap."""
    return Console() if sys.stdout.isatty() else Console(width=120)


def run_pipeline(
    cfg: PipelineConfig,
    out: str | Path,
    stage: str | None = None,
    force: bool = False,
    console: Console | None = None,
    source: str | None = None,
    plan_only: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the pipeline into `out`. Returns the perplexity story (dense/pruned/recovered, report).
    `plan_only`: print what would run and why, write nothing."""
    console = console or make_console()
    root = Path(out).expanduser().resolve()
    check_run_dir(root)
    data = choose_data(cfg.data.dataset, cfg.data.data_dir, cfg.data.fallback)
    layout = RunLayout(root)
    stages = build_stages(cfg, layout, data)

    console.rule(f"[bold]prunetune run[/] {cfg.name or source or ''}")
    console.print(f"  model   {cfg.model}")
    console.print(f"  data    {data.reason}")
    if data.note:
        console.print(f"  [yellow]note:[/] {data.note}")
    console.print(f"  run dir {root}")
    meta = {
        "name": cfg.name, "config_file": str(Path(source).resolve()) if source else None, "model": cfg.model,
        "data": dataclasses.asdict(data),
    }
    runner = PipelineRun(stages, layout, console, meta)
    if plan_only:
        runner.print_plan(runner.plan(stage, force))
        return perplexity_story(root)
    if stage is not None:
        runner.check_dependencies(stage)  # before anything is written
    root.mkdir(parents=True, exist_ok=True)
    runner.start()
    layout.pipeline_yaml.write_text(resolved_yaml(cfg, root, data, stages))
    runner.execute(only=stage, force=force)
    story = perplexity_story(root)
    runner.record_results(story)
    console.rule("[bold]Done[/]")
    print_timings(console, root, stages)
    print_story(console, story)
    console.print(f"Run directory: {root} (pipeline.json records stages, fingerprints, timings)")
    return story


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML file (see configs/demo-cpu.yaml)")
    parser.add_argument("--stage", choices=list(STAGES), help="run only this stage; its inputs must be up to date")
    parser.add_argument("--out", help="run directory (default: the YAML's `out`, else runs/<name>)")
    parser.add_argument("--force", action="store_true", help="re-run the selected stages even when up to date")
    parser.add_argument("--data-dir", help="local data directory (overrides data.data_dir and PRUNETUNE_DATA_DIR)")
    parser.add_argument("--plan", action="store_true", help="only show which stages would run or be skipped, and why")


def main(args: argparse.Namespace) -> int:
    rc = RunConfig(pipeline=args.pipeline, out=args.out, stage=args.stage, force=args.force, data_dir=args.data_dir,
                   plan=args.plan)
    cfg = load_pipeline(rc.pipeline)
    if rc.data_dir is not None:
        cfg.data.data_dir = rc.data_dir
    out = Path(rc.out) if rc.out else default_out(cfg, rc.pipeline)
    run_pipeline(cfg, out, stage=rc.stage, force=rc.force, source=rc.pipeline, plan_only=rc.plan)
    return 0
