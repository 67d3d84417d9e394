"""The stage runner's skip / re-run / resume decisions, on stand-in stages that write small files (no model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console

from prunetune.errors import UserError
from prunetune.pipeline.runner import PipelineRun, RunLayout, Stage, StageContext, check_run_dir, fingerprints


@dataclass
class Knobs:
    value: int
    out: str = ""
    verbose: bool = False


@dataclass
class Recorder:
    calls: list[tuple[str, bool]] = field(default_factory=list)
    interrupt: set[str] = field(default_factory=set)


def make_stages(root: Path, rec: Recorder, values: dict[str, int]) -> list[Stage]:
    def runner(name: str):
        def run(ctx: StageContext) -> dict:
            rec.calls.append((name, ctx.resume))
            (ctx.dir / "checkpoint-1").mkdir(exist_ok=True)
            if name in rec.interrupt:
                raise KeyboardInterrupt
            (ctx.dir / "out.txt").write_text(f"{name} {values[name]} from {sorted(ctx.upstream)}")
            return {"value": values[name]}
        return run

    deps = {"a": (), "b": ("a",), "c": ("a", "b")}
    return [
        Stage(name, deps[name], f"stage {name}", Knobs(values[name], out=str(root / name)), runner(name),
              outputs=("out.txt",), volatile=frozenset({"verbose"}), resumable=name == "b")
        for name in ("a", "b", "c")
    ]


def execute(root: Path, rec: Recorder, values: dict[str, int], **kw) -> None:
    PipelineRun(make_stages(root, rec, values), RunLayout(root), Console(quiet=True)).execute(**kw)


def test_runs_in_order_then_skips_everything(tmp_path):
    rec = Recorder()
    values = {"a": 1, "b": 2, "c": 3}
    execute(tmp_path, rec, values)
    assert rec.calls == [("a", False), ("b", False), ("c", False)]
    for name in "abc":
        state = json.loads((tmp_path / name / "stage.json").read_text())
        assert state["complete"] is True and state["result"] == {"value": values[name]}
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    assert [doc["stages"][n]["status"] for n in "abc"] == ["ran", "ran", "ran"]
    assert "versions" in doc["provenance"]
    rec.calls.clear()
    execute(tmp_path, rec, values)
    assert rec.calls == []
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    assert [doc["stages"][n]["status"] for n in "abc"] == ["skipped"] * 3


def test_config_change_reruns_the_stage_and_its_dependents_only(tmp_path):
    rec = Recorder()
    execute(tmp_path, rec, {"a": 1, "b": 2, "c": 3})
    rec.calls.clear()
    execute(tmp_path, rec, {"a": 1, "b": 20, "c": 3})
    assert [name for name, _ in rec.calls] == ["b", "c"]
    assert (tmp_path / "b" / "out.txt").read_text().startswith("b 20")


def test_fingerprint_ignores_volatile_fields_and_the_run_dir_location(tmp_path):
    rec = Recorder()
    one = make_stages(tmp_path / "x", rec, {"a": 1, "b": 2, "c": 3})
    two = make_stages(tmp_path / "y", rec, {"a": 1, "b": 2, "c": 3})
    two[0].config.verbose = True
    assert fingerprints(one, RunLayout(tmp_path / "x")) == fingerprints(two, RunLayout(tmp_path / "y"))
    three = make_stages(tmp_path / "x", rec, {"a": 5, "b": 2, "c": 3})
    fa, fb = fingerprints(one, RunLayout(tmp_path / "x")), fingerprints(three, RunLayout(tmp_path / "x"))
    assert all(fa[n] != fb[n] for n in "abc")  # a's change reaches its dependents through their fingerprints


def test_interrupted_resumable_stage_resumes_and_others_restart(tmp_path):
    rec = Recorder(interrupt={"b"})
    values = {"a": 1, "b": 2, "c": 3}
    with pytest.raises(KeyboardInterrupt):
        execute(tmp_path, rec, values)
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["complete"] is False
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"]["b"]["status"] == "interrupted"
    rec.calls.clear()
    rec.interrupt.clear()
    execute(tmp_path, rec, values)
    assert rec.calls == [("b", True), ("c", False)]
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["attempts"] == 2


def test_interrupted_stage_with_changed_config_starts_over(tmp_path):
    rec = Recorder(interrupt={"b"})
    with pytest.raises(KeyboardInterrupt):
        execute(tmp_path, rec, {"a": 1, "b": 2, "c": 3})
    rec.calls.clear()
    rec.interrupt.clear()
    execute(tmp_path, rec, {"a": 1, "b": 7, "c": 3})
    assert rec.calls == [("b", False), ("c", False)]


def test_only_one_stage_and_force(tmp_path):
    rec = Recorder()
    values = {"a": 1, "b": 2, "c": 3}
    with pytest.raises(UserError, match="needs 'a'"):
        execute(tmp_path, rec, values, only="b")
    execute(tmp_path, rec, values)
    rec.calls.clear()
    execute(tmp_path, rec, values, only="b", force=True)
    assert rec.calls == [("b", False)]
    rec.calls.clear()
    # b was re-run, so c (made from the old b) is stale; a is still current.
    execute(tmp_path, rec, values)
    assert rec.calls == [("c", False)]


def test_missing_outputs_rerun_and_foreign_directories_are_refused(tmp_path):
    rec = Recorder()
    values = {"a": 1, "b": 2, "c": 3}
    execute(tmp_path / "run", rec, values)
    (tmp_path / "run" / "c" / "out.txt").unlink()
    rec.calls.clear()
    execute(tmp_path / "run", rec, values)
    assert rec.calls == [("c", False)]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a prunetune run directory"):
        check_run_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- issue 24: ownership by the marker; a result the records name but that is gone --------------------------


def test_a_directory_with_files_named_as_the_pipeline_names_its_own_is_the_users(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("pipeline.json", "pipeline.yaml", "stage.json"):
        (mine / name).write_text("{}")
    (mine / "prune").mkdir()
    with pytest.raises(UserError, match="not a prunetune run directory .*yours"):
        check_run_dir(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["pipeline.json", "pipeline.yaml", "prune", "stage.json"]


def test_a_rerun_stage_removes_what_its_marker_lists_and_keeps_the_users_files(tmp_path):
    from prunetune import rundir

    rec = Recorder()
    values = {"a": 1, "b": 2, "c": 3}
    execute(tmp_path, rec, values)
    rundir.claim(tmp_path / "b", ["out.txt", "checkpoint-1"], "run")  # what the stage wrote, as engines list it
    (tmp_path / "b" / "notes.txt").write_text("mine")
    execute(tmp_path, rec, {**values, "b": 20})
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "b" / "out.txt").read_text().startswith("b 20")


def test_a_complete_stage_whose_records_name_a_missing_result_runs_again(tmp_path):
    rec = Recorder()
    values = {"a": 1, "b": 2, "c": 3}
    stages = make_stages(tmp_path, rec, values)
    stages[1].usable = lambda d: None if (d / "result").is_dir() else "its result (as its records name it) is missing"
    run = PipelineRun(stages, RunLayout(tmp_path), Console(quiet=True))
    (tmp_path / "b").mkdir(parents=True)
    run.execute()
    rec.calls.clear()
    run = PipelineRun(stages, RunLayout(tmp_path), Console(quiet=True))
    assert run.plan()["b"].reason == "its result (as its records name it) is missing"
    run.execute()
    assert rec.calls == [("b", False), ("c", False)]  # started over, not resumed from its checkpoint
