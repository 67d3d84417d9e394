"""One real `prunetune finetune` run read back three ways — metrics.jsonl, the Trainer's trainer_state.json and
the console text in train.log — gives the same summary numbers, and `prunetune report` on the run directory
writes its files."""

from __future__ import annotations

import json

import pytest

from prunetune.analysis.sources import load_source
from prunetune.analysis.summary import summarize
from prunetune.cli import main
from test_finetune import make_pruned_dir, run, small_config

SAME = ("steps", "log_points", "eval_points", "best_step")
CLOSE = ("final_train_loss", "best_eval_loss", "best_perplexity")


@pytest.mark.slow
def test_finetune_run_gives_one_summary_from_every_source(tiny_model_dir, tmp_path, shared_data, capsys):
    pruned = make_pruned_dir(tiny_model_dir, tmp_path / "pruned")
    out = tmp_path / "run"
    result, _ = run(small_config(pruned, out, shared_data, max_steps=10, logging_steps=2, eval_steps=5))
    assert result["status"] == "completed"

    summaries = {kind: summarize(load_source(out, prefer=kind).records).to_dict()
                 for kind in ("metrics_jsonl", "trainer_state", "console_log")}
    ref = summaries["metrics_jsonl"]
    assert ref["steps"] == 10 and ref["eval_points"] == 2 and ref["log_points"] == 6
    for kind, got in summaries.items():
        for key in SAME:
            assert got[key] == ref[key], (kind, key)
        for key in CLOSE:
            # the console prints 4 decimals; the JSON sources carry full precision
            assert got[key] == pytest.approx(ref[key], rel=1e-3), (kind, key)

    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["summary"]["best_step"] == ref["best_step"]
    assert (out / "report" / "report.html").stat().st_size > 10_000  # plots embedded
