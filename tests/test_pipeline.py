"""`prunetune run`: YAML validation, and the whole pipeline on the tiny model (order, skip, partial re-run after
a config change, resume of an interrupted fine-tuning)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from prunetune.cli import main as cli_main
from prunetune.errors import UserError
from prunetune.pipeline.config import load_pipeline, parse_pipeline
from prunetune.pipeline.demo import demo_dict
from prunetune.pipeline.job import run_pipeline
from prunetune.rundir.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"model": "smollm2-135m", "finetune": {"lora_r": 4}}


def write_yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**MINIMAL, "finetun": {}}, r"unknown key pipeline.yaml.finetun \(did you mean 'finetune'\?\); valid keys"),
        ({**MINIMAL, "finetune": {"lora_rank": 4}}, r"unknown key finetune.lora_rank \(did you mean 'lora_r'\?\)"),
        ({**MINIMAL, "prune": {"out": "x"}}, r"prune.out is set by the pipeline itself"),
        ({**MINIMAL, "finetune": {"lora_r": "eight"}}, r"finetune.lora_r: expected int, got 'eight'"),
        ({**MINIMAL, "finetune": {"bf16": "yes"}}, r"finetune.bf16: expected bool"),
        ({**MINIMAL, "prune": {"sparsity": 1.5}}, r"prune: --sparsity 1.5 is outside \[0, 1\)"),
        ({**MINIMAL, "prune": {"pattern": "block7"}}, r"prune: .*block7"),
        ({**MINIMAL, "eval": {"seqlen": 1}}, r"eval: --seqlen 1 is too short"),
        ({**MINIMAL, "report": {"bands": "vibes"}}, r"report: --bands 'vibes' is not known"),
        ({"finetune": {}}, r"missing required key 'model'"),
        ({**MINIMAL, "data": {"dataset": ""}}, r"data.dataset: expected a non-empty string"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_yaml_values_are_one_line_user_errors(tmp_path, doc, message):
    path = write_yaml(tmp_path / "pipeline.yaml", doc)
    with pytest.raises(UserError, match=message) as info:
        load_pipeline(path)
    assert "\n" not in str(info.value)


def test_yaml_reads_learning_rates_without_a_dot_and_comma_lists(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: smollm2-135m\nfinetune:\n  lr: 1e-4\n  lora_targets: q_proj,v_proj\n")
    cfg = load_pipeline(path)
    assert cfg.finetune == {"lr": 1e-4, "lora_targets": ("q_proj", "v_proj")}


def test_missing_file_and_broken_syntax(tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: smollm2-135m\nprune:\n  method: [wanda\n")
    with pytest.raises(UserError, match=r"invalid YAML at line \d+"):
        load_pipeline(broken)
    # Through the CLI: one line on stderr, exit 2, no traceback.
    assert cli_main(["run", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunetune run: error:") and err.count("\n") == 1


def test_shipped_configs_load_and_the_demo_yaml_is_the_demo():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_pipeline(path)
    for name, quick in (("demo-cpu.yaml", False), ("demo-quick.yaml", True)):
        from_yaml = load_pipeline(REPO / "configs" / name).to_dict()
        in_code = parse_pipeline(demo_dict(quick), source="demo").to_dict()
        assert from_yaml == in_code, name


# ---------------------------------------------------------------------------------------------------------
# The whole pipeline on the tiny model


def tiny_pipeline(model: Path, data: Path, **finetune) -> dict:
    return {
        "name": "tiny",
        "model": str(model),
        "data": {"dataset": "wikitext2", "data_dir": str(data)},
        "prune": {"method": "wanda", "pattern": "block16x16", "sparsity": 0.5, "reconstruct": True,
                  "nsamples": 2, "seqlen": 64},
        # lora explicitly: these tests follow the adapter through the merge stage (auto would pick sparse-ft for blocks)
        "finetune": {"method": "lora", "lora_r": 4, "block_size": 64, "max_steps": 4, "logging_steps": 2, "eval_steps": 2,
                     "save_steps": 2, "max_train_samples": 64, "max_eval_samples": 2, "probe_steps": 0,
                     **finetune},
        "eval": {"seqlen": 64, "max_windows": 2},
    }


def states(run: Path) -> dict[str, dict]:
    return {s: json.loads((run / s / "stage.json").read_text()) for s in ("prune", "finetune", "eval", "report")}


def statuses(run: Path) -> list[str]:
    doc = json.loads((run / "pipeline.json").read_text())
    return [doc["stages"][s]["status"] for s in ("prune", "finetune", "eval", "report")]


def run_yaml(path: Path, run: Path) -> dict:
    return run_pipeline(load_pipeline(path), run, source=str(path))


@pytest.mark.slow
def test_pipeline_runs_skips_reruns_what_changed_and_resumes(tmp_path, tiny_model_dir, shared_data, capsys):
    cfg_path = write_yaml(tmp_path / "tiny.yaml", tiny_pipeline(tiny_model_dir, shared_data))
    run = tmp_path / "run"

    story = run_yaml(cfg_path, run)
    assert statuses(run) == ["ran", "ran", "ran", "ran"]
    first = states(run)
    order = [first[s]["finished"] for s in ("prune", "finetune", "eval", "report")]
    assert order == sorted(order)
    for rel in ("pipeline.yaml", "prune/prunetune/masks.safetensors", "prune/prune.json", "finetune/metrics.jsonl",
                "finetune/adapter/adapter_config.json", "eval/eval.json", "report/report.html",
                "report/report.json"):
        assert (run / rel).exists(), rel
    # The console's story is the report's numbers; the held-out row is the eval stage's.
    report = json.loads((run / "report" / "report.json").read_text())["summary"]
    assert story["finetune_eval_set"]["recovered"] == report["final_perplexity"]
    assert story["finetune_eval_set"]["dense"] == report["dense_perplexity"]
    eval_json = json.loads((run / "eval" / "eval.json").read_text())
    assert story["test"]["pruned"] == eval_json["test"]["pruned"]["perplexity"]
    # The resolved pipeline.yaml is itself a valid pipeline file describing the same run.
    assert load_pipeline(run / "pipeline.yaml").finetune["lora_r"] == 4
    # The run ends with a deployable sparse model (merge stage), and the eval stage measured that model.
    from prunetune.pruning.verify import verify_dir

    doc = json.loads((run / "pipeline.json").read_text())
    assert doc["order"] == ["prune", "finetune", "merge", "eval", "report"] and doc["stages"]["merge"]["status"] == "ran"
    assert json.loads((run / "merge" / "merge.json").read_text())["keep_sparsity"] is True
    assert verify_dir(run / "merge").ok
    # Both model directories are what weight loaders take as they are (vLLM loads every top-level *.safetensors).
    for stage in ("prune", "merge"):
        assert [p.name for p in (run / stage).glob("*.safetensors")] == ["model.safetensors"], stage
    assert eval_json["test"]["recovered_model"]["model"] == str(run.resolve() / "merge")
    assert story["test"]["deployable"] is True and story["test"]["recovered"] == eval_json["test"]["recovered"]["perplexity"]
    assert abs(eval_json["test"]["recovered"]["sparsity"] - eval_json["test"]["pruned"]["sparsity"]) < 1e-9

    run_yaml(cfg_path, run)
    assert statuses(run) == ["skipped"] * 4
    assert {s: v["run_id"] for s, v in states(run).items()} == {s: v["run_id"] for s, v in first.items()}

    # A new LoRA rank: fine-tuning and everything after it re-run, pruning does not.
    write_yaml(cfg_path, tiny_pipeline(tiny_model_dir, shared_data, lora_r=8))
    capsys.readouterr()
    assert cli_main(["run", str(cfg_path), "--out", str(run), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "config changed: lora_r 4 -> 8" in plan and "up to date" in plan
    assert statuses(run) == ["skipped"] * 4  # --plan wrote nothing
    run_yaml(cfg_path, run)
    assert statuses(run) == ["skipped", "ran", "ran", "ran"]
    assert json.loads((run / "pipeline.json").read_text())["stages"]["merge"]["status"] == "ran"
    second = states(run)
    assert second["prune"]["run_id"] == first["prune"]["run_id"]
    assert all(second[s]["run_id"] != first[s]["run_id"] for s in ("finetune", "eval", "report"))
    assert json.loads((run / "finetune" / "adapter" / "adapter_config.json").read_text())["r"] == 8

    # Interrupt fine-tuning (SIGINT, as Ctrl-C) once it has a checkpoint; the next run resumes from it.
    write_yaml(cfg_path, tiny_pipeline(tiny_model_dir, shared_data, lora_r=2, max_steps=40))
    stop = threading.Event()

    def interrupt_after_first_checkpoint() -> None:
        stage_dir = run / "finetune"
        while not stop.is_set():
            try:
                fresh = json.loads((stage_dir / "stage.json").read_text())["complete"] is False
            except (OSError, ValueError, KeyError):
                fresh = False  # not started yet, or the file is being replaced
            if fresh and (stage_dir / "checkpoint-2" / "trainer_state.json").is_file():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_yaml(cfg_path, run)
    finally:
        stop.set()
        watcher.join()
    interrupted = json.loads((run / "finetune" / "stage.json").read_text())
    assert interrupted["complete"] is False
    assert statuses(run)[:2] == ["skipped", "interrupted"]
    stopped_at = max(int(p.name.split("-")[1]) for p in (run / "finetune").glob("checkpoint-*"))
    assert 2 <= stopped_at < 40

    run_yaml(cfg_path, run)
    assert statuses(run) == ["skipped", "resumed", "ran", "ran"]
    records = read_jsonl(run / "finetune" / "metrics.jsonl")
    resumes = [r for r in records if r["event"] == "resume"]
    assert [r["step"] for r in resumes] == [stopped_at]
    trainer_state = json.loads((run / "finetune" / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == 40
    assert states(run)["prune"]["run_id"] == first["prune"]["run_id"]


@pytest.mark.slow
def test_stage_option_and_foreign_out_dir(tmp_path, tiny_model_dir, shared_data, capsys):
    cfg_path = write_yaml(tmp_path / "tiny.yaml", tiny_pipeline(tiny_model_dir, shared_data))
    run = tmp_path / "run"
    assert cli_main(["run", str(cfg_path), "--out", str(run), "--stage", "finetune"]) == 2
    assert "needs 'prune'" in capsys.readouterr().err
    assert cli_main(["run", str(cfg_path), "--out", str(run), "--stage", "prune"]) == 0
    assert json.loads((run / "prune" / "stage.json").read_text())["complete"] is True
    assert not (run / "finetune").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli_main(["run", str(cfg_path), "--out", str(mine)]) == 2
    assert "not a prunetune run directory" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_eval_stage_measures_the_deployable_model_and_zero_shot_tasks(tmp_path, tiny_model_dir, shared_data):
    pytest.importorskip("lm_eval")
    from rich.console import Console

    from prunetune.pipeline.runner import RunLayout, StageContext
    from prunetune.pipeline.stages import build_stages, choose_data
    from prunetune.pipeline.summary import perplexity_story, print_story
    from test_zeroshot import write_task

    task = write_task(tmp_path)
    doc = tiny_pipeline(tiny_model_dir, shared_data)
    doc["eval"].update(tasks=[str(task)], limit=4)
    cfg = parse_pipeline(doc, source="tiny")
    assert cfg.configs["eval"].tasks and cfg.stages == ("prune", "finetune", "merge", "eval", "report")
    layout = RunLayout(tmp_path / "run")
    for stage in ("prune", "merge"):  # stand-ins: the tiny model plays the pruned and the merged model
        (layout.root / stage).parent.mkdir(parents=True, exist_ok=True)
        (layout.root / stage).symlink_to(tiny_model_dir)
    # The finetune stand-in: a run that recorded an adapter as its result (as `finetune` records it).
    (layout.root / "finetune" / "adapter").mkdir(parents=True)
    (layout.root / "finetune" / "adapter" / "adapter_config.json").write_text("{}")
    (layout.root / "finetune" / "metrics.jsonl").write_text(
        json.dumps({"event": "adapter_saved", "step": None, "result": "adapter", "method": "lora"}) + "\n")
    stages = {s.name: s for s in build_stages(cfg, layout, choose_data("wikitext2", str(shared_data), None))}
    eval_dir = layout.root / "eval"
    eval_dir.mkdir()
    result = stages["eval"].run(StageContext(layout, eval_dir, False, {}, Console(quiet=True)))
    test = result["test"]
    assert test["recovered_model"]["model"] == str(layout.root / "merge") and test["recovered_model"]["deployable"]
    assert stages["eval"].deps == ("prune", "finetune", "merge")
    for model in ("dense", "pruned", "recovered"):
        zs = test[model]["zeroshot"]["tasks"][task.stem]
        assert 0.0 <= zs["acc"] <= 1.0 and zs["samples"] == 4
        assert test[model]["perplexity"] > 1
    assert json.loads((eval_dir / "eval.json").read_text())["test"]["recovered"]["zeroshot"]
    assert "zeroshot" not in result["finetune_eval_set"]["dense"]  # the same-set reference is perplexity only
    # The summary reads it back from stage.json: write it as the runner would.
    (eval_dir / "stage.json").write_text(json.dumps({"complete": True, "result": result}))
    story = perplexity_story(layout.root)
    assert story["test"]["deployable"] and story["zeroshot"]["recovered"]["tasks"][task.stem]["samples"] == 4
    console = Console(record=True, width=160)
    print_story(console, story)
    text = console.export_text()
    assert "Zero-shot accuracy" in text and task.stem in text and "deployable sparse model" in text
