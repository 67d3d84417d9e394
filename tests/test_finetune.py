"""End-to-end tests of `prunetune finetune` on a tiny pruned Llama: the console stages, the files, the
agreement of metrics.jsonl with the Trainer's state, best checkpoint, exact resume, NaN stop, SIGINT, OOM."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunetune import rundir
from prunetune.architecture import prunable_linears
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.console import render
from prunetune.finetune.engine import run_finetune
from prunetune.rundir import save_masks
from prunetune.rundir.records import read_jsonl

REPO = Path(__file__).resolve().parents[1]

STAGES = ("config", "preflight", "model", "lora", "dataset", "baseline_eval", "estimate", "train_start", "log",
          "eval", "checkpoint", "train_end", "best_loaded", "final_eval", "sparsity_check", "adapter_saved", "summary")


def make_pruned_dir(dense: Path, out: Path) -> Path:
    """A `prunetune prune`-shaped directory: half of every decoder weight zeroed, masks saved, prune.json."""
    model = AutoModelForCausalLM.from_pretrained(dense)
    masks = {}
    with torch.no_grad():
        for name, module in prunable_linears(model).items():
            w = module.weight
            keep = w.abs() >= w.abs().flatten().median()  # magnitude 50%, unstructured
            w[~keep] = 0
            masks[name] = keep
    model.save_pretrained(out, safe_serialization=True)
    for f in dense.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    save_masks(masks, out, {"pattern": "unstructured"})
    (out / "prune.json").write_text(json.dumps({"model": str(dense), "pruned_perplexity": 600.0,
                                                "config": {"method": "magnitude", "sparsity": 0.5}}))
    return out


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_pruned_dir(tiny_model_dir, tmp_path_factory.mktemp("pruned"))


def small_config(pruned: Path, out: Path, shared_data: Path, **overrides) -> FinetuneConfig:
    base = dict(
        pruned=str(pruned), out=str(out), dataset="wikitext2", data_dir=str(shared_data), block_size=32,
        max_train_samples=48, max_eval_samples=4, per_device_eval_batch_size=4, max_steps=12, logging_steps=2,
        eval_steps=4, save_steps=6, lr=3e-3, probe_steps=1,
    )
    base.update(overrides)
    return FinetuneConfig(**base)


def killed_copy(finished: Path, out: Path, *dropped: str) -> Path:
    """A copy of a finished run as a run killed after its last training step: its result (adapter/ or model/),
    the directories in `dropped` and the records of its ending (train_end ... summary) are not there. "Finished"
    is what the records say, so deleting the result alone would not make a run unfinished."""
    from prunetune.finetune.resume import ENDING_EVENTS

    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("adapter", "model", *dropped))
    kept = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] not in ENDING_EVENTS]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def run(cfg: FinetuneConfig) -> tuple[dict, str]:
    stream = io.StringIO()
    return run_finetune(cfg, stream=stream), stream.getvalue()


@pytest.mark.slow
def test_end_to_end_console_files_and_agreement(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    result, console = run(small_config(pruned_dir, out, shared_data))
    assert result["status"] == "completed"

    records = read_jsonl(out / "metrics.jsonl")
    events = [r["event"] for r in records]
    firsts = [events.index(stage) for stage in STAGES]
    assert firsts == sorted(firsts), [STAGES[i] for i in range(len(STAGES))]
    # train.log is the console, and both are the rendering of the records, line for line.
    rendered = "".join(render(r) + "\n" for r in records)
    assert (out / "train.log").read_text() == rendered
    assert console == rendered

    for name in ("train.log", "metrics.jsonl", "trainer_state.json", "all_results.json", "run_config.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/prunetune_adapter.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "adapter/prunetune_adapter.json").read_text())
    assert Path(meta["pruned_model"]) == pruned_dir.resolve()
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["config"]["lora_r"] == 8 and "versions" in run_config["provenance"]

    # metrics.jsonl agrees with the Trainer's own log_history.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {r["step"]: r["loss"] for r in records if r["event"] == "log"}
    assert losses == {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == [1, 2, 4, 6, 8, 10, 12]
    evals = {r["step"]: r["eval_loss"] for r in records if r["event"] == "eval"}
    assert evals == {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals) == [4, 8, 12]
    for r in records:
        if r["event"] == "eval":
            assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))

    # Best checkpoint = lowest eval loss (saved even when save_steps does not fall on it), and it is loaded.
    best_step = min(evals, key=evals.get)
    loaded = next(r for r in records if r["event"] == "best_loaded")
    assert loaded["checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert (out / f"checkpoint-{best_step}" / "adapter_model.safetensors").is_file()
    flagged = [r["step"] for r in records if r["event"] == "eval" and r["is_best"]]
    assert flagged[-1] == best_step
    saved = load_file(out / "adapter/adapter_model.safetensors")
    best = load_file(out / f"checkpoint-{best_step}/adapter_model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    assert all(r["ok"] for r in records if r["event"] == "checkpoint")

    # The final eval uses the same eval set as the baseline, after loading the best checkpoint.
    baseline = next(r for r in records if r["event"] == "baseline_eval")
    final = next(r for r in records if r["event"] == "final_eval")
    assert final["baseline_perplexity"] == baseline["perplexity"]
    # Plain LoRA: the adapter's own number is the best checkpoint's; the headline is the deployable model's.
    assert final["adapter_eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)
    assert final["describes"].startswith("deployable sparse model")
    assert final["adapter_eval_loss"] < baseline["eval_loss"] and math.isfinite(final["eval_loss"])
    model_record = next(r for r in records if r["event"] == "model")
    assert model_record["mask_source"] == "prunetune/masks.safetensors"
    check = next(r for r in records if r["event"] == "sparsity_check")
    assert check["ok"] and check["matrices"] == 14
    summary = next(r for r in records if r["event"] == "summary")
    commands = [c for _, c in summary["next_steps"]]
    assert commands[0].startswith(f"prunetune evaluate --model {pruned_dir} --adapter {out / 'adapter'}")
    assert commands[1] == f"prunetune report {out}"
    assert commands[2] == f"prunetune merge --adapter {out / 'adapter'} --out {out / 'merged'}"
    # The pruned model's files were only read.
    assert json.loads((pruned_dir / "prune.json").read_text())["pruned_perplexity"] == 600.0


@pytest.mark.slow
def test_resume_equals_uninterrupted(pruned_dir, shared_data, tmp_path):
    full = tmp_path / "full"
    cfg = small_config(pruned_dir, full, shared_data, max_steps=8, logging_steps=1, eval_steps=4, save_steps=4,
                       lr=3e-3, warmup_steps=2)
    run(cfg)
    # A run killed after its step-4 checkpoint: its directory as it was (records past step 4 included).
    killed = killed_copy(full, tmp_path / "killed", "checkpoint-8")
    resumed_cfg = small_config(pruned_dir, killed, shared_data, max_steps=8, logging_steps=1, eval_steps=4,
                               save_steps=4, lr=3e-3, warmup_steps=2, resume_from_checkpoint="auto")
    result, _ = run(resumed_cfg)
    assert result["status"] == "completed"

    def losses(path: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(path / "metrics.jsonl") if r["event"] == "log"}

    want, got = losses(full), losses(killed)
    assert sorted(got) == list(range(1, 9))
    assert got == want  # exactly, on CPU
    records = read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "resume"] == [4]
    assert sum(1 for r in records if r["event"] == "log" and r["step"] == 5) == 1  # superseded lines dropped
    assert records[-1]["event"] == "summary"
    assert [r["event"] for r in records].count("summary") == 1


@pytest.mark.slow
def test_absurd_lr_raises_nan_alert_stops_and_keeps_last_good_checkpoint(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "nan"
    # The warmup makes step 1's LR 0 (a good checkpoint); step 2's LR overflows the LoRA weights.
    cfg = small_config(pruned_dir, out, shared_data, lr=3e38, warmup_steps=3, max_steps=8, logging_steps=1,
                       eval_steps=1, save_steps=1)
    result, console = run(cfg)
    assert result["status"] == "diverged"
    records = read_jsonl(out / "metrics.jsonl")
    alerts = [r for r in records if r["event"] == "alert" and r["kind"] == "nan_inf"]
    assert len(alerts) == 1 and alerts[0]["step"] == 2
    stopped = next(r for r in records if r["event"] == "stopped")
    assert stopped["checkpoint"] == str(out / "checkpoint-1")
    assert max(r["step"] for r in records if r["event"] == "log") <= 2
    assert not (out / "checkpoint-2").exists() and not (out / "adapter").exists()
    good = load_file(out / "checkpoint-1/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert "ALERT [nan_inf]" in console


def test_preflight_refuses_missing_model_and_existing_run(pruned_dir, shared_data, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="prunetune prune"):
        run(small_config(missing, tmp_path / "a", shared_data))
    assert not (tmp_path / "a").exists()  # a failed pre-flight writes nothing

    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text('{"event": "log", "step": 1, "time": 0, "loss": 1.0}\n')
    # Without prunetune's file list the directory is the user's, whatever its files are called.
    with pytest.raises(UserError, match="holds no prunetune output"):
        run(small_config(pruned_dir, existing, shared_data, overwrite=True))
    rundir.claim(existing, ["metrics.jsonl"], "prunetune finetune")  # now a run of prunetune's
    with pytest.raises(UserError, match="overwrite"):
        run(small_config(pruned_dir, existing, shared_data))
    assert (existing / "metrics.jsonl").read_text().startswith('{"event": "log"')  # untouched

    with pytest.raises(UserError, match="dataset"):
        run(small_config(pruned_dir, tmp_path / "b", shared_data, dataset=str(tmp_path / "missing.txt")))


def test_out_of_memory_is_caught_with_fixes_and_resume_command(pruned_dir, shared_data, tmp_path, monkeypatch):
    from prunetune.finetune.trainer import PrunetuneTrainer

    calls = {"n": 0}
    original = PrunetuneTrainer.training_step

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrunetuneTrainer, "training_step", training_step)
    out = tmp_path / "oom"
    with pytest.raises(UserError, match="out of memory"):
        run(small_config(pruned_dir, out, shared_data, max_steps=4, eval_strategy="no",
                         load_best_model_at_end=False, block_size=256, max_train_samples=8))
    errors = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "error"]
    assert len(errors) == 1 and errors[0]["kind"] == "out_of_memory"
    assert "--block-size 128" in errors[0]["fix"] and "--gradient_checkpointing" in errors[0]["fix"]
    assert errors[0]["resume_command"].endswith("--resume_from_checkpoint auto")
    assert "Resume with:" in (out / "train.log").read_text()


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "prunetune", "finetune", "--pruned", str(pruned_dir), "--out", str(out),
           "--dataset", "wikitext2", "--data-dir", str(shared_data), "--block-size", "32",
           "--max-train-samples", "48", "--max-eval-samples", "4", "--per_device_eval_batch_size", "4",
           "--max_steps", "400", "--logging_steps", "1", "--eval_steps", "1000", "--save_steps", "1000",
           "--lr", "3e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    metrics = out / "metrics.jsonl"

    def logged_steps() -> bool:
        return metrics.is_file() and any(r["event"] == "log" and r["step"] >= 3 for r in read_jsonl(metrics))

    try:
        assert _wait_for(logged_steps, 120), "training never reached step 3"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    records = read_jsonl(metrics)
    stopped = next(r for r in records if r["event"] == "stopped")
    step = stopped["step"]
    assert 3 <= step < 400
    ckpt = out / f"checkpoint-{step}"
    assert stopped["checkpoint"] == str(ckpt)
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    assert "--resume_from_checkpoint auto" in stopped["resume_command"] and "Resume with:" in output

    # The printed resume command works: it continues from that checkpoint (shortened here to save time).
    resumed = small_config(pruned_dir, out, shared_data, max_steps=400, logging_steps=1, eval_steps=1000,
                           save_steps=1000, resume_from_checkpoint="auto")
    from prunetune.finetune import engine

    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == step
    # Only check that training restarts at step+1: stop it right away through the same signal path.
    stream = io.StringIO()
    guard_cls = engine.SignalGuard

    class ImmediateStop(guard_cls):
        def __enter__(self):
            super().__enter__()
            self.received = signal.SIGINT
            return self

    engine.SignalGuard = ImmediateStop
    try:
        result = run_finetune(resumed, stream=stream)
    finally:
        engine.SignalGuard = guard_cls
    assert result["status"] == "interrupted"
    logs = [r["step"] for r in read_jsonl(metrics) if r["event"] == "log"]
    assert logs[-1] == step + 1 and logs == list(range(1, step + 2))
    # One history: the first session's ending was superseded by the resume (monitor must not see it finished).
    events = [r["event"] for r in read_jsonl(metrics)]
    assert events.count("stopped") == 1 and events.index("resume") < events.index("stopped")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_in_each_precision(pruned_dir, shared_data, tmp_path, precision):
    out = tmp_path / precision
    cfg = small_config(pruned_dir, out, shared_data, device="cuda", bf16=precision == "bf16",
                       fp16=precision == "fp16", dtype="float32" if precision == "fp32" else "auto",
                       max_steps=8, eval_steps=4, save_steps=4, block_size=64)
    result, _ = run(cfg)
    assert result["status"] == "completed"
    records = read_jsonl(out / "metrics.jsonl")
    model = next(r for r in records if r["event"] == "model")
    assert model["device"] == "cuda"
    assert model["dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    logs = [r for r in records if r["event"] == "log"]
    assert logs and all(r["memory_kind"] == "gpu" and r["memory_mb"] > 0 for r in logs)
    assert all(math.isfinite(r["loss"]) for r in logs)
    final = next(r for r in records if r["event"] == "final_eval")
    # The adapter number (what training moved; the deployable number masks the dense update).
    assert final["adapter_eval_loss"] < next(r for r in records if r["event"] == "baseline_eval")["eval_loss"]
    assert next(r for r in records if r["event"] == "sparsity_check")["ok"]


@pytest.mark.gpu
def test_cuda_distillation_and_gradient_checkpointing(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "kd"
    cfg = small_config(pruned_dir, out, shared_data, device="cuda", bf16=True, distill=True,
                       gradient_checkpointing=True, max_steps=6, eval_steps=3, save_steps=3, block_size=64)
    result, _ = run(cfg)
    assert result["status"] == "completed" and result["sparsity_ok"]
    final = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "final_eval")
    assert math.isfinite(final["eval_loss"])


def test_resume_auto_without_checkpoint_starts_over(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "log", "step": 1, "time": 0, "loss": 99.0}\n')
    rundir.claim(out, ["metrics.jsonl"], "prunetune finetune")  # a run of prunetune's that never saved a checkpoint
    cfg = small_config(pruned_dir, out, shared_data, max_steps=1, eval_strategy="no", load_best_model_at_end=False,
                       resume_from_checkpoint="auto", probe_steps=0)
    result, console = run(cfg)
    assert result["status"] == "completed"
    assert "no checkpoint to resume from" in console
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "log"] != [99.0]


def test_live_alert_from_the_shared_rules_is_printed_once(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "flat"
    # One training sequence and an LR that cannot move the weights: the train loss stays flat (`loss_flat`).
    cfg = small_config(pruned_dir, out, shared_data, lr=1e-12, max_steps=14, logging_steps=1, eval_strategy="no",
                       load_best_model_at_end=False, probe_steps=0, max_train_samples=1, lora_dropout=0.0,
                       alert_thresholds={"min_train_points": 6})
    result, console = run(cfg)
    assert result["status"] == "completed"
    records = read_jsonl(out / "metrics.jsonl")
    alerts = [r for r in records if r["event"] == "alert"]
    assert [a["kind"] for a in alerts] == ["loss_flat"]
    assert alerts[0]["fix"] and alerts[0]["evidence"]
    events = [(r["event"], r["step"]) for r in records]
    position = events.index(("alert", alerts[0]["step"]))
    assert alerts[0]["step"] >= 6  # not before the evidence (6 points) existed ...
    assert ("log", 14) in events[position:]  # ... and raised live, while training went on
    assert console.count("ALERT [loss_flat]") == 1


@pytest.mark.slow
def test_time_budget_cuts_the_steps_before_training_and_a_resume_keeps_them(pruned_dir, shared_data, tmp_path,
                                                                              monkeypatch):
    """--max-train-minutes: the steps that fit the measured step time run, with the schedule sized to them
    (the run ends normally: best checkpoint, final evaluation); a resumed session keeps that number even when
    its own probe is faster, so its learning-rate schedule is the first session's."""
    import prunetune.finetune.engine as engine
    from prunetune.budget import fit_steps

    monkeypatch.setattr(engine, "probe_seconds", lambda *a, **k: 0.5)  # a slow machine, deterministically
    out = tmp_path / "budget"
    cfg = small_config(pruned_dir, out, shared_data, max_steps=12, logging_steps=1, eval_steps=4, save_steps=2,
                       max_train_minutes=0.05)  # 3 s at 0.5 s/step, plus the measured evaluations
    result, console = run(cfg)
    records = read_jsonl(out / "metrics.jsonl")
    estimate = next(r for r in records if r["event"] == "estimate")
    # The evaluation's time is measured (it varies with the machine's load); the fit is exact given it: 5 steps
    # on a quiet machine (evaluation ~0.0x s), fewer under load, never all 12.
    n = fit_steps(3.0, 12, 0.5, estimate["eval_s"], 4).steps
    assert 3 <= n <= 5 and (estimate["planned_steps"], estimate["budget_steps"], estimate["budget_cut"]) == (12, n, True)
    assert estimate["max_steps"] == n and estimate["budget_s"] == 3.0
    assert f"12 planned steps do not fit; training runs {n}" in console
    assert result["status"] == "completed"
    assert next(r for r in records if r["event"] == "train_start")["max_steps"] == n
    assert max(r["step"] for r in records if r["event"] == "log") == n
    lrs = [r["lr"] for r in records if r["event"] == "log"]
    assert lrs[-1] < lrs[0] / 3  # linear decay to ~0 over n steps, not over 12
    assert {"final_eval", "summary"} <= {r["event"] for r in records}

    # Resumed from an earlier checkpoint on a machine whose probe would fit all 12 steps: still n.
    monkeypatch.setattr(engine, "probe_seconds", lambda *a, **k: 0.01)
    killed = killed_copy(out, tmp_path / "killed", f"checkpoint-{n}")
    result, console = run(dataclasses.replace(cfg, out=str(killed), resume_from_checkpoint="auto"))
    assert result["status"] == "completed"
    records = read_jsonl(killed / "metrics.jsonl")
    resumed = [r for r in records if r["event"] == "estimate"][-1]
    assert resumed["reused"] and resumed["budget_steps"] == n and resumed["max_steps"] == n
    assert f"{n} steps, as fitted by the first session" in console
    want = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "log"}
    got = {r["step"]: r["loss"] for r in records if r["event"] == "log"}
    assert got == want  # the same schedule: the same losses, exactly


def test_time_budget_needs_the_probe_and_a_positive_number(pruned_dir, shared_data, tmp_path):
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(UserError, match="max-train-minutes must be a positive number"):
            small_config(pruned_dir, tmp_path / "x", shared_data, max_train_minutes=bad)
    with pytest.raises(UserError, match="needs probe_steps >= 1"):
        small_config(pruned_dir, tmp_path / "x", shared_data, max_train_minutes=5, probe_steps=0)
