"""A `prunetune finetune` run directory: its train.log is rendered from metrics.jsonl (prunetune.finetune.console),
so the report reads metrics.jsonl whichever of the two it is pointed at (issue 11: one source of truth, no regex
parser of our own console); alerts recorded live reach the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from prunetune.analysis.report import ReportConfig, analyse
from prunetune.analysis.sources import load_source
from prunetune.rundir.records import JsonlWriter, make_record

render = pytest.importorskip("prunetune.finetune.console").render


def _run(out: Path, nan_at: int | None = None) -> Path:
    out.mkdir()
    records = [
        make_record("baseline_eval", None, eval_loss=8.0, perplexity=math.exp(8.0), eval_runtime=1.0,
                    eval_samples_per_second=8.0),
        make_record("train_start", 0, max_steps=200, examples=800, epochs=1.0, per_device_batch=1, devices=1,
                    accumulation=4, total_batch=4, trainable=1000),
    ]
    best = None
    for i in range(1, 21):
        step = i * 10
        if nan_at is not None and step >= nan_at:
            records.append(make_record("alert", step, kind="nan_inf", severity="error",
                                       message=f"LoRA weights became non-finite at step {step}",
                                       evidence={"tensors": 4}, fix="lower --lr"))
            break
        loss = 5.0 * math.exp(-i / 5) + 2.3 + 0.01 * (i % 3)
        records.append(make_record("log", step, epoch=step / 200, loss=loss, lr=1e-4 * (1 - step / 200),
                                   grad_norm=0.8, max_steps=200, elapsed=step * 1.5, eta_s=(200 - step) * 1.5,
                                   tokens_per_s=2730.0 + i, memory_mb=900.0, memory_kind="rss"))
        if step % 50 == 0:
            ev = loss + 0.1
            is_best = best is None or ev < best[1]
            records.append(make_record("eval", step, epoch=step / 200, eval_loss=ev, perplexity=math.exp(ev),
                                       eval_runtime=2.0, eval_samples_per_second=64.0, eval_steps_per_second=8.0,
                                       is_best=is_best, best_before=best[1] if best else None,
                                       best_step=best[0] if best else None))
            best = (step, ev) if is_best else best
    last = records[-1]["step"]
    records.append(make_record("train_end", last, runtime_s=301.4, train_loss=3.0, last_loss=2.3))
    if nan_at is None:
        records.append(make_record("final_eval", last, eval_loss=best[1], perplexity=math.exp(best[1]),
                                   eval_runtime=2.0, eval_samples_per_second=64.0,
                                   baseline_perplexity=math.exp(8.0), reduction_pct=99.0))
    writer = JsonlWriter(out / "metrics.jsonl")
    with (out / "train.log").open("w", encoding="utf-8") as log:
        for rec in records:
            writer.write(rec)
            log.write(render(rec) + "\n")
    writer.close()
    return out


def test_train_log_and_metrics_jsonl_give_the_same_summary(tmp_path):
    run = _run(tmp_path / "run")
    a = analyse(load_source(run, prefer="metrics_jsonl"), ReportConfig(source=run))
    b = analyse(load_source(run, prefer="console_log"), ReportConfig(source=run))
    # the train.log is ours: the report reads the records it was rendered from
    assert b["source"]["kind"] == "metrics_jsonl" and b["source"]["path"].endswith("metrics.jsonl")
    assert load_source(run / "train.log").kind == "metrics_jsonl"
    sa, sb = a["summary"], b["summary"]
    for key in ("steps", "max_steps", "best_step", "eval_points", "log_points"):
        assert sa[key] == sb[key], key
    # the console prints losses with 4 decimals, perplexities with 2, times in whole seconds
    for key in ("final_train_loss", "final_eval_loss", "best_eval_loss"):
        assert sb[key] == pytest.approx(sa[key], abs=6e-5), key
    for key in ("final_perplexity", "pruned_perplexity"):
        assert sb[key] == pytest.approx(sa[key], abs=6e-3), key
    assert sb["time_s"] == pytest.approx(sa["time_s"], abs=0.5)
    assert sb["tokens_per_s"] == pytest.approx(sa["tokens_per_s"], abs=1)
    assert sa["improvement_pct"] == pytest.approx(sb["improvement_pct"], abs=1e-3)
    assert a["verdicts"] == b["verdicts"]
    assert [x["kind"] for x in a["anomalies"]] == [x["kind"] for x in b["anomalies"]] == []


def test_live_alerts_reach_the_report_from_either_source(tmp_path):
    run = _run(tmp_path / "run", nan_at=80)
    for kind in ("metrics_jsonl", "console_log"):
        data = analyse(load_source(run, prefer=kind), ReportConfig(source=run))
        assert [x["kind"] for x in data["anomalies"]] == ["nan_inf"], kind
        assert data["anomalies"][0]["step"] == 80
        assert data["verdicts"]["train_loss"]["label"] == "NaN/Inf"
        assert data["live_alerts"][0]["kind"] == "nan_inf"
