"""`prunetune report` on the labelled logs of real tiny Trainer runs, on prunetune run directories, and
through the CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from prunetune.analysis.anomaly import ANOMALY_KINDS
from prunetune.analysis.context import fix_context
from prunetune.analysis.report import ReportConfig, analyse, render_console, run_report
from prunetune.analysis.rules import diagnose
from prunetune.analysis.sources import load_source
from prunetune.cli import main as cli_main
from prunetune.errors import UserError
from prunetune.rundir.records import JsonlWriter, make_record

LOGS = Path(__file__).parent / "fixtures" / "logs"

# case -> (anomaly kinds that must be reported, kinds allowed besides them, train verdict reason/label)
LABELS = {
    "healthy": (set(), set(), "decreasing steadily"),
    "lr_high": ({"loss_diverging"}, {"loss_oscillating"}, "LR too high"),
    "lr_low": ({"loss_slow"}, set(), "LR too low"),
    "flat": ({"loss_flat"}, set(), "data or configuration broken"),
    "overfitting": ({"overfitting"}, {"eval_far_above_train"}, "decreasing steadily"),
    "nan": ({"nan_inf"}, set(), "NaN/Inf"),
    "oom": ({"out_of_memory"}, set(), "decreasing steadily"),
    "no_eval": (set(), set(), "decreasing steadily"),
}
NOTES = {"no_eval": {"no_eval"}}
"""case -> the notes (information, not alarms) its report must give; every other case gives none."""


def _cases():
    for case in LABELS:
        yield case, "console.log"
        if case != "oom":  # a crashed run's trainer_state.json cannot carry the crash
            yield case, "trainer_state.json"


@pytest.mark.parametrize(("case", "file"), list(_cases()))
def test_labelled_logs_name_the_right_condition(case, file):
    required, allowed, train_label = LABELS[case]
    src = load_source(LOGS / case / file)
    data = analyse(src, ReportConfig(source=LOGS / case / file))
    kinds = {a["kind"] for a in data["anomalies"]}
    assert required <= kinds, (case, kinds)
    assert kinds <= required | allowed, (case, kinds)
    assert all(k in ANOMALY_KINDS for k in kinds)
    assert {a["kind"] for a in data["information"]} == NOTES.get(case, set()), case
    assert all(a["severity"] == "info" for a in data["information"])
    if case == "no_eval":  # a note, shown as information beside "no anomalies", never as an alarm
        text = render_console(data)
        assert "Anomalies: none" in text and "ℹ no_eval (note): no evaluation in this run" in text
    v = data["verdicts"]["train_loss"]
    assert train_label in (v["label"], v["reason"])
    if case == "overfitting":
        assert data["verdicts"]["eval_loss"]["reason"] == "overfitting"
    for a in data["anomalies"]:
        assert a["fix"] and a["evidence"] and a["message"]


@pytest.mark.parametrize("case", ["healthy", "no_eval"])
def test_healthy_runs_raise_no_live_alert_at_any_point(case):
    records = load_source(LOGS / case / "console.log").records
    for n in range(1, len(records) + 1):
        assert diagnose(records[:n]) == [], f"{case}: false alarm after record {n}"


def test_live_alert_kinds_are_stable_once_raised():
    # the trainer prints each kind once: a kind that fires must keep firing as the run goes on
    for case in ("lr_high", "lr_low", "flat", "overfitting", "nan"):
        records = load_source(LOGS / case / "trainer_state.json").records
        first_seen: dict[str, int] = {}
        for n in range(1, len(records) + 1):
            kinds = {a.kind for a in diagnose(records[:n])}
            for k in kinds:
                first_seen.setdefault(k, n)
            for k, at in first_seen.items():
                if k not in ("eval_far_above_train",):
                    assert k in kinds, f"{case}: {k} raised at record {at} vanished at {n}"


@pytest.mark.parametrize("case", ["healthy", "overfitting", "lr_high", "nan"])
def test_console_log_and_trainer_state_give_the_same_summary(case):
    a = analyse(load_source(LOGS / case / "console.log"), ReportConfig(source=LOGS / case))["summary"]
    b = analyse(load_source(LOGS / case / "trainer_state.json"), ReportConfig(source=LOGS / case))["summary"]
    for key in ("steps", "best_step", "eval_points", "log_points"):
        assert a[key] == b[key], key
    # the console prints 4 significant digits, so compare to that precision (perplexity: its log)
    for key in ("final_train_loss", "final_eval_loss", "best_eval_loss", "final_perplexity", "time_s"):
        if b[key] is None:
            assert a[key] is None, key
        elif key == "final_perplexity":
            assert math.log(a[key]) == pytest.approx(math.log(b[key]), rel=1e-3), key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-3), key


def test_report_files_and_self_contained_html(tmp_path):
    run = tmp_path / "overfitting"
    shutil.copytree(LOGS / "overfitting", run)
    data = run_report(ReportConfig(source=run / "console.log", dense_ppl=300.0))
    out = run / "report"
    for name in ("report.md", "report.html", "report.json", "train_loss.png", "eval_loss_perplexity.png",
                 "learning_rate.png", "grad_norm.png", "throughput.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0
    assert (out / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('src="data:image/png;base64,') == 5
    assert not re.search(r'src="(?!data:)', html)
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["best_step"] == 16
    assert {a["kind"] for a in saved["anomalies"]} >= {"overfitting"}
    assert saved["perplexity_rating"]["band"] == "fair"  # ~846 / 300 = 2.8x
    assert saved["anomaly_kinds"] == list(ANOMALY_KINDS)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "⚠ rising (overfitting)" in md and "(step 16" in md
    assert data["files"]["report.html"] == str(out / "report.html")
    # the user's files are untouched
    assert (run / "console.log").read_bytes() == (LOGS / "overfitting" / "console.log").read_bytes()


def _prunetune_run(run: Path, losses, evals, final=None, config=None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    writer = JsonlWriter(run / "metrics.jsonl")
    writer.write(make_record("config", None, lr=1e-4))
    for i, loss in enumerate(losses):
        step = (i + 1) * 10
        writer.write(make_record("log", step, loss=loss, lr=1e-4, grad_norm=0.5, tokens_per_s=2000.0 + i,
                                 max_steps=len(losses) * 10, elapsed=step * 0.5, eta_s=1.0))
        for s, v in evals:
            if s == step:
                writer.write(make_record("eval", s, eval_loss=v, perplexity=math.exp(v)))
    writer.write(make_record("train_end", len(losses) * 10, train_runtime=123.0))
    if final:
        writer.write(make_record("final_eval", len(losses) * 10, **final))
    writer.close()
    if config:
        (run / "run_config.json").write_text(json.dumps(config))
    return run


def test_prunetune_run_dir_rating_improvement_and_concrete_fix(tmp_path):
    losses = [3.0 - 0.003 * i for i in range(40)]  # -4% over the run, still linear: LR too low
    run = _prunetune_run(tmp_path / "run", losses, [(100, 3.1), (200, 3.05), (400, 3.0)],
                         final={"eval_loss": 2.0, "perplexity": 7.39, "pruned_perplexity": 8207.52,
                                "dense_perplexity": 6.0},
                         config={"training": {"lr": 1e-4, "block_size": 1024}, "lora": {"lora_dropout": 0.05}})
    data = run_report(ReportConfig(source=run))
    s = data["summary"]
    assert s["final_perplexity"] == 7.39 and s["pruned_perplexity"] == 8207.52
    assert s["improvement_pct"] == pytest.approx((1 - 7.39 / 8207.52) * 100)
    assert s["time_s"] == 123.0 and s["tokens_per_s"] == pytest.approx(2019.5)
    assert data["perplexity_rating"]["band"] == "ideal"  # 7.39 / 6.0 = 1.23x
    slow = next(a for a in data["anomalies"] if a["kind"] == "loss_slow")
    assert "raise --lr from 1e-4 to 3e-4" in slow["fix"]
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "pruned 8208 → 7.39, reduction 99.91%" in md
    assert data["context"]["block_size"] == {"value": 1024, "origin": "run_config.json"}


def test_llama2_bands_and_pruned_ppl_flag(tmp_path):
    run = _prunetune_run(tmp_path / "run", [3.0 * math.exp(-i / 10) + 1.9 for i in range(30)],
                         [(100, 2.3), (200, 2.1), (300, 2.05)])
    data = analyse(load_source(run), ReportConfig(source=run, bands="llama2-7b", pruned_ppl=50.0))
    assert data["perplexity_rating"]["band"] == "good"  # exp(2.05) = 7.77
    assert data["summary"]["improvement_pct"] == pytest.approx((1 - math.exp(2.05) / 50) * 100)


def test_fix_context_reads_flat_and_nested_configs():
    context = fix_context([("run_config.json", {"run": {"learning_rate": 2e-4}, "lora": {"lora_dropout": 0.1}})])
    assert context.to_dict() == {"lr": {"value": 2e-4, "origin": "run_config.json"},
                                 "adapter": {"value": True, "origin": "run_config.json"},
                                 "lora_dropout": {"value": 0.1, "origin": "run_config.json"}, "flavour": "prunetune"}
    assert fix_context([]).to_dict() == {"flavour": "prunetune"}


def test_cli_report_default_out_and_user_errors(tmp_path, capsys):
    run = tmp_path / "lr_low"
    shutil.copytree(LOGS / "lr_low", run)
    assert cli_main(["report", str(run), "--source-kind", "trainer_state"]) == 0
    printed = capsys.readouterr().out
    assert "falling too slowly" in printed and "loss_slow" in printed
    assert (run / "report" / "report.json").is_file()

    junk = tmp_path / "junk.log"
    junk.write_text("nothing to see\n")
    assert cli_main(["report", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "no training records" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    with pytest.raises(UserError, match="--dense-ppl"):
        ReportConfig(source=run, dense_ppl=-1.0)
    # a stricter slow rule silences the alert; thresholds come from flags or a YAML mapping
    assert cli_main(["report", str(run), "--source-kind", "trainer_state", "--threshold", "slow_max_rel_drop=0.01",
                     "--out", str(tmp_path / "strict")]) == 0
    assert "Anomalies: none" in capsys.readouterr().out
    assert cli_main(["report", str(run), "--threshold", "nope"]) == 2
    assert ReportConfig(source=run, thresholds={"min_train_points": 12}).thresholds.min_train_points == 12
    with pytest.raises(UserError, match="unknown threshold"):
        ReportConfig(source=run, thresholds={"bogus": 1})
