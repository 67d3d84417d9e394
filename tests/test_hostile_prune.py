"""Hostile input for `prune` and `verify` (issue 12): an --out that is, holds or lies inside the model is
refused without a hint to overwrite it; an unwritable --out fails before any work; verify exits 2 for
unreadable input and 1 for a real violation."""

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from prunetune.cli import main
from prunetune.errors import UserError
from prunetune.pruning import engine
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune

QUIET = Console(quiet=True)


def _cfg(model, out, shared_data, **kw):
    return PruneConfig(model=str(model), out=str(out), calib_dataset="wikitext2", data_dir=str(shared_data),
                       nsamples=2, seqlen=32, method="magnitude", **kw)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_overlapping_the_model_is_refused(model_copy, shared_data, where, overwrite):
    out = {"same": model_copy, "inside": model_copy / "pruned", "parent": model_copy.parent}[where]
    before = _snapshot(model_copy)
    with pytest.raises(UserError) as err:
        run_prune(_cfg(model_copy, out, shared_data, overwrite=overwrite), console=QUIET)
    message = str(err.value)
    assert "overlaps the input" in message and "--overwrite" not in message and "\n" not in message
    assert _snapshot(model_copy) == before and not (model_copy / "pruned").exists()


def test_out_overlapping_the_model_via_cli_is_exit_2(model_copy, shared_data, capsys):
    argv = ["prune", "--model", str(model_copy), "--method", "magnitude", "--out", str(model_copy), "--overwrite",
            "--data-dir", str(shared_data)]
    assert main(argv) == 2
    assert "overlaps the input" in capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if prune gets as far as loading the model."""
    def boom(*a, **k):
        raise AssertionError("the output check came after the model was loaded")
    monkeypatch.setattr(engine, "setup", boom)


def test_out_under_a_file_fails_before_work(tmp_path, tiny_model_dir, shared_data, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="lies under the file"):
        run_prune(_cfg(tiny_model_dir, blocker / "out", shared_data), console=QUIET)


def test_out_in_read_only_dir_fails_before_work(tmp_path, tiny_model_dir, shared_data, no_work, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only(path, flags, *a, **k):  # a read-only filesystem, also for root (chmod does not stop root)
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_CREAT):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match="not writable"):
        run_prune(_cfg(tiny_model_dir, ro / "out", shared_data), console=QUIET)
    assert not (ro / "out").exists()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, shared_data):
    out = tmp_path_factory.mktemp("hostile") / "pruned"
    return run_prune(_cfg(tiny_model_dir, out, shared_data, pattern="block16x16"), console=QUIET)


def _damaged(pruned, tmp_path, name, damage):
    d = tmp_path / "copy"
    shutil.copytree(pruned, d)
    damage(d / name)
    return d


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("name", "damage", "fragment"), [
    ("prunetune/masks.safetensors", _truncate, "truncated"),
    ("model.safetensors", _truncate, "truncated"),
    ("prune.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    ("prune.json", lambda p: p.write_text(json.dumps({"pattern": "block16x16"})), "not a complete prune record"),
    ("prune.json", lambda p: p.write_text(json.dumps([1, 2])), "not a complete prune record"),
    ("prunetune/masks.safetensors", lambda p: p.write_bytes(b"\x00" * 7), "truncated"),
])
def test_verify_unreadable_input_is_exit_2(pruned, tmp_path, capsys, name, damage, fragment):
    d = _damaged(pruned, tmp_path, name, damage)
    assert main(["verify", str(d)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and name in err


def test_verify_reads_a_directory_with_masks_beside_the_weights(pruned, tmp_path, capsys):
    """Directories written before the masks moved to prunetune/ (issue 21) still verify."""
    old = tmp_path / "old"
    shutil.copytree(pruned, old)
    (old / "prunetune" / "masks.safetensors").rename(old / "masks.safetensors")
    shutil.rmtree(old / "prunetune")  # what else it holds (the permutation) postdates that layout
    assert main(["verify", str(old)]) == 0, capsys.readouterr()


def test_verify_real_violation_is_exit_1(pruned, tmp_path):
    def break_record(path):
        record = json.loads(path.read_text())
        name = next(iter(record["matrices"]))
        record["matrices"][name]["target"] = 0.1  # readable, but the mask does not meet it
        path.write_text(json.dumps(record))

    assert main(["verify", str(_damaged(pruned, tmp_path, "prune.json", break_record))]) == 1


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, tiny_model_dir, shared_data):
    import socket

    from prunetune.rundir import LOCK_FILE

    out = tmp_path / "locked"
    out.mkdir()
    lock = {"pid": 1, "host": socket.gethostname(), "command": "prunetune prune", "started": "earlier"}
    (out / LOCK_FILE).write_text(json.dumps(lock))  # pid 1 is alive: another prune is writing here
    with pytest.raises(UserError, match="being written by pid 1"):
        run_prune(_cfg(tiny_model_dir, out, shared_data), console=QUIET)
    assert not (out / "prune.json").exists()
    (out / LOCK_FILE).write_text(json.dumps({**lock, "pid": 2**22 + 7}))  # a dead process's lock
    run_prune(_cfg(tiny_model_dir, out, shared_data), console=QUIET)
    assert (out / "prune.json").is_file() and not (out / LOCK_FILE).exists()
