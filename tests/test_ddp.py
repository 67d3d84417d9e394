"""`prunetune finetune` under `torchrun --nproc_per_node 2` on CPU (gloo): one console, one metrics.jsonl,
written by rank 0, and the losses of a single-process run with the same global batch."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunetune.finetune.engine import run_finetune
from prunetune.rundir.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tiny_model_dir, shared_data, tmp_path):
    from test_finetune import make_pruned_dir, small_config

    if not TORCHRUN.is_file():
        pytest.skip(f"{TORCHRUN} is missing")
    pruned = make_pruned_dir(tiny_model_dir, tmp_path / "pruned")
    # Dropout off: each rank draws its own dropout masks, which no single process can reproduce.
    settings = dict(max_steps=4, logging_steps=1, eval_steps=2, save_steps=2, lora_dropout=0.0, seed=3,
                    max_train_samples=32, per_device_eval_batch_size=2)
    single = small_config(pruned, tmp_path / "single", shared_data, per_device_train_batch_size=2, **settings)
    run_finetune(single, stream=io.StringIO())

    ddp_out = tmp_path / "ddp"
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "-m", "prunetune", "finetune", "--pruned", str(pruned),
           "--out", str(ddp_out), "--dataset", "wikitext2", "--data-dir", str(shared_data), "--block-size", "32",
           "--max-train-samples", "32", "--max-eval-samples", "4", "--per_device_eval_batch_size", "2",
           "--per_device_train_batch_size", "1", "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2",
           "--save_steps", "2", "--lr", "3e-3", "--lora-dropout", "0", "--seed", "3", "--probe-steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # One console: every stage printed once.
    assert proc.stdout.count("Training summary") == 1
    assert proc.stdout.count("Step 1/4 ") == 1 and proc.stdout.count("Pre-flight checks:") == 1
    assert sorted(p.name for p in ddp_out.glob("*.jsonl")) == ["metrics.jsonl"]
    records = read_jsonl(ddp_out / "metrics.jsonl")
    steps = [r["step"] for r in records if r["event"] == "log"]
    assert steps == [1, 2, 3, 4]
    assert (ddp_out / "train.log").read_text().count("Training summary") == 1
    start = next(r for r in records if r["event"] == "train_start")
    assert (start["devices"], start["total_batch"]) == (2, 2)

    # Same global batch (2 x 1 vs 1 x 2), same data order: the same losses up to float reduction order.
    want = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "single/metrics.jsonl") if r["event"] == "log"}
    got = {r["step"]: r["loss"] for r in records if r["event"] == "log"}
    assert got == pytest.approx(want, rel=1e-4)
    final = {name: next(r for r in read_jsonl(tmp_path / f"{name}/metrics.jsonl") if r["event"] == "final_eval")
             for name in ("single", "ddp")}
    assert final["ddp"]["eval_loss"] == pytest.approx(final["single"]["eval_loss"], rel=1e-4)
