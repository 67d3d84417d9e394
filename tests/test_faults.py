"""The fault-injection suite (issue 24): every command that writes, run under a disk that fills up at each of its
writes in turn, with a symbolic link loop as its output, a read-only or forbidden target, an unreadable input,
and killed with SIGKILL at each of its phase boundaries. The invariant checked every time:

- the user's files (inputs, and their own files beside and inside the output) are unchanged;
- the output is complete and verified, or absent (or, mid-swap, marked incomplete so every reader refuses it);
- no traceback: the error is one line `prunetune CMD: error: ...` naming the cause and the fix, exit code 2;
- a rerun recovers: each run of a chain is the rerun of the one before it, and the chain ends with a run that
  completes and verifies.

The disk fills at write k = 1, 2, ... until a run no longer reaches its k-th write: that run is the clean
rerun. Writes are counted under the test's directory only (the token and model caches live elsewhere)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from faults import DiskFull, digest, error_line, refusing, run_child, run_cli, unreadable
from prunetune import rundir
from prunetune.cli import main
from prunetune.finetune.resume import checkpoint_problem, checkpoints
from prunetune.rundir.records import read_jsonl

STAGING = rundir.STAGING_PREFIX


# ---- the invariant ----------------------------------------------------------------------------------------


def no_staging_left(*dirs: Path) -> None:
    for d in dirs:
        if d.is_dir():
            left = [p.name for p in d.iterdir() if p.name.startswith(STAGING) or p.name == ".checkpoint-staging"]
            assert not left, f"staging left behind in {d}: {left}"


def model_complete_or_absent(out: Path, capsys) -> bool:
    """A model directory is absent (or holds only a lock a killed process left), marked incomplete (and refused
    by readers), or whole and `verify` passes."""
    if not rundir.staging.content(out):
        return True
    if rundir.incomplete(out):
        code, _, err = run_cli(["verify", str(out)], capsys)
        assert code == 2 and "incomplete" in error_line(err, "verify")
        return True
    assert rundir.is_ours(out), f"{out} exists without prunetune's file list"
    listed = rundir.owned_files(out)
    if not listed:
        return True  # ours, holding no result (a pipeline stage directory before its result): absent
    assert all((out / name).exists() for name in listed), (listed, sorted(os.listdir(out)))
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 0, err
    return True


def run_complete_or_absent(out: Path) -> None:
    """A fine-tuning run directory holds only complete checkpoints, a complete result or none, readable records."""
    if not out.exists():
        return
    for _, ckpt in checkpoints(out):
        assert checkpoint_problem(ckpt) is None, (ckpt, checkpoint_problem(ckpt))
    result = rundir.recovery_result(out)
    if result is not None:
        rundir.check_adapter_dir(result.path) if result.is_adapter else rundir.check_readable_files(result.path)
    for name in ("adapter", "model"):
        if (out / name).exists():
            assert rundir.is_ours(out) and name in (rundir.owned_files(out) or [])
    if (out / rundir.METRICS).exists():
        read_jsonl(out / rundir.METRICS)


def disk_full_chain(run: Callable[[], tuple[int, str, str]], root: Path, command: str,
                    after_failure: Callable[[], None], after_success: Callable[[], None],
                    sites: Callable[[str], bool] = lambda site: True, limit: int = 200) -> list[str]:
    """The disk fills at a write site not failed before (and stays full); the invariant is checked after the
    failure, and the next run (the rerun) fills it at the next new site, until a run reaches no new site: that
    run must complete. `sites` chooses which sites may fail. Returns the sites failed, in order."""
    failed: list[str] = []
    for _ in range(limit):
        with DiskFull(root, fail=lambda site: site not in failed and sites(site)) as fault:
            code, _, err = run()
        if fault.fired is None:
            assert code == 0, err[-3000:]
            after_success()
            return failed
        failed.append(fault.fired)
        if code == 0:  # a write the command may do without (a cache): the result must still be whole
            after_success()
            continue
        line = error_line(err, command)
        assert code == 2 and "no space left on device" in line, (fault.fired, line)
        after_failure()
    raise AssertionError(f"{command} still reaching new write sites after {limit} runs: {failed}")


# ---- shared inputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory) -> Path:
    """A real `prunetune prune` output (magnitude, 50%): what the other commands read."""
    out = tmp_path_factory.mktemp("pruned") / "model"
    assert main(prune_argv(tiny_model_dir, out)) == 0
    return out


@pytest.fixture
def user(tmp_path) -> Path:
    """The user's own files beside the outputs: never touched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "config.json").write_text('{"mine": true}')
    return mine


def prune_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), *extra]


# ---- ENOSPC at each write ------------------------------------------------------------------------------------


def test_prune_under_a_disk_full_at_each_write(tiny_model_dir, tmp_path, user, capsys):
    out = tmp_path / "out"
    inputs = digest(tiny_model_dir), digest(user)

    def after_failure():
        assert (digest(tiny_model_dir), digest(user)) == inputs
        no_staging_left(tmp_path, out)
        model_complete_or_absent(out, capsys)

    failed = disk_full_chain(lambda: run_cli(prune_argv(tiny_model_dir, out), capsys), tmp_path, "prune",
                             after_failure, lambda: model_complete_or_absent(out, capsys))
    assert {"out/.prunetune.lock", ".staging-out-N/model.safetensors", ".staging-out-N/prunetune/.masks.safetensors.TMP",
            ".staging-out-N/.prune.json.TMP", ".staging-out-N/..prunetune-files.json.TMP"} <= set(failed)
    assert (out / "prune.json").is_file()


def test_prune_overwrite_under_a_disk_full_keeps_the_old_result_or_marks_it_incomplete(tiny_model_dir, tmp_path,
                                                                                     capsys):
    """--overwrite of an earlier result swaps files in place beside the user's own: a full disk mid-swap leaves a
    directory that says it is incomplete (readers refuse it), never a mix that looks whole; notes stay."""
    out = tmp_path / "out"
    assert run_cli(prune_argv(tiny_model_dir, out, "--sparsity", "0.3"), capsys)[0] == 0
    (out / "notes.txt").write_text("mine")

    def after():
        assert (out / "notes.txt").read_text() == "mine"
        no_staging_left(tmp_path, out)
        model_complete_or_absent(out, capsys)

    failed = disk_full_chain(lambda: run_cli(prune_argv(tiny_model_dir, out, "--overwrite"), capsys), tmp_path,
                             "prune", after, after)
    assert "out/..prunetune-files.json.TMP" in failed  # the marker that says "installing", before any swap
    assert json.loads((out / "prune.json").read_text())["config"]["sparsity"] == 0.5


# ---- finetune: checkpoints, records and the result under a full disk -------------------------------------


def finetune_argv(pruned: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return ["finetune", "--pruned", str(pruned), "--out", str(out), "--dataset", "wikitext2", "--data-dir", str(data),
            "--method", "lora", "--block-size", "32", "--max-train-samples", "8", "--max-eval-samples", "2",
            "--per_device_eval_batch_size", "2", "--max-steps", "2", "--logging-steps", "1", "--eval-steps", "2",
            "--save-steps", "1", "--probe-steps", "1", "--lr", "1e-3", *extra]


@pytest.mark.slow
def test_finetune_under_a_disk_full_at_each_write_site_resumes_exactly(pruned, shared_data, tmp_path, capsys):
    """A full disk at each write site in turn (run files, each file of a checkpoint, the result, the records):
    checkpoints complete or absent, the result complete or absent, one line naming the cause and the resume
    command; resuming with that command after each failure ends in the losses of an uninterrupted run."""
    reference = tmp_path / "reference"
    assert run_cli(finetune_argv(pruned, reference, shared_data), capsys)[0] == 0
    out = tmp_path / "run"
    argv = finetune_argv(pruned, out, shared_data, "--resume_from_checkpoint", "auto")

    def after_failure():
        run_complete_or_absent(out)
        no_staging_left(out)

    def after_success():
        run_complete_or_absent(out)
        assert rundir.recovery_result(out) is not None

    failed = disk_full_chain(lambda: run_cli(argv, capsys), out.parent, "finetune", after_failure, after_success,
                             sites=lambda site: site.startswith("run"))
    assert {"run/.checkpoint-staging/checkpoint-N/optimizer.pt", "run/.checkpoint-staging/checkpoint-N/"
            "adapter_model.safetensors", "run/metrics.jsonl"} <= set(failed), failed

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "log"}

    assert losses(out) == losses(reference)


# ---- merge, evaluate --out, export, report ----------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(pruned, shared_data, tmp_path_factory) -> Path:
    from prunetune.finetune.engine import run_finetune
    from test_finetune import small_config

    out = tmp_path_factory.mktemp("lora") / "run"
    run_finetune(small_config(pruned, out, shared_data, method="lora", max_steps=2, eval_steps=2, save_steps=2,
                              logging_steps=1), stream=open(os.devnull, "w"))  # noqa: SIM115
    return out


def test_merge_under_a_disk_full_at_each_write(lora_run, pruned, tmp_path, user, capsys):
    out = tmp_path / "merged"
    inputs = digest(lora_run), digest(pruned), digest(user)

    def after_failure():
        assert (digest(lora_run), digest(pruned), digest(user)) == inputs
        no_staging_left(tmp_path, out)
        model_complete_or_absent(out, capsys)

    failed = disk_full_chain(lambda: run_cli(["merge", "--adapter", str(lora_run / "adapter"), "--out", str(out)],
                                             capsys), tmp_path, "merge", after_failure,
                             lambda: model_complete_or_absent(out, capsys))
    assert ".staging-merged-N/model.safetensors" in failed


def test_evaluate_out_under_a_disk_full(tiny_model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--dataset", "wikitext2", "--data-dir", str(shared_data),
            "--seqlen", "32", "--max-windows", "2", "--batch-size", "1", "--out", str(out)]

    def after_failure():
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.json")]

    failed = disk_full_chain(lambda: run_cli(argv, capsys), tmp_path, "evaluate", after_failure,
                             lambda: json.loads(out.read_text())["format"] == "prunetune-eval/1")
    assert failed == [".staging-probe-N", ".eval.json.TMP"]


def test_export_under_a_disk_full_at_each_write(pruned, tmp_path, capsys):
    out = tmp_path / "export"

    def after():
        no_staging_left(tmp_path, out)
        if out.exists():
            assert rundir.is_ours(out) and (out / "export.json").is_file() and not rundir.incomplete(out)

    failed = disk_full_chain(lambda: run_cli(["export", str(pruned), "--out", str(out)], capsys), tmp_path,
                             "export", after, after)
    assert ".staging-export-N/.export.json.TMP" in failed


def test_report_under_a_disk_full_at_each_write(lora_run, tmp_path, capsys):
    out = tmp_path / "report"
    before = digest(lora_run)

    def after():
        assert digest(lora_run) == before
        no_staging_left(tmp_path, out)
        if out.exists():
            assert rundir.is_ours(out) and all((out / n).exists() for n in rundir.owned_files(out))

    failed = disk_full_chain(lambda: run_cli(["report", str(lora_run), "--out", str(out)], capsys), tmp_path,
                             "report", after, after)
    assert any(s.endswith(".png") for s in failed) and any("report.html" in s for s in failed)


# ---- the pipeline: its own records, and each stage's first write ------------------------------------------


def tiny_pipeline(model: Path, data: Path) -> dict:
    return {
        "name": "tiny", "model": str(model), "data": {"dataset": "wikitext2", "data_dir": str(data)},
        "prune": {"method": "magnitude", "sparsity": 0.5},
        "finetune": {"method": "lora", "lora_r": 4, "block_size": 32, "max_steps": 2, "logging_steps": 1,
                     "eval_steps": 2, "save_steps": 1, "max_train_samples": 8, "max_eval_samples": 2,
                     "probe_steps": 0},
        "eval": {"seqlen": 32, "max_windows": 2},
    }


@pytest.mark.slow
def test_pipeline_under_a_disk_full_at_its_records_and_each_stage(tiny_model_dir, shared_data, tmp_path, capsys):
    """The pipeline's own files (pipeline.json/.yaml, stage.json, markers) and each stage's first write fail in
    turn; every rerun skips the finished stages and the chain ends with every stage done."""
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(tiny_model_dir, shared_data)))
    run = tmp_path / "run"
    seen_stage: set[str] = set()

    def ours_or_first_of_a_stage(site: str) -> bool:
        parts = site.split("/")
        if len(parts) <= 2 or parts[-1] in ("stage.json", ".stage.json.TMP", "..prunetune-files.json.TMP"):
            return True
        if parts[1] in seen_stage:
            return False
        seen_stage.add(parts[1])
        return True

    def after():
        if (run / "prune").exists():
            model_complete_or_absent(run / "prune", capsys) if (run / "prune" / "config.json").exists() else None
        run_complete_or_absent(run / "finetune")

    failed = disk_full_chain(lambda: run_cli(["run", str(config), "--out", str(run)], capsys), tmp_path, "run",
                             after, after, sites=lambda site: site.startswith("run") and ours_or_first_of_a_stage(site))
    assert {"run/.pipeline.json.TMP", "run/prune/.stage.json.TMP"} <= set(failed), failed
    assert all(json.loads((run / s / "stage.json").read_text())["complete"] for s in ("prune", "finetune", "eval",
                                                                                       "report"))


# ---- a symbolic link loop as the output, a read-only or forbidden target, an unreadable input --------------


def writing_commands(model: Path, pruned: Path, adapter: Path, run: Path, data: Path, config: Path):
    """(command, argv with OUT where the output goes) for every command that writes."""
    return {
        "prune": prune_argv(model, Path("OUT")),
        "finetune": finetune_argv(pruned, Path("OUT"), data),
        "merge": ["merge", "--adapter", str(adapter), "--out", "OUT"],
        "evaluate": ["evaluate", "--model", str(model), "--dataset", "wikitext2", "--data-dir", str(data),
                     "--seqlen", "32", "--max-windows", "1", "--out", "OUT"],
        "export": ["export", str(pruned), "--out", "OUT"],
        "report": ["report", str(run), "--out", "OUT"],
        "compare": ["compare", str(run), "--out", "OUT"],
        "speed": ["speed", str(pruned), "--dense", str(model), "--batch", "1", "--seqlen", "8", "--prompt", "4",
                  "--new-tokens", "2", "--repeats", "1", "--no-breakeven", "--out", "OUT"],
        "run": ["run", str(config), "--out", "OUT"],
    }


@pytest.fixture
def commands(tiny_model_dir, pruned, lora_run, shared_data, tmp_path):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(tiny_model_dir, shared_data)))
    return writing_commands(tiny_model_dir, pruned, lora_run / "adapter", lora_run, shared_data, config)


COMMANDS = ("prune", "finetune", "merge", "evaluate", "export", "report", "compare", "speed", "run")


def _with_out(argv: list[str], out: Path) -> list[str]:
    return [str(out) if a == "OUT" else a for a in argv]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_symlink_loop_as_out_is_one_line_before_any_work(commands, command, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    before = digest(tmp_path)
    code, _, err = run_cli(_with_out(commands[command], loop), capsys)
    line = error_line(err, command)
    assert code == 2 and "symbolic link loop" in line and str(loop) in line
    assert digest(tmp_path) == before  # nothing written, nothing removed


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("number", [errno.EROFS, errno.EACCES])
def test_a_read_only_or_forbidden_target_is_one_line_before_any_work(commands, command, number, tmp_path, capsys):
    """Every write under the target fails as on a read-only file system or without permission (root cannot be
    refused by permissions, so the OS call is made to fail; `test_real_read_only_mount` does it for real)."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    with refusing(target, number) as fault:
        code, _, err = run_cli(_with_out(commands[command], target / "out"), capsys)
    line = error_line(err, command)
    cause = "read-only file system" if number == errno.EROFS else "permission denied"
    assert code == 2 and cause in line and "not writable" in line, line
    assert len(fault.calls) == 1, fault.calls  # refused at the first attempt, before any work
    assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("command", ["prune", "merge", "export", "evaluate", "speed", "finetune"])
def test_an_unreadable_model_file_names_permission_denied(commands, command, tiny_model_dir, pruned, tmp_path,
                                                          capsys):
    """The model's weights cannot be read (permission): the message says so, naming the file, never "no such
    file" or "corrupt"."""
    model = {"prune": tiny_model_dir, "evaluate": tiny_model_dir, "speed": pruned, "export": pruned,
             "finetune": pruned, "merge": pruned}[command]
    with unreadable(model / "model.safetensors"):
        code, _, err = run_cli(_with_out(commands[command], tmp_path / "out"), capsys)
    line = error_line(err, command)
    assert code == 2 and "permission denied" in line and "model.safetensors" in line, line
    assert "No such file" not in line and "corrupt" not in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prune", "merge", "finetune", "export", "report", "run"])
def test_a_directory_holding_the_users_files_is_never_written(commands, command, tmp_path, capsys):
    """Ownership is prunetune's file list and nothing else: files named as prunetune names its own are the
    user's, with --overwrite too."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.json", "notes.txt", "prune.json", "merge.json", "metrics.jsonl", "pipeline.json",
                 "report.md", "adapter", "model"):
        (out / name).write_text(f"my {name}") if "." in name else (out / name).mkdir()
    before = digest(out)
    extra = ["--overwrite"] if command in ("prune", "merge", "finetune", "export") else []
    code, _, err = run_cli(_with_out(commands[command], out) + extra, capsys)
    line = error_line(err, command)
    assert code == 2 and ("yours" in line or "did not write" in line or "not a prunetune" in line), line
    assert digest(out) == before


@pytest.mark.parametrize("command", ["evaluate", "speed"])
def test_a_results_file_of_the_users_is_never_replaced(commands, command, tmp_path, capsys):
    """A single output file has no marker beside it: its own `format` record says whether prunetune wrote it. A
    JSON of the user's that happens to hold a "perplexity" is theirs."""
    mine = tmp_path / "results.json"
    mine.write_text('{"perplexity": 12.5, "note": "my numbers"}')
    code, _, err = run_cli(_with_out(commands[command], mine), capsys)
    assert code == 2 and "not a prunetune" in error_line(err, command)
    assert mine.read_text() == '{"perplexity": 12.5, "note": "my numbers"}'


# ---- SIGKILL at each phase boundary ---------------------------------------------------------------------------


def kill_chain(argv: list[str], tmp: Path, boundaries: list[str], check: Callable[[], None]) -> list[str]:
    """Kill `prunetune ARGV` at each boundary in turn (a rerun after each kill is the next run of the chain; a run
    that no longer passes the boundary completes). Returns the boundaries it was killed at."""
    killed = []
    for boundary in boundaries:
        code, _, err = run_child(argv, tmp, kill_at=boundary)
        if code == -signal.SIGKILL:
            killed.append(boundary)
        else:
            assert code == 0, (boundary, err[-3000:])
        check()
    return killed


def final_run(argv: list[str], tmp: Path) -> None:
    code, _, err = run_child(argv, tmp)
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_prune_killed_at_each_phase_boundary(tiny_model_dir, tmp_path, user, capsys):
    out = tmp_path / "out"
    argv = prune_argv(tiny_model_dir, out)
    inputs = digest(tiny_model_dir), digest(user)

    def check():
        assert (digest(tiny_model_dir), digest(user)) == inputs
        model_complete_or_absent(out, capsys)

    # fresh: locked, pruned, staged, published; the rerun into its own output swaps in place: install
    killed = kill_chain(argv, tmp_path, ["locked", "pruned", "staged", "published", "install", "published"], check)
    assert killed == ["locked", "pruned", "staged", "published", "install", "published"]
    final_run(argv, tmp_path)
    model_complete_or_absent(out, capsys)
    assert not (out / rundir.LOCK_FILE).exists() and not list(tmp_path.glob(f"{STAGING}*"))


@pytest.mark.slow
def test_merge_export_evaluate_report_killed_at_each_phase_boundary(lora_run, pruned, tiny_model_dir, shared_data,
                                                                     tmp_path, capsys):
    merged, export, evaluated, report = (tmp_path / n for n in ("merged", "export", "eval.json", "report"))
    cases = [
        (["merge", "--adapter", str(lora_run / "adapter"), "--out", str(merged)], ["merged", "staged", "published",
                                                                                   "install"],
         lambda: model_complete_or_absent(merged, capsys)),
        (["export", str(pruned), "--out", str(export)], ["staged", "published", "install"],
         lambda: not export.exists() or rundir.incomplete(export) or (export / "export.json").is_file()),
        (["evaluate", "--model", str(tiny_model_dir), "--dataset", "wikitext2", "--data-dir", str(shared_data),
          "--seqlen", "32", "--max-windows", "1", "--out", str(evaluated)], ["measured"],
         lambda: not evaluated.exists() or json.loads(evaluated.read_text())["format"] == "prunetune-eval/1"),
        (["report", str(lora_run), "--out", str(report)], ["staged", "published", "install"],
         lambda: not report.exists() or rundir.incomplete(report) or (report / "report.json").is_file()),
    ]
    before = digest(lora_run), digest(pruned)
    for argv, boundaries, complete_or_absent in cases:
        if "--out" in argv and argv[0] in ("merge", "export"):
            argv = [*argv, "--overwrite"]  # the reruns after `published` replace their own result

        def check(complete_or_absent=complete_or_absent):
            assert complete_or_absent()
            assert (digest(lora_run), digest(pruned)) == before

        assert kill_chain(argv, tmp_path, boundaries, check) == boundaries, argv[0]
        final_run(argv, tmp_path)
        assert complete_or_absent()


@pytest.mark.slow
def test_finetune_killed_at_each_phase_boundary_resumes_exactly(pruned, shared_data, tmp_path, capsys):
    """Killed after its run files, at both sides of each checkpoint's publication, after training, around the
    result's publication and after its summary: every resume continues the run, and the losses are those of an
    uninterrupted run. Killed after its summary, the run is finished and a resume is refused."""
    reference = tmp_path / "reference"
    assert run_cli(finetune_argv(pruned, reference, shared_data), capsys)[0] == 0
    out = tmp_path / "run"
    argv = finetune_argv(pruned, out, shared_data, "--resume_from_checkpoint", "auto")
    boundaries = ["run-files", "checkpoint-staged", "checkpoint", "checkpoint-staged", "checkpoint", "trained",
                  "result-staged", "result", "finished"]

    def check():
        run_complete_or_absent(out)

    killed = kill_chain(argv, tmp_path, boundaries, check)
    assert killed == boundaries
    code, _, err = run_child(argv, tmp_path)
    assert code == 2 and "finished run" in error_line(err, "finetune")

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "log"}

    assert losses(out) == losses(reference) and rundir.recovery_result(out) is not None


@pytest.mark.slow
def test_pipeline_killed_at_each_stage_boundary(tiny_model_dir, shared_data, tmp_path, capsys):
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(tiny_model_dir, shared_data)))
    run = tmp_path / "run"
    argv = ["run", str(config), "--out", str(run)]
    boundaries = ["pruned", "staged", "stage-prune", "run-files", "checkpoint", "trained", "stage-finetune",
                  "staged", "stage-merge", "measured", "stage-eval", "staged", "stage-report"]

    def check():
        if (run / "prune").is_dir():
            model_complete_or_absent(run / "prune", capsys)
        run_complete_or_absent(run / "finetune")

    assert kill_chain(argv, tmp_path, boundaries, check) == boundaries
    final_run(argv, tmp_path)
    doc = json.loads((run / "pipeline.json").read_text())
    assert all(doc["stages"][s]["status"] == "skipped" for s in ("prune", "finetune", "merge", "eval", "report"))


# ---- the real operating system: a full tmpfs, a read-only mount, a file root cannot read -------------------------
# In a private mount namespace (`unshare -m`: the mounts vanish with the process) and with root's permission
# override dropped (`setpriv`), where the machine allows it; the patched tests above cover the rest everywhere.

PYTHON = [sys.executable, "-m", "prunetune"]


def _can(*argv: str) -> bool:
    """Whether `argv` runs here (as root, with the tool installed and the kernel allowing it)."""
    if os.geteuid() != 0 or not shutil.which(argv[0]):
        return False
    return subprocess.run(list(argv), capture_output=True).returncode == 0


real_mounts = pytest.mark.skipif(not _can("unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"),
                                 reason="needs root and unshare -m (a private mount namespace)")
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
real_permissions = pytest.mark.skipif(not _can(*DROP_DAC, "true"), reason="needs root and setpriv")


def _in_namespace(script: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=900)


@pytest.mark.slow
@real_mounts
def test_real_full_disk_and_read_only_mount(tiny_model_dir, tmp_path):
    """A tmpfs smaller than the model: the pre-check refuses what cannot fit before any work; one a little larger
    than the pre-check's lower bound fills up mid-save (a real ENOSPC): one line, nothing left behind, and the
    rerun on a disk with room succeeds and verifies. A read-only tmpfs: one line before any work."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = rundir.weights_bytes(tiny_model_dir)
    prune = " ".join([*PYTHON, *prune_argv(tiny_model_dir, disk / "out")])
    verify = " ".join([*PYTHON, "verify", str(disk / "out")])
    script = f"""
mount -t tmpfs -o size={size // 4} tmpfs {disk}; {prune} >/dev/null 2>err1; echo "exit1=$?"; ls -A {disk}; umount {disk}
mount -t tmpfs -o size={size * 3 // 4} tmpfs {disk}; {prune} >/dev/null 2>err2; echo "exit2=$?"; ls -A {disk}; umount {disk}
mount -t tmpfs -o ro tmpfs {disk}; {prune} >/dev/null 2>err3; echo "exit3=$?"; umount {disk}
mount -t tmpfs -o size={size * 8} tmpfs {disk}; {prune} >/dev/null 2>err4; echo "exit4=$?"; {verify} >/dev/null; echo "verify=$?"
"""
    done = _in_namespace(script, tmp_path)
    lines = done.stdout.split()
    assert lines == ["exit1=2", "exit2=2", "exit3=2", "exit4=0", "verify=0"], (done.stdout, done.stderr)
    first, second, third = (error_line((tmp_path / f"err{i}").read_text(), "prune") for i in (1, 2, 3))
    assert "needs about" in first and "no space left on device" in first
    assert "writing the pruned model" in second and "no space left on device" in second and "nothing was published" in second
    assert "read-only file system" in third and "not writable" in third


@pytest.mark.slow
@real_permissions
def test_real_unreadable_model_file(tiny_model_dir, tmp_path):
    """root without its permission override: a model file without read permission is "permission denied" (it was
    reported as "No such file or directory")."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").chmod(0)
    argv = [*DROP_DAC, *PYTHON, "evaluate", "--model", str(model), "--dataset", "none", "--tasks", "x.yaml"]
    (tmp_path / "x.yaml").write_text("task: x\n")
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = error_line(done.stderr, "evaluate")
    assert done.returncode == 2 and "permission denied" in line and "model.safetensors" in line, line


@pytest.mark.parametrize(("command", "argv"), [
    ("prune", ["prune", "--model", "LOOP", "--method", "magnitude", "--out", "OUT"]),
    ("finetune", ["finetune", "--pruned", "LOOP", "--out", "OUT", "--dataset", "wikitext2", "--data-dir", "DATA"]),
    ("merge", ["merge", "--adapter", "LOOP", "--out", "OUT"]),
    ("evaluate", ["evaluate", "--model", "LOOP", "--dataset", "wikitext2", "--data-dir", "DATA"]),
    ("evaluate", ["evaluate", "--model", "MODEL", "--dataset", "LOOP", "--seqlen", "32"]),
    ("evaluate", ["evaluate", "--model", "MODEL", "--dataset", "wikitext2", "--data-dir", "LOOP", "--seqlen", "32"]),
    ("export", ["export", "LOOP", "--out", "OUT"]),
    ("speed", ["speed", "LOOP"]),
    ("verify", ["verify", "LOOP"]),
])
def test_an_input_behind_a_symlink_loop_is_named_as_one(command, argv, tiny_model_dir, shared_data, tmp_path, capsys):
    """Not "does not exist", "not a model directory" or a traceback: the loop, in one line."""
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    names = {"LOOP": str(loop), "OUT": str(tmp_path / "out"), "DATA": str(shared_data), "MODEL": str(tiny_model_dir)}
    code, _, err = run_cli([names.get(a, a) for a in argv], capsys)
    assert code == 2 and "symbolic link loop" in error_line(err, command)
    assert not (tmp_path / "out").exists()
