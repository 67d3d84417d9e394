"""Hostile inputs and faults for `prunetune finetune` and `prunetune merge` (issue 12), on the tiny model:
finished runs never restarted, one writer per directory, complete-or-absent checkpoints, corrupt checkpoints
skipped before any record is touched, user errors that leave nothing blocking, a new LR on resume, NaN evals,
foreign adapters, oversized blocks, whole-run summaries after a resume, and exact resume after signals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from safetensors.torch import load_file, save_file

from prunetune import rundir
from prunetune.errors import UserError
from prunetune.finetune import callbacks
from prunetune.finetune.engine import run_finetune
from prunetune.finetune.trainer import CHECKPOINT_STAGING
from prunetune.merge import MergeConfig, run_merge
from prunetune.models import load_model
from prunetune.rundir.records import read_jsonl
from test_finetune import REPO, killed_copy, make_pruned_dir, run, small_config


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_pruned_dir(tiny_model_dir, tmp_path_factory.mktemp("pruned"))


@pytest.fixture(scope="module")
def finished(pruned_dir, shared_data, tmp_path_factory) -> Path:
    """A finished 8-step run (checkpoints at 4 and 8), to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result, _ = run(small_config(pruned_dir, out, shared_data, max_steps=8, logging_steps=1, eval_steps=4,
                                 save_steps=4, warmup_steps=2))
    assert result["status"] == "completed"
    return out


def _interrupted(finished: Path, out: Path, *dropped: str) -> Path:
    return killed_copy(finished, out, *dropped)


def _events(out: Path) -> list[str]:
    return [r["event"] for r in read_jsonl(out / "metrics.jsonl")]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "log"}


def _resume_cfg(pruned_dir, out, shared_data, **overrides):
    base = dict(max_steps=8, logging_steps=1, eval_steps=4, save_steps=4, warmup_steps=2,
                resume_from_checkpoint="auto")
    return small_config(pruned_dir, out, shared_data, **(base | overrides))


# -- 1: a finished run is never restarted by `auto` -------------------------------------------------------
@pytest.mark.parametrize("checkpoints", ["pruned", "kept"])
def test_auto_never_restarts_a_finished_run(finished, pruned_dir, shared_data, tmp_path, checkpoints):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if checkpoints == "pruned":
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
    adapter = (out / "adapter/adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="finished run.*--overwrite.*another --out"):
        run(_resume_cfg(pruned_dir, out, shared_data))
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == adapter
    assert _events(out) == _events(finished)


# -- 2: one writer per run directory ----------------------------------------------------------------------
def _foreign_lock(directory: Path) -> subprocess.Popen:
    """A live process that holds `directory`'s lock (its pid in the lock file)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / rundir.LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                          "command": "prunetune finetune", "started": "now"}))
    return holder


def test_second_writer_is_refused_and_a_dead_lock_taken_over(finished, pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    _interrupted(finished, out, "checkpoint-8")
    before = (out / "metrics.jsonl").read_text()
    holder = _foreign_lock(out)
    try:
        with pytest.raises(UserError, match=f"being written by pid {holder.pid}"):
            run(_resume_cfg(pruned_dir, out, shared_data))
        assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    result, _ = run(_resume_cfg(pruned_dir, out, shared_data))  # the holder died: its lock is taken over
    assert result["status"] == "completed" and not (out / rundir.LOCK_FILE).exists()


def test_merge_refuses_a_second_writer(finished, tmp_path):
    out = tmp_path / "merged"
    holder = _foreign_lock(out)
    try:
        with pytest.raises(UserError, match="being written by"):
            run_merge(MergeConfig(adapter=str(finished / "adapter"), out=str(out)), Console(quiet=True))
    finally:
        holder.kill()
        holder.wait()


# -- 3: merge --overwrite replaces only what prunetune wrote ------------------------------------------------
def test_merge_overwrite_keeps_the_users_files(finished, tmp_path):
    out = tmp_path / "merged"
    cfg = MergeConfig(adapter=str(finished / "adapter"), out=str(out))
    run_merge(cfg, Console(quiet=True))
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval/results.json").write_text("{}")
    run_merge(MergeConfig(adapter=str(finished / "adapter"), out=str(out), overwrite=True), Console(quiet=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval/results.json").read_text() == "{}"
    assert (out / "merge.json").is_file() and (out / "model.safetensors").is_file()


# -- 6, 7: complete-or-absent checkpoints; damaged ones skipped before any record is touched ----------------
def test_checkpoints_are_staged_then_renamed(finished):
    assert not (finished / CHECKPOINT_STAGING).exists()
    sessions = json.loads((finished / "checkpoint-4/prunetune_sessions.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in sessions] == [(0, 4)]


@pytest.mark.parametrize("damage", ["interrupted_save", "truncated_adapter", "truncated_optimizer"])
def test_auto_resumes_from_the_newest_complete_checkpoint(finished, pruned_dir, shared_data, tmp_path, damage):
    out = tmp_path / "run"
    _interrupted(finished, out)
    newest = out / "checkpoint-8"
    if damage == "interrupted_save":  # kill -9 mid-save: the staging dir, and a checkpoint-8 of an old version
        shutil.copytree(newest, out / CHECKPOINT_STAGING / "checkpoint-8")
        (newest / "trainer_state.json").unlink()
    else:
        name = "adapter_model.safetensors" if damage == "truncated_adapter" else "optimizer.pt"
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    result, console = run(_resume_cfg(pruned_dir, out, shared_data))
    assert result["status"] == "completed"
    resume = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "resume")
    assert resume["step"] == 4 and any("checkpoint-8" in line for line in resume["skipped"])
    assert "Skipped" in console and "checkpoint-8" in console
    assert _losses(out) == _losses(finished)  # the run continued exactly from step 4


def test_explicit_damaged_checkpoint_is_one_line_error_and_touches_nothing(finished, pruned_dir, shared_data,
                                                                           tmp_path):
    out = tmp_path / "run"
    _interrupted(finished, out)
    (out / "checkpoint-8/optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"cannot be resumed: optimizer.pt is unreadable") as err:
        run(_resume_cfg(pruned_dir, out, shared_data, resume_from_checkpoint=str(out / "checkpoint-8")))
    assert "\n" not in str(err.value)
    assert (out / "metrics.jsonl").read_text() == before


# -- 8: a run stopped by a user error leaves nothing that blocks the corrected rerun ----------------------
def test_user_error_after_the_files_opened_is_logged_and_does_not_block(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--lora-targets nope not found"):
        run(small_config(pruned_dir, out, shared_data, lora_targets="nope", max_steps=2, eval_strategy="no",
                         load_best_model_at_end=False, probe_steps=0))
    log = (out / "train.log").read_text()
    assert "Error: --lora-targets nope not found" in log
    assert read_jsonl(out / "metrics.jsonl")[-1]["kind"] == "user_error"
    result, console = run(small_config(pruned_dir, out, shared_data, max_steps=2, eval_strategy="no",
                                       load_best_model_at_end=False, probe_steps=0))
    assert result["status"] == "completed" and "stopped before training" in console


def test_refused_preflight_leaves_no_directory(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(UserError):
        run(small_config(pruned_dir, out, shared_data, dataset=str(tmp_path / "missing.txt")))
    assert not out.exists()


# -- 15: a new --lr on resume is what trains -----------------------------------------------------------------
def test_resume_with_a_new_lr_applies_it(finished, pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    _interrupted(finished, out, "checkpoint-8")
    result, console = run(_resume_cfg(pruned_dir, out, shared_data, lr=3e-4))
    assert result["status"] == "completed"
    records = read_jsonl(out / "metrics.jsonl")
    changed = next(r for r in records if r["event"] == "message" and r.get("kind") == "lr_changed")
    assert changed["old_lr"] == pytest.approx(3e-3) and changed["new_lr"] == pytest.approx(3e-4)
    old = {r["step"]: r["lr"] for r in read_jsonl(finished / "metrics.jsonl") if r["event"] == "log"}
    new = {r["step"]: r["lr"] for r in records if r["event"] == "log"}
    for step in range(5, 9):  # the same schedule shape, 10x lower
        assert new[step] == pytest.approx(old[step] / 10, rel=1e-6)
    assert json.loads((out / "run_config.json").read_text())["config"]["lr"] == pytest.approx(3e-4)
    assert "3e-4" in console


# -- 16: a non-finite eval stops the run; "last good" is the last checkpoint with finite metrics ------------
def test_nan_eval_stops_the_run(pruned_dir, shared_data, tmp_path, monkeypatch):
    original = callbacks.MonitorCallback.on_evaluate

    def nan_at_step_8(self, args, state, control, metrics=None, **kwargs):
        if self.phase == "train" and state.global_step == 8:
            metrics = dict(metrics or {}) | {"eval_loss": float("nan")}
        return original(self, args, state, control, metrics=metrics, **kwargs)

    monkeypatch.setattr(callbacks.MonitorCallback, "on_evaluate", nan_at_step_8)
    out = tmp_path / "run"
    result, console = run(small_config(pruned_dir, out, shared_data, max_steps=12, eval_steps=4, save_steps=4))
    assert result["status"] == "diverged" and result["last_good_checkpoint"] == str(out / "checkpoint-4")
    records = read_jsonl(out / "metrics.jsonl")
    assert max(r["step"] for r in records if r["event"] == "log") == 8
    assert not (out / "checkpoint-8").exists() and not (out / "adapter").exists()
    assert next(r for r in records if r["event"] == "stopped")["checkpoint"] == str(out / "checkpoint-4")
    assert "ALERT [nan_inf]" in console


# -- 17: merge refuses an adapter trained on another base ----------------------------------------------------
def test_merge_refuses_an_adapter_of_another_base(finished, pruned_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(pruned_dir, other)
    weights = load_file(other / "model.safetensors")
    weights = {k: v * 1.01 if v.dtype.is_floating_point else v for k, v in weights.items()}  # same shapes and zeros
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(adapter=str(finished / "adapter"), model=str(other))
    with pytest.raises(UserError, match="trained on another base.*--force"):
        run_merge(MergeConfig(out=str(tmp_path / "m1"), **cfg), Console(quiet=True))
    assert not (tmp_path / "m1").exists()
    record = run_merge(MergeConfig(out=str(tmp_path / "m2"), force=True, **cfg), Console(quiet=True))
    assert "--force" in record["base_check"]
    same = run_merge(MergeConfig(adapter=str(finished / "adapter"), out=str(tmp_path / "m3")), Console(quiet=True))
    assert "matches" in same["base_check"]


# -- 18: a block longer than the model's context is refused --------------------------------------------------
def test_block_size_above_context_is_refused(pruned_dir, shared_data, tmp_path):
    with pytest.raises(UserError, match="--block-size 2048 exceeds the model's context of 1024"):
        run(small_config(pruned_dir, tmp_path / "run", shared_data, block_size=2048))
    assert not (tmp_path / "run").exists()


# -- 19: after a resume the summary covers the whole run ------------------------------------------------------
def test_summary_after_resume_covers_the_whole_run(finished, pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    _interrupted(finished, out, "checkpoint-8")
    result, console = run(_resume_cfg(pruned_dir, out, shared_data))
    want = next(r for r in read_jsonl(finished / "metrics.jsonl") if r["event"] == "summary")
    got = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "summary")
    assert got["mean_train_loss"] == pytest.approx(want["mean_train_loss"], rel=1e-6)
    assert [(s["from_step"], s["to_step"]) for s in got["sessions"]] == [(0, 4), (4, 8)]
    assert got["total_time_s"] == pytest.approx(sum(s["seconds"] for s in got["sessions"]))
    assert got["total_time_s"] > got["sessions"][-1]["seconds"]
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] == pytest.approx(want["mean_train_loss"], rel=1e-6)
    assert "over 2 sessions" in console


# -- signals: exact resume after SIGTERM and SIGKILL ------------------------------------------------------------
def _start(pruned_dir, shared_data, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prunetune", "finetune", "--pruned", str(pruned_dir), "--out", str(out),
           "--dataset", "wikitext2", "--data-dir", str(shared_data), "--block-size", "32",
           "--max-train-samples", "48", "--max-eval-samples", "4", "--per_device_eval_batch_size", "4",
           "--max_steps", "400", "--logging_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end",
           "false", "--save_steps", "2", "--lr", "3e-3", "--probe_steps", "0", "--lr_scheduler_type", "constant"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_exact_resume_after_a_signal(pruned_dir, shared_data, tmp_path, sig):
    # A constant LR: the schedule does not depend on max_steps, so the killed 400-step run and the 12-step
    # reference train alike, and the resume may stop at 12.
    common = dict(max_steps=12, logging_steps=1, eval_strategy="no", load_best_model_at_end=False, save_steps=2,
                  probe_steps=0, lr_scheduler_type="constant")
    full = tmp_path / "full"
    run(small_config(pruned_dir, full, shared_data, **common))
    out = tmp_path / "killed"
    proc = _start(pruned_dir, shared_data, out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").is_file() and any(
                    r["event"] == "log" and r["step"] >= 3 for r in read_jsonl(out / "metrics.jsonl")):
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in output
    assert proc.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    result = run_finetune(small_config(pruned_dir, out, shared_data, resume_from_checkpoint="auto", **common),
                          stream=open(os.devnull, "w"))  # noqa: SIM115
    assert result["status"] == "completed"
    got, want = _losses(out), _losses(full)
    assert sorted(got) == list(range(1, 13)) and all(math.isclose(got[s], want[s], rel_tol=0) for s in want)


def test_adapter_records_the_digest_of_its_base(finished, pruned_dir):
    model, _ = load_model(str(pruned_dir))
    assert rundir.read_adapter_meta(finished / "adapter")["base_digest"] == rundir.base_digest(
        model, rundir.load_keep_masks(pruned_dir, model)[0])


# -- 9: an --out that cannot be written is a one-line error before any work ---------------------------------
@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_unwritable_out_is_refused_before_work(pruned_dir, shared_data, tmp_path, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    out = blocker if where == "a_file" else blocker / "run"
    with pytest.raises(UserError, match="is a file|under the file"):
        run(small_config(pruned_dir, out, shared_data))
    assert blocker.read_text() == "mine"


def test_a_finished_sparse_ft_run_is_not_restarted(pruned_dir, shared_data, tmp_path):
    out = tmp_path / "sparse"
    cfg = dict(method="sparse-ft", max_steps=4, eval_steps=2, save_steps=2, lr=1e-4)
    result, _ = run(small_config(pruned_dir, out, shared_data, **cfg))
    assert result["status"] == "completed" and (out / "model/model.safetensors").is_file()
    with pytest.raises(UserError, match="finished run"):
        run(small_config(pruned_dir, out, shared_data, resume_from_checkpoint="auto", **cfg))
    shutil.rmtree(out / "model")  # issue 24: with its result deleted it is still finished (was: "Step 5/4")
    with pytest.raises(UserError, match=r"finished run \(step 4, its result is no longer in the directory\)"):
        run(small_config(pruned_dir, out, shared_data, resume_from_checkpoint="auto", **cfg))
    result, _ = run(small_config(pruned_dir, out, shared_data, overwrite=True, **cfg))
    assert result["status"] == "completed"


def test_resume_with_settings_that_change_the_run_is_refused(finished, pruned_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    _interrupted(finished, out, "checkpoint-8")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"--block-size is 64 but the run .* trains with 32.*--config .*run_config"):
        run(_resume_cfg(pruned_dir, out, shared_data, block_size=64))
    assert (out / "metrics.jsonl").read_text() == before


# -- issue 24 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("result", ["adapter", "checkpoints-and-adapter"])
def test_a_finished_run_whose_result_was_deleted_is_never_restarted(finished, pruned_dir, shared_data, tmp_path,
                                                                    result):
    """"Finished" is what the run's records say: deleting RUN/adapter (or RUN/model) does not make a finished run
    resumable (it trained "Step 31/30 ... 103.3%" and replaced the run's final records)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "adapter")
    if result == "checkpoints-and-adapter":
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match=r"finished run \(step 8, its result is no longer in the directory\).*"
                                        r"--overwrite"):
        run(_resume_cfg(pruned_dir, out, shared_data))
    with pytest.raises(UserError, match=r"holds a finished run \(step 8\).*--overwrite"):
        run(small_config(pruned_dir, out, shared_data, max_steps=8))  # without `auto`: not "add auto" either
    assert (out / "metrics.jsonl").read_bytes() == before
    result, _ = run(_resume_cfg(pruned_dir, out, shared_data, resume_from_checkpoint=None, overwrite=True))
    assert result["status"] == "completed" and (out / "adapter").is_dir()


def test_a_resume_from_the_last_steps_checkpoint_finishes_without_training(finished, pruned_dir, shared_data,
                                                                            tmp_path):
    """Killed after its last checkpoint but before its records said it finished: the resume trains no step past
    the end ("Step 9/8, 112.5%" before), and the result is the uninterrupted run's."""
    out = _interrupted(finished, tmp_path / "run")
    result, console = run(_resume_cfg(pruned_dir, out, shared_data))
    assert result["status"] == "completed" and result["total_steps"] == 8
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "log") == 8
    assert "Step 9/8" not in console
    final = {r["event"]: r for r in read_jsonl(out / "metrics.jsonl")}
    reference = {r["event"]: r for r in read_jsonl(finished / "metrics.jsonl")}
    assert final["final_eval"]["perplexity"] == pytest.approx(reference["final_eval"]["perplexity"])
    assert load_file(out / "adapter/adapter_model.safetensors").keys() == load_file(
        finished / "adapter/adapter_model.safetensors").keys()


def test_a_resumed_run_that_diverges_keeps_the_checkpoint_it_resumed_from(pruned_dir, shared_data, tmp_path):
    """After resuming a diverged run with the printed command, the alert names the last good checkpoint (the one
    resumed from), never "none" while checkpoints exist."""
    out = tmp_path / "nan"
    cfg = dict(warmup_steps=3, max_steps=8, logging_steps=1, eval_steps=1, save_steps=1)
    result, _ = run(small_config(pruned_dir, out, shared_data, lr=3e38, **cfg))
    assert result["status"] == "diverged"
    result, _ = run(small_config(pruned_dir, out, shared_data, lr=3e38, resume_from_checkpoint="auto", **cfg))
    assert result["status"] == "diverged"
    alert = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "alert" and r["kind"] == "nan_inf"][-1]
    assert alert["message"].endswith(f"the last good checkpoint is kept: {out / 'checkpoint-1'}")
    assert result["last_good_checkpoint"] == str(out / "checkpoint-1")


def test_an_unknown_dataset_message_is_whole(pruned_dir, shared_data, tmp_path):
    """The pre-flight keeps the data error whole: its "did you mean" and its list of choices are not cut by an
    added "; fix:"."""
    with pytest.raises(UserError) as info:
        run(small_config(pruned_dir, tmp_path / "run", shared_data, dataset="wikitext"))
    text = str(info.value)
    assert "(did you mean 'wikitext2'?); choose one of: wikitext2, c4, wikipedia-vital" in text
    assert "fix:" not in text and not (tmp_path / "run").exists()


def _teacher(tmp_path: Path, tokenizer_dir: Path, name: str, vocab_size: int | None = None, **overrides) -> Path:
    """A dense model of another shape with the test tokenizer (a larger embedding when `vocab_size` is given)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tiny import tiny_config

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size or len(tokenizer), **overrides))
    model.save_pretrained(tmp_path / name)
    tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(("distill", "overrides", "message"), [
    ("layerwise", {"num_hidden_layers": 3}, r"decoder layers 3 vs the student's 2"),
    ("layerwise", {"hidden_size": 32, "intermediate_size": 64}, r"hidden size 32 vs the student's 64"),
    ("logits", {"vocab_size": 600}, r"its vocabulary has 600 tokens, the student's \d+"),
    ("logits", {"max_position_embeddings": 16}, r"its context is 16 tokens, shorter than --block-size 32"),
])
def test_a_teacher_that_does_not_fit_is_refused_before_any_file(pruned_dir, shared_data, tokenizer_dir, tmp_path,
                                                                distill, overrides, message):
    """Depth, width, vocabulary and context of the teacher are compared in the pre-flight, from its config: one
    line naming both numbers, before anything is written (before, the first training step failed)."""
    teacher = _teacher(tmp_path, tokenizer_dir, "teacher", **overrides)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf"teacher: {teacher} does not fit the student: {message}"):
        run(small_config(pruned_dir, out, shared_data, distill=distill, teacher=str(teacher)))
    assert not out.exists()


def test_a_teacher_with_another_tokenizer_is_refused_for_logit_distillation(pruned_dir, shared_data, tmp_path):
    """Same vocabulary size, other token ids: logit distillation would compare unrelated tokens."""
    from tiny import make_tiny_model, train_tokenizer

    other = tmp_path / "other-tokenizer"
    fast = train_tokenizer(other, vocab_size=512)
    vocab = fast.get_vocab()
    swapped = dict(vocab)
    first, second = sorted(vocab, key=vocab.get)[300:302]
    swapped[first], swapped[second] = vocab[second], vocab[first]
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"] = swapped
    (other / "tokenizer.json").write_text(json.dumps(data))
    teacher = make_tiny_model(tmp_path / "teacher", other)
    with pytest.raises(UserError, match=r"its tokenizer differs from the student's \(2 of \d+ tokens have another id"):
        run(small_config(pruned_dir, tmp_path / "run", shared_data, distill="logits", teacher=str(teacher)))


def test_a_teacher_that_fits_is_listed_with_its_shape(pruned_dir, shared_data, tiny_model_dir, tmp_path):
    result, console = run(small_config(pruned_dir, tmp_path / "run", shared_data, distill="both",
                                       teacher=str(tiny_model_dir), max_steps=1, eval_steps=1, save_steps=1))
    assert result["status"] == "completed"
    assert f"✅ teacher: {tiny_model_dir} (2 layers, hidden 64, vocabulary" in console
