"""Fine-tuning under FSDP2 through accelerate (issue 23): `accelerate launch` with `fsdp_version: 2` on 2 CPU
processes (gloo; tests/fsdp_cpu.py lets accelerate shard on CPUs as it does on GPUs), against one process with the
same global batch (2 x 1 vs 1 x 2).

sparse-ft: the losses and gradient norms of all 10 steps agree within 1e-5 (relative); the run is stopped by
Ctrl-C (SIGINT to the launcher: it passes the workers SIGTERM) and resumed from its sharded checkpoint, so the
steps after the interruption check the resume too; the zeros are exact on every rank (the sparsity check sums each
rank's count of its own shards); each rank holds half of the trained state (weights, AdamW state, masks); the
gathered model passes `verify`. LoRA and masked LoRA: the same agreement, and the adapter a single process writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.engine import run_finetune
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.verify import verify_dir
from prunetune.rundir.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIG = REPO / "tests" / "fixtures" / "fsdp" / "fsdp2-cpu-2.yaml"
# Dropout off: each rank draws its own masks, which one process cannot reproduce. float32: FSDP's mixed precision
# casts whole weights before the forward, autocast casts per operation; the comparison is of the sharding alone.
# A constant LR: the interrupted run is launched for 400 steps (so Ctrl-C lands before step 10) and resumed for 10.
SETTINGS = dict(block_size=32, max_train_samples=40, max_eval_samples=4, per_device_eval_batch_size=2, max_steps=10,
                logging_steps=1, eval_steps=5, save_steps=5, lr=3e-3, seed=3, probe_steps=1, dtype="float32",
                lora_dropout=0.0, dataset="wikitext2", lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "pruned"
    return run_prune(PruneConfig(model=str(tiny_model_dir), out=str(out), method="wanda", pattern="unstructured",
                                 sparsity=0.5, calib_dataset="wikitext2", data_dir=str(shared_data), nsamples=4,
                                 seqlen=32, device="cpu"), console=Console(quiet=True))


def one_process(pruned: Path, out: Path, shared_data: Path, method: str) -> list[dict]:
    cfg = FinetuneConfig(pruned=str(pruned), out=str(out), data_dir=str(shared_data), method=method,
                         per_device_train_batch_size=2, **SETTINGS)
    import io

    run_finetune(cfg, stream=io.StringIO())
    return read_jsonl(out / "metrics.jsonl")


def fsdp_command(pruned: Path, out: Path, shared_data: Path, method: str, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return [str(ACCELERATE), "launch", "--config_file", str(CONFIG), str(REPO / "tests" / "fsdp_cpu.py"), "finetune",
            "--pruned", str(pruned), "--out", str(out), "--data-dir", str(shared_data), "--method", method,
            "--per-device-train-batch-size=1", *flags, *extra]


def fsdp_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "src")])}


def logged(records: list[dict]) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records if r["event"] == "log"}


def assert_same_steps(got: dict, want: dict, steps: range) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_sparse_ft_under_fsdp2_matches_one_process_and_resumes_after_ctrl_c(pruned, shared_data, tmp_path):
    if not ACCELERATE.is_file():
        pytest.skip(f"{ACCELERATE} is missing")
    want = one_process(pruned, tmp_path / "single", shared_data, "sparse-ft")

    out = tmp_path / "fsdp"
    metrics = out / "metrics.jsonl"
    # Ctrl-C in a terminal reaches the launcher (the workers run in sessions of their own); it stops them with
    # SIGTERM, and each saves its shards of a checkpoint at the end of the step.
    proc = subprocess.Popen(fsdp_command(pruned, out, shared_data, "sparse-ft", "--max-steps=400"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fsdp_env(), cwd=REPO,
                            start_new_session=True)
    try:
        assert wait_for(lambda: metrics.is_file() and any(r["event"] == "log" and r["step"] >= 3
                                                          for r in read_jsonl(metrics)), 300), "no step 3"
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = next((r for r in read_jsonl(metrics) if r["event"] == "stopped"), None)
    assert stopped is not None and stopped["reason"] == "signal", output[-3000:]
    step = stopped["step"]
    ckpt = out / f"checkpoint-{step}"
    # Sharded: each rank wrote its pieces; no process gathered the weights or the AdamW state.
    assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").is_file() and (ckpt / "optimizer_0" / ".metadata").is_file()
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.pt").exists()

    # The printed resume command, as 10 steps in all: the rest of the run continues from those shards.
    resumed = subprocess.run(fsdp_command(pruned, out, shared_data, "sparse-ft", "--resume-from-checkpoint=auto"),
                             capture_output=True, text=True, env=fsdp_env(), cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = read_jsonl(metrics)
    assert 3 <= step < 10, f"interrupted at {step}: the resume must have steps left to check"
    assert_same_steps(logged(records), logged(want), range(1, 11))

    check = next(r for r in records if r["event"] == "sparsity_check")
    assert check["ok"] and check["violations"] == [] and check["matrices"] == 14
    # Half the trained state on each rank: weights, both AdamW moments and masks, each cut in two.
    single = next(r for r in want if r["event"] == "train_end")["rank_memory"][0]
    ranks = next(r for r in records if r["event"] == "train_end" and r["stop_reason"] is None)["rank_memory"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank == {key: value // 2 for key, value in single.items()}
        assert set(rank) == {"param_bytes", "optimizer_state_bytes", "mask_bytes"}
    # The model gathered into one directory: the pruned pattern, and the weights one process trained.
    result = verify_dir(out / "model")
    assert result.ok and result.checked == 14
    ours, theirs = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "single/model/model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "masked-lora"])
def test_lora_methods_under_fsdp2_match_one_process(pruned, shared_data, tmp_path, method):
    if not ACCELERATE.is_file():
        pytest.skip(f"{ACCELERATE} is missing")
    want = one_process(pruned, tmp_path / "single", shared_data, method)
    out = tmp_path / "fsdp"
    proc = subprocess.run(fsdp_command(pruned, out, shared_data, method), capture_output=True, text=True,
                          env=fsdp_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert_same_steps(logged(records), logged(want), range(1, 11))
    assert next(r for r in records if r["event"] == "sparsity_check")["ok"]
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
    meta = json.loads((out / "adapter" / "prunetune_adapter.json").read_text())
    assert meta["method"] == method
    shutil.rmtree(out)
