"""The on-disk contract: the staged-output guard, the one-writer lock, masks and adapter metadata."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from prunetune import rundir
from prunetune.errors import UserError
from prunetune.rundir import (
    LOCK_FILE,
    MARKER,
    check_output,
    check_safetensors,
    load_keep_masks,
    load_masks,
    run_lock,
    save_masks,
    staged_output,
)

# ---- staged_output ----

def test_new_output_appears_whole_with_a_marker(tmp_path):
    out = tmp_path / "out"
    with staged_output(out, command="test") as stage:
        (stage / "a.txt").write_text("a")
        assert not out.exists()  # nothing visible until it is complete
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.txt", MARKER])
    assert json.loads((out / MARKER).read_text())["files"] == ["a.txt"]


def test_failure_leaves_no_trace_and_keeps_the_previous_result(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        (stage / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as stage:
        (stage / "a.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "old"
    assert not any(p.name.startswith(rundir.STAGING_PREFIX) for p in out.iterdir())
    assert not any(p.name.startswith(rundir.STAGING_PREFIX) for p in tmp_path.iterdir())


def test_overwrite_replaces_only_our_files(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as stage:
        (stage / "model-1.bin").write_text("1")
        (stage / "sub").mkdir()
        (stage / "sub" / "x").write_text("x")
    (out / "my_notes.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        check_output(out)
    with staged_output(out, overwrite=True) as stage:
        (stage / "model-2.bin").write_text("2")
        (stage / "sub").mkdir()
    assert (out / "my_notes.txt").read_text() == "precious"
    assert not (out / "model-1.bin").exists() and (out / "model-2.bin").is_file()
    assert not (out / "sub" / "x").exists()


def test_refuses_foreign_dirs_overlapping_inputs_and_files(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="holds no prunetune output"):
        check_output(foreign, overwrite=True)
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(UserError, match="overlaps the input"):
            check_output(out, inputs=[model], overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_output(tmp_path / "f")
    with pytest.raises(UserError, match="under the file"):
        check_output(tmp_path / "f" / "out")
    # Ownership is the marker and nothing else: files named as prunetune names its own are still the user's.
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("prune.json", "config.json", "merge.json", "export.json", "metrics.jsonl", "pipeline.json"):
        (mine / name).write_text("{}")
    with pytest.raises(UserError, match="holds no prunetune output"), staged_output(mine, overwrite=True) as stage:
        (stage / "config.json").write_text('{"new": 1}')
    assert all((mine / name).read_text() == "{}" for name in ("prune.json", "config.json"))
    assert sorted(p.name for p in mine.iterdir()) == sorted(["prune.json", "config.json", "merge.json",
                                                              "export.json", "metrics.jsonl", "pipeline.json"])


def test_unwritable_out_is_refused_before_work(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match="not writable: permission denied"):
        check_output(tmp_path / "out")


# ---- run_lock ----

def test_second_writer_is_refused_with_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "command": "prunetune finetune", "started": "now"}))
        with pytest.raises(UserError, match=f"pid {holder.pid}.*kill {holder.pid}"), run_lock(tmp_path, "finetune"):
            pass
        assert (tmp_path / LOCK_FILE).is_file()  # the live holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "x"}))
    messages = []
    with run_lock(tmp_path, "prune", log=messages.append) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with run_lock(tmp_path, "prune"):  # re-entrant in one process
            pass
        assert path.is_file()
    assert not (tmp_path / LOCK_FILE).exists()
    assert messages and "no longer running" in messages[0]


def test_lock_held_by_another_process_blocks_then_frees(tmp_path):
    code = ("import sys, time; from prunetune.rundir import run_lock\n"
            "with run_lock(sys.argv[1], 'holder'):\n    print('held', flush=True); time.sleep(3)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by pid"), run_lock(tmp_path, "second"):
            pass
        with run_lock(tmp_path, "waiter", wait_s=30) as path:  # waits for the holder to finish
            assert json.loads(path.read_text())["command"] == "waiter"
    finally:
        holder.kill()
        holder.wait()


# ---- files ----

def test_truncated_safetensors_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100, 100)}, str(path))
    check_safetensors(path)
    data = path.read_bytes()
    for cut in (4, 50, len(data) - 100):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated"):
            check_safetensors(path)


def test_masks_roundtrip_and_truncated_masks(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    masks, source = load_keep_masks(tiny_model_dir, model)
    assert "absent" in source and all(m.all() for m in masks.values())
    keep = {name: torch.rand(m.shape) > 0.5 for name, m in masks.items()}
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    save_masks(keep, pruned, {"pattern": "unstructured"})
    loaded, source = load_keep_masks(pruned, model)
    assert source == "prunetune/masks.safetensors" and all(torch.equal(loaded[n], keep[n]) for n in keep)
    assert all(torch.equal(load_masks(pruned)[n], keep[n]) for n in keep)
    data = rundir.masks_target(pruned).read_bytes()
    rundir.masks_target(pruned).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        load_keep_masks(pruned, model)


def test_masks_live_apart_from_the_weights_and_the_old_layout_still_reads(tmp_path, tiny_model_dir):
    """The layout rule (rundir.META_DIR): a model directory's top-level *.safetensors are its weights only, since
    vLLM loads every one of them; directories written before, with masks.safetensors beside the weights, read."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    keep = {name: torch.rand(m.shape) > 0.5 for name, m in load_keep_masks(tiny_model_dir, model)[0].items()}
    old = tmp_path / "old"
    old.mkdir()
    save_masks(keep, old / rundir.MASKS_FILE, {"pattern": "unstructured"})  # where prunetune put it until issue 21
    loaded, source = load_keep_masks(old, model)
    assert source == rundir.MASKS_FILE and all(torch.equal(loaded[n], keep[n]) for n in keep)
    new = tmp_path / "new"
    assert rundir.copy_masks(old, new) == new / rundir.META_DIR / rundir.MASKS_FILE
    assert list(new.glob("*.safetensors")) == [] and rundir.masks_file(new) == rundir.masks_target(new)
    assert all(torch.equal(load_masks(new)[n], keep[n]) for n in keep)
    assert rundir.masks_file(tiny_model_dir) is None and rundir.copy_masks(tiny_model_dir, tmp_path / "x") is None


def test_adapter_base_digest_refuses_another_base(tmp_path, tiny_model_dir, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from tiny import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "other", tokenizer_dir, seed=7))
    adapter = tmp_path / "adapter"
    rundir.write_adapter_meta(adapter, pruned_model=tiny_model_dir, base_model="dense",
                              digest=rundir.base_digest(model))
    assert rundir.adapter_base(adapter) == str(tiny_model_dir.resolve())
    assert rundir.check_adapter_base(adapter, model, None) is None
    # the same weights loaded in bfloat16 have the same digest
    assert rundir.base_digest(model.to(torch.bfloat16)) == rundir.base_digest(model.float())
    with pytest.raises(UserError, match="trained on another base.*--force"):
        rundir.check_adapter_base(adapter, other, None)
    assert "--force" in rundir.check_adapter_base(adapter, other, None, force=True)


def test_read_helpers_say_directory_and_permission(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a directory, expected a file"):
        rundir.read_bytes(tmp_path, "dataset")
    with pytest.raises(UserError, match="does not exist"):
        rundir.read_bytes(tmp_path / "nope", "dataset")
    f = tmp_path / "x.json"
    f.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        rundir.read_json(f)
    monkeypatch.setattr(type(f), "read_bytes", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(UserError, match="permission denied"):
        rundir.read_bytes(f, "dataset")


def test_a_marked_dir_without_results_is_written_without_overwrite_and_keeps_its_files(tmp_path):
    stage = tmp_path / "prune"
    rundir.mark_ours(stage, "run")
    (stage / "stage.json").write_text("{}")  # the pipeline's own record, not part of the result
    check_output(stage)  # no --overwrite needed: nothing of ours would be replaced
    with staged_output(stage, command="prune") as out:
        (out / "prune.json").write_text("{}")
    assert (stage / "stage.json").is_file() and (stage / "prune.json").is_file()
    assert json.loads((stage / MARKER).read_text())["files"] == ["prune.json"]
    with pytest.raises(UserError, match="--overwrite"):  # now it holds a result
        check_output(stage)


def test_an_empty_out_whose_parent_cannot_be_written_is_refused_before_work(tmp_path, monkeypatch):
    """A new result is staged beside --out and renamed into place: the parent is written too."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only_parent(path, flags, *args):
        if os.path.dirname(os.path.abspath(path)) == str(tmp_path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_parent)
    with pytest.raises(UserError, match=r"the directory holding --out .*out: .* is not writable: read-only file"):
        check_output(out)
