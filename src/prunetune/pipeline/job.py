"""One pipeline job: `run_pipeline` chooses the data, builds the stages, takes the run directory's lock (one
writer per run directory), records the resolved YAML, runs the stages and prints the summary. `prunetune run`
and `prunetune demo` both call it."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from prunetune import rundir
from prunetune.errors import UserError
from prunetune.oserrors import check_links, user_error
from prunetune.pipeline.config import SCHEMAS, STAGES, PipelineConfig, load_pipeline
from prunetune.pipeline.runner import PipelineRun, RunLayout, Stage, check_run_dir
from prunetune.pipeline.stages import DataChoice, build_stages, choose_data
from prunetune.pipeline.summary import perplexity_story, print_story, print_timings
from prunetune.rundir import run_lock
from prunetune.runinfo import write_text


@dataclass
class RunConfig:
    """One invocation of `prunetune run`."""

    pipeline: str
    """The pipeline YAML file (see configs/demo-cpu.yaml)."""
    out: str | None = None
    """Run directory; overrides the YAML's `out` (default runs/<name or file stem>)."""
    stage: str | None = None
    """Run only this stage (prune | finetune | merge | eval | report | export); its inputs must be up to date."""
    force: bool = False
    """Re-run the selected stages even when they are up to date."""
    data_dir: str | None = None
    """Local data directory; overrides the YAML's data.data_dir and $PRUNETUNE_DATA_DIR."""
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
    for name, on in cfg.enabled.items():
        doc[name] = {"enabled": on, **doc.get(name, {})}
    header = (f"# Resolved by prunetune run: every option with its value for this run (data: {data.reason}).\n"
              "# Editing a stage's options here and re-running re-runs that stage and the ones after it.\n")
    return header + yaml.safe_dump(_plain(doc), sort_keys=False, allow_unicode=True)


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
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the pipeline into `out`. Returns the perplexity story (dense/pruned/recovered, report).
    `plan_only`: print what would run and why, write nothing. `notes`: more to record in pipeline.json."""
    console = console or make_console()
    root = check_links(Path(out).expanduser(), "--out").resolve()
    check_run_dir(root)
    if not plan_only:
        rundir.check_writable(root)  # a read-only or forbidden place: refused before any data is loaded
    if stage is not None and stage not in cfg.stages:
        raise UserError(f"--stage {stage} is not part of this pipeline (stages: {', '.join(cfg.stages)}); "
                        f"set {stage}.enabled: true in the YAML")
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
        "data": dataclasses.asdict(data), **(notes or {}),
    }
    runner = PipelineRun(stages, layout, console, meta)
    if plan_only:
        runner.print_plan(runner.plan(stage, force))
        return perplexity_story(root)
    if stage is not None:
        runner.check_dependencies(stage)  # before anything is written
    with run_lock(root, "run", log=console.print):
        try:
            runner.start()
            write_text(layout.pipeline_yaml, resolved_yaml(cfg, root, data, stages))
            runner.execute(only=stage, force=force)
            story = perplexity_story(root)
            runner.record_results(story)
        except (OSError, RuntimeError, MemoryError) as err:
            translated = user_error(err, f"running the pipeline in {root}", root,
                                    "every stage's output is complete or absent; once that is fixed, run the same "
                                    "command again: finished stages are skipped")
            if translated is None:
                raise
            raise translated from None
    console.rule("[bold]Done[/]")
    print_timings(console, root, stages)
    print_story(console, story)
    console.print(f"Run directory: {root} (pipeline.json records stages, fingerprints, timings)")
    return story


def run_from_file(rc: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """`prunetune run`: load the YAML, apply the command-line overrides, run."""
    cfg = load_pipeline(rc.pipeline)
    if rc.data_dir is not None:
        cfg.data.data_dir = rc.data_dir
    out = Path(rc.out) if rc.out else default_out(cfg, rc.pipeline)
    return run_pipeline(cfg, out, stage=rc.stage, force=rc.force, console=console, source=rc.pipeline,
                        plan_only=rc.plan)
