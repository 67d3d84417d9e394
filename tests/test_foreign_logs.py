"""The logs users bring from other tools (issue 11): every format read, every labelled anomaly found, no false
alarm on the near-misses, and the rule table of RULES.md true to the fixtures it names."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from prunetune.analysis import plots
from prunetune.analysis.context import fix_context
from prunetune.analysis.report import ReportConfig, analyse, run_report
from prunetune.analysis.rules import diagnose
from prunetune.analysis.rules_doc import RULES
from prunetune.analysis.series import curves
from prunetune.analysis.sources import load_source
from prunetune.cli import main as cli_main

FIXTURES = Path(__file__).parent / "fixtures"
FOREIGN = FIXTURES / "foreign"
LABELS = json.loads((FOREIGN / "labels.json").read_text(encoding="utf-8"))


def _report(path: Path, **kw) -> dict:
    return analyse(load_source(path), ReportConfig(source=path, **kw))


@pytest.mark.parametrize("case", sorted(LABELS))
def test_labelled_foreign_logs(case):
    label = LABELS[case]
    data = _report(FOREIGN / case / label["file"])
    kinds = {a["kind"] for a in data["anomalies"]}
    required, allowed = set(label["kinds"]), set(label["allowed"])
    assert required <= kinds <= required | allowed, (case, kinds)
    if not kinds:
        assert data["verdicts"]["train_loss"]["label"] != "oscillating"
    for a in data["anomalies"]:
        assert a["message"] and a["fix"] and a["evidence"]
        # a foreign log gets its fix in the Trainer's terms, never prunetune's flags
        assert "--lr " not in a["fix"] and "--epochs " not in a["fix"] and "--block-size" not in a["fix"], a["fix"]


@pytest.mark.parametrize(("kind", "path", "fires"),
                         [(k, p, True) for k, r in RULES.items() for p in r.fires_on]
                         + [(k, p, False) for k, r in RULES.items() for p in r.quiet_on])
def test_rules_md_pins(kind, path, fires):
    data = _report(FIXTURES / path)
    kinds = {a["kind"] for a in data["anomalies"] + data["information"]}  # alarms and notes alike
    assert (kind in kinds) == fires, (kind, path, kinds)


def test_wanda_console_check(tmp_path, capsys):
    run = tmp_path / "wanda"
    shutil.copytree(FOREIGN / "wanda_block", run)
    log = run / "lora_training.log"
    assert cli_main(["report", str(log), "--bands", "llama2-7b"]) == 0
    printed = capsys.readouterr().out
    assert "7.30 on the Llama-2-7B scale: good" in printed
    assert "pruned 8207.52 → 7.30" in printed and "Best checkpoint: checkpoint-1800" in printed
    saved = json.loads((run / "report" / "report.json").read_text())
    s = saved["summary"]
    assert s["final_perplexity"] == 7.30 and s["pruned_perplexity"] == 8207.52
    assert saved["perplexity_rating"]["band"] == "good"
    assert saved["source"]["best_checkpoint"] == "checkpoint-1800" and s["status"] == "finished"
    assert s["max_steps"] == 2000 and s["steps"] == 2000
    src = load_source(log)
    evals = {r["step"]: r["perplexity"] for r in src.records if r["event"] == "eval"}
    assert evals[200] == 10.44 and evals[400] == 8.36 and len(evals) == 10
    assert saved["verdicts"]["eval_loss"]["label"] == "improving"
    for name in ("train_loss.png", "eval_loss_perplexity.png", "learning_rate.png", "grad_norm.png"):
        assert (run / "report" / name).read_bytes()[:4] == b"\x89PNG", name


def test_end_of_run_blocks_alone_say_there_is_nothing_to_judge():
    data = _report(FOREIGN / "trainer_blocks_only" / "train.log")
    assert data["summary"]["log_points"] == 0 and data["anomalies"] == []
    assert any("0 train-loss points" in n and "end-of-run metrics" in n for n in data["notes"])
    assert data["summary"]["final_eval_loss"] == 2.5733 and data["summary"]["time_s"] == pytest.approx(761.52)
    assert data["verdicts"]["train_loss"]["label"] == "nothing to judge"
    nan = _report(FOREIGN / "trainer_blocks_nan" / "train.log")
    assert [a["kind"] for a in nan["anomalies"]] == ["nan_inf"] and "--learning_rate" in nan["anomalies"][0]["fix"]


def test_llamafactory_alone_and_in_its_output_dir():
    alone = load_source(FOREIGN / "llamafactory_sft" / "trainer_log.jsonl")
    assert alone.kind == "trainer_log_jsonl" and alone.meta["max_steps"] == 468
    logs = [r for r in alone.records if r["event"] == "log"]
    assert logs[0]["step"] == 5 and logs[0]["elapsed"] == 13.0 and "lr" in logs[0]
    directory = load_source(FOREIGN / "llamafactory_overfit")
    assert directory.kind == "trainer_log_jsonl"
    assert directory.meta["all_results"]["eval_loss"] == 1.61


def test_the_end_of_run_evaluation_in_all_results_json_is_the_final_eval(tmp_path):
    # LLaMA-Factory's output dir: trainer_log.jsonl runs to its end, the final evaluation is only in all_results.json
    lines = [{"current_steps": 10 * i, "total_steps": 300, "loss": 2.0 - 0.004 * i, "epoch": i / 10}
             for i in range(1, 31)] + [{"current_steps": 300, "total_steps": 300, "epoch": 3.0}]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "all_results.json").write_text(json.dumps({"epoch": 3.0, "eval_loss": 0.4695, "train_loss": 0.62}))
    assert _report(tmp_path)["summary"]["final_eval_loss"] == 0.4695
    # a run that stopped early: the directory's results may be an older run's, never this one's final eval
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines[:10]) + "\n")
    assert _report(tmp_path)["summary"]["final_eval_loss"] is None


def test_eval_sets_are_separate_series_with_their_own_verdicts():
    data = _report(FOREIGN / "eval_sets" / "trainer_state.json")
    v = data["verdicts"]
    assert v["eval_wikitext_loss"]["label"] == "improving" and v["eval_code_loss"]["label"] == "rising"
    (over,) = [a for a in data["anomalies"] if a["kind"] == "overfitting"]
    assert over["evidence"]["eval_set"] == "code" and "`code`" in over["message"]
    s = data["summary"]
    assert s["final_eval_set"] == "wikitext" and s["final_eval_loss"] == 2.57
    assert s["eval_sets"]["code"]["final_eval_loss"] == 2.75 and s["eval_sets"]["code"]["best_step"] == 200


@pytest.mark.parametrize(("case", "reason", "step"), [("interrupted_traceback", "KeyboardInterrupt", 230),
                                                     ("interrupted_checkpoint", "log ends", 400)])
def test_interrupted_runs_are_reported_as_interrupted(case, reason, step):
    data = _report(FOREIGN / case / LABELS[case]["file"])
    s = data["summary"]
    assert s["status"] == "interrupted" and s["stopped_reason"] == reason and s["steps"] == step
    assert any(f"interrupted at step {step}" in n for n in data["notes"])


def test_oscillating_run_never_reads_decreasing_steadily():
    data = _report(FOREIGN / "oscillating_lr5e-3" / "console.log")
    assert data["verdicts"]["train_loss"]["label"] in ("oscillating", "rising")
    osc = next(a for a in data["anomalies"] if a["kind"] == "loss_oscillating")
    assert osc["evidence"]["log_jump_p75"] > 0.55
    assert "--learning_rate from 5e-3" in osc["fix"] or "--learning_rate from 4.9e-3" in osc["fix"]


def test_dpo_loss_is_not_a_perplexity():
    data = _report(FOREIGN / "dpo" / "trainer_state.json")
    assert data["summary"]["loss_kind"] == "other" and data["summary"]["final_perplexity"] is None
    assert data["perplexity_rating"]["text"].startswith("not a perplexity")


def test_prunetune_runs_get_prunetune_flags_and_foreign_runs_trainer_flags(tmp_path):
    records = [{"event": "log", "step": 10 * (i + 1), "loss": 6.0 - 0.004 * i, "lr": 1e-4} for i in range(40)]
    live = diagnose(records, context=fix_context([("run_config.json", {"lr": 1e-4})]))
    foreign = diagnose(records, context=fix_context([("the log", {"learning_rate": 1e-4})], flavour="trainer"))
    assert "raise --lr from 1e-4" in live[0].fix and "raise --learning_rate from 1e-4" in foreign[0].fix


def test_smoothed_curve_ends_on_the_data():
    seven = [6.3, 6.2, 6.1, 6.05, 5.95, 5.85, 5.78]
    assert plots.smoothed(seven) is None  # 7 points: nothing to smooth, the raw line is the curve
    falling = [5.0 * math.exp(-i / 30) + 1.0 for i in range(200)]
    curve, window = plots.smoothed(falling)
    assert 2 <= window <= 20 and abs(curve[-1] - falling[-1]) < 0.05


def test_eval_plot_starts_at_the_pruned_baseline(tmp_path):
    records = [{"event": "baseline_eval", "step": 0, "eval_loss": math.log(8207.52)},
               {"event": "eval", "step": 200, "eval_loss": math.log(10.44)},
               {"event": "eval", "step": 400, "eval_loss": math.log(8.36)}]
    assert plots.baseline_loss(curves(records), None) == pytest.approx(math.log(8207.52))
    assert plots.baseline_loss(curves(records[1:]), 8207.52) == pytest.approx(math.log(8207.52))
    assert plots.plot_eval(curves(records), tmp_path / "e.png", dense_ppl=5.47).read_bytes()[:4] == b"\x89PNG"


def test_whole_report_files_for_a_foreign_dir(tmp_path):
    run = tmp_path / "lf"
    shutil.copytree(FOREIGN / "llamafactory_overfit", run)
    data = run_report(ReportConfig(source=run))
    assert Path(data["files"]["report.md"]).is_file()
    assert "overfitting" in Path(data["files"]["report.md"]).read_text(encoding="utf-8")


def test_a_run_that_crashed_before_its_first_log_is_reported_not_refused(tmp_path):
    log = tmp_path / "early.log"
    log.write_text("***** Running training *****\n  Num examples = 1,000\n  Total optimization steps = 300\n"
                   "  0%|          | 0/300 [00:00<?, ?it/s]\nTraceback (most recent call last):\n"
                   '  File "train.py", line 9, in <module>\nRuntimeError: Expected all tensors on one device\n')
    data = _report(log)
    assert data["summary"]["status"] == "interrupted" and data["anomalies"] == []
    assert data["summary"]["steps"] == 0 and data["summary"]["max_steps"] == 300
    assert any("0 train-loss points found in early.log" in n for n in data["notes"])
