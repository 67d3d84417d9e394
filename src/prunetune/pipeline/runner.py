"""The stage runner (generic: knows nothing of pruning or LoRA): runs stages in order into one run directory and skips what is already done.

Each stage writes into `RUN/<stage>/` and keeps a `stage.json` there: its config fingerprint, the run ids of
the upstream results it was made from, and `complete: true` once it has finished. A stage is skipped when its
`stage.json` says complete with the same fingerprint and the same upstream run ids and its outputs exist; it
is re-run when its config (or an upstream stage's config) changed or an upstream stage was re-run. A stage
that was interrupted part-way re-runs from scratch, except a resumable one (fine-tuning) with checkpoints,
which continues from its latest checkpoint.

The fingerprint of a stage = hash(its own config, with run-directory paths made relative and the fields that
do not change the result left out, + the fingerprints of the stages it depends on). So changing the LoRA rank
changes finetune's fingerprint, hence eval's and report's, but not prune's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from prunetune import phases, rundir
from prunetune.errors import UserError
from prunetune.fmt import hms
from prunetune.oserrors import check_links
from prunetune.rundir import MARKER, PIPELINE_JSON, mark_ours
from prunetune.runinfo import provenance, write_json

STAGE_FILE = "stage.json"
PIPELINE_FILE = PIPELINE_JSON
PIPELINE_YAML = "pipeline.yaml"
COMMAND = "run"


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped early but cleanly (fine-tuning saved a checkpoint on SIGINT): not complete. A
    KeyboardInterrupt, so the pipeline stops and the CLI exits 130 as for Ctrl-C."""


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one pipeline run lives."""

    root: Path

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def pipeline_json(self) -> Path:
        return self.root / PIPELINE_FILE

    @property
    def pipeline_yaml(self) -> Path:
        return self.root / PIPELINE_YAML


@dataclass
class StageContext:
    """What a stage's `run` gets: where to write, whether to resume, and the upstream stages' results."""

    layout: RunLayout
    dir: Path
    resume: bool
    upstream: dict[str, dict[str, Any]]
    """stage name -> the `result` its stage.json recorded."""
    console: Console


@dataclass
class Stage:
    """One step of the pipeline: its built config and how to run and check it."""

    name: str
    deps: tuple[str, ...]
    title: str
    """What the stage does, one line, for the console."""
    config: Any
    """The stage's own config dataclass, fully built (paths absolute)."""
    run: Callable[[StageContext], dict[str, Any]]
    """Does the work; returns a JSON-able result recorded in stage.json (raise StageInterrupted if not done)."""
    outputs: tuple[str, ...] = ()
    """Files (relative to the stage dir) that must exist for a complete stage to count as done."""
    volatile: frozenset[str] = frozenset()
    """Config fields that do not change the result (where to write, resume switches, console verbosity)."""
    resumable: bool = False
    """Whether an interrupted run continues from its checkpoints (`checkpoint-*` in the stage dir)."""
    usable: Callable[[Path], str | None] | None = None
    """Why a complete stage's output can no longer be used (None: it can), asked of the stage's own records
    (fine-tuning: the result its records name is gone), beside the `outputs` that must exist."""

    def identity(self, layout: RunLayout) -> dict[str, Any]:
        """The config as fingerprinted: run-directory paths relative, volatile fields dropped."""
        raw = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else dict(self.config)
        return {k: _relative(v, layout.root) for k, v in raw.items() if k not in self.volatile}


def _relative(value: Any, root: Path) -> Any:
    """Paths inside the run directory written as `$RUN/...`, so moving the run directory changes nothing."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        base = str(root.resolve())
        if value == base or value.startswith(base + "/"):
            return "$RUN" + value[len(base):]
        return value
    if isinstance(value, Mapping):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v, root) for v in value]
    return value


def fingerprints(stages: list[Stage], layout: RunLayout) -> dict[str, str]:
    """Stage name -> fingerprint (own config + fingerprints of its dependencies)."""
    out: dict[str, str] = {}
    for stage in stages:
        blob = json.dumps(
            {"stage": stage.name, "config": stage.identity(layout), "deps": {d: out[d] for d in stage.deps}},
            sort_keys=True, default=str,
        )
        out[stage.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return out


def read_stage(stage_dir: Path) -> dict[str, Any] | None:
    """The stage.json of a stage directory; None when absent or unreadable (a crash mid-write)."""
    path = stage_dir / STAGE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def checkpoints(stage_dir: Path) -> list[Path]:
    """`checkpoint-N` directories, oldest first."""
    found = [p for p in stage_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


Kind = Literal["skip", "run", "resume"]


@dataclass(frozen=True)
class Action:
    kind: Kind
    reason: str


def _config_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any], limit: int = 3) -> str:
    if not old:
        return ""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return ""
    parts = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ": " + ", ".join(parts) + more


def decide(
    stage: Stage, layout: RunLayout, fingerprint: str, upstream_ids: dict[str, str | None], force: bool
) -> Action:
    """Skip, run or resume, and why (the reason is shown in the plan)."""
    stage_dir = layout.stage_dir(stage.name)
    state = read_stage(stage_dir)
    if state is None:
        return Action("run", "forced" if force else "not run yet")
    same_config = state.get("fingerprint") == fingerprint
    same_inputs = state.get("inputs", {}) == upstream_ids
    if force:
        return Action("run", "forced (--force)")
    if not same_config:
        own = _config_diff(state.get("config"), stage.identity(layout))
        return Action("run", f"config changed{own}" if own else "an upstream stage's config changed")
    if not same_inputs:
        return Action("run", "an upstream stage was re-run")
    if state.get("complete"):
        missing = [name for name in stage.outputs if not (stage_dir / name).exists()]
        if missing:
            return Action("run", f"outputs missing: {', '.join(missing)}")
        problem = stage.usable(stage_dir) if stage.usable is not None else None
        if problem:
            return Action("run", problem)
        return Action("skip", f"up to date (finished {state.get('finished', '?')})")
    if stage.resumable and checkpoints(stage_dir):
        return Action("resume", f"interrupted; resuming from {checkpoints(stage_dir)[-1].name}")
    return Action("run", "interrupted before it finished; starting it again")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class PipelineRun:
    """Runs a list of stages into a run directory; records everything in pipeline.json."""

    stages: list[Stage]
    layout: RunLayout
    console: Console
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra keys for pipeline.json (name, config file, data choice)."""

    def __post_init__(self) -> None:
        self.fps = fingerprints(self.stages, self.layout)
        self.by_name = {s.name: s for s in self.stages}

    def upstream_ids(self, stage: Stage) -> dict[str, str | None]:
        return {d: (read_stage(self.layout.stage_dir(d)) or {}).get("run_id") for d in stage.deps}

    def plan(self, only: str | None = None, force: bool = False) -> dict[str, Action]:
        """What a run would do now, stage by stage; downstream of a (re)run stage is run too."""
        actions: dict[str, Action] = {}
        for stage in self.stages:
            if only is not None and stage.name != only:
                continue
            action = decide(stage, self.layout, self.fps[stage.name], self.upstream_ids(stage), force)
            rerun_dep = next((d for d in stage.deps if d in actions and actions[d].kind != "skip"), None)
            if action.kind == "skip" and rerun_dep is not None:
                action = Action("run", f"{rerun_dep} runs first")
            actions[stage.name] = action
        return actions

    def check_dependencies(self, only: str) -> None:
        """`--stage NAME` runs one stage: its inputs must be complete and current."""
        stage = self.by_name[only]
        for dep in stage.deps:
            state = read_stage(self.layout.stage_dir(dep))
            action = decide(self.by_name[dep], self.layout, self.fps[dep], self.upstream_ids(self.by_name[dep]), False)
            if state is None or action.kind != "skip":
                raise UserError(
                    f"stage {only!r} needs {dep!r}, which is not up to date ({action.reason}); "
                    f"run `--stage {dep}` first, or run the whole pipeline without --stage"
                )

    def _previous(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.layout.pipeline_json.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _previous_status(self) -> dict[str, Any]:
        stages = self._previous().get("stages")
        return stages if isinstance(stages, dict) else {}

    def _record(self, status: dict[str, dict[str, Any]], results: dict[str, Any] | None = None) -> None:
        previous = self._previous()
        stages = {**previous.get("stages", {}), **status}
        doc = {
            **self.meta,
            "run_dir": str(self.layout.root),
            "updated": _now(),
            "order": [s.name for s in self.stages],
            "stages": {name: stages[name] for name in [s.name for s in self.stages] if name in stages},
            "results": results if results is not None else previous.get("results", {}),
            "provenance": self._provenance,
        }
        write_json(self.layout.pipeline_json, doc)

    def start(self) -> None:
        """Mark the directory as a pipeline run (its marker lists what the pipeline writes there, before it is
        written), then write pipeline.json."""
        self._provenance = provenance()
        rundir.claim(self.layout.root, [PIPELINE_FILE, PIPELINE_YAML, *(s.name for s in self.stages)], COMMAND)
        self._record({})

    def execute(self, only: str | None = None, force: bool = False) -> dict[str, dict[str, Any]]:
        """Run (or skip) each stage in order. Returns stage name -> its stage.json state."""
        if only is not None:
            if only not in self.by_name:
                raise UserError(f"unknown stage {only!r}; choose one of: {', '.join(self.by_name)}")
            self.check_dependencies(only)
        if not hasattr(self, "_provenance"):
            self.start()
        actions = self.plan(only, force)
        self.print_plan(actions)
        status: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Any]] = {}
        total = len(actions)
        for index, stage in enumerate(s for s in self.stages if s.name in actions):
            # Decide again right before running: an upstream stage that just ran has a new run id.
            action = decide(stage, self.layout, self.fps[stage.name], self.upstream_ids(stage), force)
            if action.kind == "skip" and actions[stage.name].kind != "skip":
                action = actions[stage.name]
                action = Action("run", action.reason)
            stage_dir = self.layout.stage_dir(stage.name)
            if action.kind == "skip":
                state = read_stage(stage_dir) or {}
                hint = "; --force re-runs it" if only is not None else ""
                self.console.print(f"[dim]━━ [{index + 1}/{total}] {stage.name}: skipped, {action.reason}{hint}[/]")
                status[stage.name] = {
                    "status": "skipped", "reason": action.reason, "fingerprint": self.fps[stage.name],
                    "seconds": state.get("seconds"), "finished": state.get("finished"),
                }
                states[stage.name] = state
                self._record(status)
                continue
            self.console.rule(f"[bold][{index + 1}/{total}] {stage.name}[/] — {stage.title}")
            self.console.print(f"[dim]{'resuming' if action.kind == 'resume' else 'running'}: {action.reason}[/]")
            states[stage.name] = self._run_stage(stage, action, status)
        return states

    def _run_stage(self, stage: Stage, action: Action, status: dict[str, dict[str, Any]]) -> dict[str, Any]:
        stage_dir = self.layout.stage_dir(stage.name)
        if action.kind == "run" and stage_dir.exists():
            self._clear(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        # Ours: the stage's engine writes its result here through `rundir.staged_output`, keeping stage.json.
        if not (stage_dir / MARKER).is_file():  # a resumed stage keeps its engine's marker
            mark_ours(stage_dir, COMMAND)
        previous = read_stage(stage_dir) or {}
        started = _now()
        state: dict[str, Any] = {
            "stage": stage.name,
            "fingerprint": self.fps[stage.name],
            "inputs": self.upstream_ids(stage),
            "config": stage.identity(self.layout),
            "complete": False,
            "started": previous.get("started", started) if action.kind == "resume" else started,
            "attempts": previous.get("attempts", 0) + 1,
        }
        write_json(stage_dir / STAGE_FILE, state)
        status[stage.name] = {"status": "running", "reason": action.reason, "fingerprint": self.fps[stage.name],
                              "started": started}
        self._record(status)
        upstream = {d: (read_stage(self.layout.stage_dir(d)) or {}).get("result", {}) for d in stage.deps}
        ctx = StageContext(self.layout, stage_dir, action.kind == "resume", upstream, self.console)
        t0 = time.perf_counter()
        try:
            result = stage.run(ctx)
        except (KeyboardInterrupt, StageInterrupted):
            status[stage.name].update(status="interrupted", seconds=round(time.perf_counter() - t0, 1))
            with contextlib.suppress(OSError):  # a full disk must not hide why the stage stopped
                self._record(status)
            how = "resumes from its last checkpoint" if stage.resumable else "starts it again"
            self.console.print(f"[yellow]Stage {stage.name} interrupted; running the same command again {how}.[/]")
            raise
        except BaseException:
            status[stage.name].update(status="failed", seconds=round(time.perf_counter() - t0, 1))
            with contextlib.suppress(OSError):
                self._record(status)
            raise
        seconds = round(time.perf_counter() - t0, 1)  # this attempt; a resumed stage's earlier ones are not counted
        missing = [name for name in stage.outputs if not (stage_dir / name).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
        state.update(complete=True, finished=_now(), seconds=seconds, run_id=uuid.uuid4().hex[:12], result=result)
        write_json(stage_dir / STAGE_FILE, state)
        status[stage.name].update(status="resumed" if action.kind == "resume" else "ran", seconds=seconds,
                                  finished=state["finished"])
        self._record(status)
        phases.boundary(f"stage-{stage.name}")
        self.console.print(f"[green]✅ {stage.name} done in {hms(seconds)}[/] → {stage_dir}")
        return state

    def _clear(self, stage_dir: Path) -> None:
        """Remove a stage's old outputs before re-running it: what its marker lists and the stage's record,
        nothing else (files a user put there stay). A stage directory without a marker is not the pipeline's."""
        if not rundir.staging.content(stage_dir):
            shutil.rmtree(stage_dir)
            return
        if not rundir.is_ours(stage_dir):
            raise UserError(
                f"{stage_dir} holds files prunetune did not write (no {MARKER}); move them away or choose another "
                "--out"
            )
        rundir.remove_ours(stage_dir, also=[STAGE_FILE])

    def print_plan(self, actions: dict[str, Action]) -> None:
        marks = {"skip": "[dim]skip[/]", "run": "[bold]run[/]", "resume": "[bold yellow]resume[/]"}
        table = Table(title="Plan", title_justify="left", show_edge=False, box=None, padding=(0, 2))
        for column in ("stage", "action", "why", "fingerprint"):
            table.add_column(column, style="dim" if column == "fingerprint" else None)
        for name, action in actions.items():
            table.add_row(name, marks[action.kind], action.reason, self.fps[name])
        self.console.print(table)

    def record_results(self, results: dict[str, Any]) -> None:
        self._record({}, results)


def check_run_dir(root: Path) -> None:
    """A run directory is empty, new, or one the pipeline made (its marker says so); never someone else's,
    whatever its files are called."""
    check_links(root, "--out")
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {str(root)!r} is a file; give a directory for the run")
    if not rundir.staging.content(root):
        return
    marker = rundir.staging.read_marker(root)
    if marker is None:
        raise UserError(f"{str(root)!r} is not empty and is not a prunetune run directory (no {MARKER}, the list of "
                        "the files prunetune wrote): its files are yours; choose another --out")
    if marker.get("command") != COMMAND:
        raise UserError(f"{str(root)!r} holds the output of `{marker.get('command')}`, not a pipeline run; choose "
                        "another --out")
