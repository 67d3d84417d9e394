"""The console renders records to the exact lines users read; the records carry the numbers."""

from __future__ import annotations

import io

from prunetune.finetune.console import RunLog, progress_bar, render
from prunetune.fmt import fmt_num, hms, to_float
from prunetune.rundir.records import make_record, read_jsonl


def test_step_line():
    record = make_record("log", 200, max_steps=2000, loss=2.23451, lr=1e-4, grad_norm=0.5, elapsed=600,
                         eta_s=5400, tokens_per_s=812.4, memory_mb=2150.4, memory_kind="rss")
    assert render(record) == (
        "Step 200/2000 [==>                 ] 10.0% | Loss: 2.2345 | LR: 1e-04 | Grad norm: 0.500 | "
        "Elapsed 0:10:00 | ETA 1:30:00 | 812 tok/s | RSS 2.1 GiB"
    )
    gpu = make_record("log", 1, max_steps=1, loss="nan", lr=1e-4, memory_mb=4096, memory_kind="gpu")
    assert "Loss: nan" in render(gpu) and "GPU max 4.0 GiB" in render(gpu) and "ETA ?" in render(gpu)


def test_eval_best_so_far_lines():
    better = make_record("eval", 400, epoch=0.2, eval_loss=2.1, perplexity=8.17, eval_runtime=3.0,
                         is_best=True, best_before=2.3456, best_step=200)
    assert "Best so far: Yes ✅ (improved from 2.3456)" in render(better)
    assert "perplexity: 8.17" in render(better)
    worse = make_record("eval", 600, eval_loss=2.2, perplexity=9.0, is_best=False, best_before=2.1, best_step=400)
    assert "Best so far: No (best 2.1000 at step 400)" in render(worse)


def test_final_eval_improvement_line():
    record = make_record("final_eval", 10, eval_loss=1.99, perplexity=7.30, baseline_perplexity=8207.52,
                         reduction_pct=99.911)
    assert "Improved from 8207.52 → 7.30, reduction 99.91%" in render(record)


def test_alert_lines_name_the_evidence_the_fix_rests_on():
    record = make_record("alert", 120, kind="loss_slow", severity="warning", message="train loss falls too slowly.",
                         evidence={"total_rel_drop": 0.04}, fix="raise --lr from 1e-05 to 3e-05",
                         basis=["lr 1e-05 (run_config.json)", "max_steps 200 (run_config.json)"])
    assert render(record).splitlines() == [
        "⚠️ ALERT [loss_slow] at step 120: train loss falls too slowly.",
        "   evidence: {'total_rel_drop': 0.04}",
        "   fix: raise --lr from 1e-05 to 3e-05",
        "   based on: lr 1e-05 (run_config.json); max_steps 200 (run_config.json)",
    ]
    assert "based on" not in render(make_record("alert", 1, kind="nan_inf", severity="error", message="m", fix="f"))


def test_helpers():
    assert hms(3725) == "1:02:05" and hms(None) == "?"
    # an integer too large for a float (a corrupt JSON line) is infinite, never an OverflowError
    assert to_float(10**400) == float("inf") and to_float(-(10**400)) == float("-inf")
    assert fmt_num(10**400) == "inf" and to_float("x") is None and to_float("1e999") == float("inf")
    assert progress_bar(0, 10, 10) == "[>         ]" and progress_bar(10, 10, 10) == "[==========]"


def test_runlog_holds_records_until_released(tmp_path):
    stream = io.StringIO()
    log = RunLog(tmp_path / "run", stream=stream)
    log.emit("message", None, persist=False, message="held")
    assert not (tmp_path / "run").exists()  # nothing written before the pre-flight says it is safe
    log.release()
    log.emit("message", 1, message="live")
    log.close()
    assert [r["message"] for r in read_jsonl(tmp_path / "run/metrics.jsonl")] == ["held", "live"]
    assert (tmp_path / "run/train.log").read_text() == "held\nlive\n" == stream.getvalue()
    silent = RunLog(tmp_path / "rank1", enabled=False, stream=stream)
    silent.emit("message", 1, message="x")
    assert not (tmp_path / "rank1").exists() and len(silent.records) == 1
