"""Issue 12 on report / monitor / compare: a user's files are never overwritten, unwritable or wrong outputs and
binary inputs are one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from prunetune.analysis.compare import CompareConfig, run_compare
from prunetune.analysis.monitor import MonitorConfig, run_monitor
from prunetune.analysis.report import ReportConfig, run_report
from prunetune.cli import main as cli_main
from prunetune.errors import UserError

LOGS = Path(__file__).parent / "fixtures" / "logs"
BINARY = bytes(range(256)) * 8


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "healthy"
    shutil.copytree(LOGS / "healthy", run)
    return run


def test_report_refuses_a_report_dir_holding_the_users_files(tmp_path, capsys):
    run = _run(tmp_path)
    mine = run / "report"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    (mine / "report.md").write_text("my own report.md, not prunetune's")
    err = _one_line_error(capsys, ["report", str(run)])
    assert "--out" in err and "prunetune did not write" in err
    assert (mine / "notes.md").read_text() == "my notes"
    assert (mine / "report.md").read_text() == "my own report.md, not prunetune's"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md", "report.md"]


def test_report_rewrites_its_own_report_dir_and_keeps_a_users_extra_file(tmp_path):
    run = _run(tmp_path)
    first = run_report(ReportConfig(source=run))
    out = Path(first["files"]["report.md"]).parent
    assert (out / ".prunetune-files.json").is_file()
    (out / "my-notes.txt").write_text("keep me")
    run_report(ReportConfig(source=run))  # ours: replaced in place
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (out / "report.json").is_file()


def test_report_out_that_holds_the_source_is_refused(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(UserError, match="holds the source"):
        run_report(ReportConfig(source=run / "console.log", out=run))
    assert sorted(p.name for p in run.iterdir()) == ["console.log", "trainer_state.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_for_report_and_compare(tmp_path, capsys):
    run = _run(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "not writable" in _one_line_error(capsys, ["report", str(run), "--out", str(locked / "r")])
        assert "not writable" in _one_line_error(capsys, ["compare", str(run), "--out", str(locked / "c")])
    finally:
        locked.chmod(0o700)


def test_out_under_a_file_and_compare_out_file(tmp_path, capsys):
    run = _run(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "under the file" in _one_line_error(capsys, ["report", str(run), "--out", str(a_file / "r")])
    assert "is a file" in _one_line_error(capsys, ["compare", str(run), "--out", str(a_file)])
    assert "is a file" in _one_line_error(capsys, ["report", str(run), "--out", str(a_file)])
    assert a_file.read_text() == "x"


def test_compare_refuses_a_dir_of_user_files(tmp_path):
    run = _run(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2")
    with pytest.raises(UserError, match="prunetune did not write"):
        run_compare(CompareConfig(runs=(run,), out=theirs))
    assert (theirs / "data.csv").read_text() == "1,2"


@pytest.mark.parametrize("name", ["metrics.jsonl", "trainer_log.jsonl", "x.jsonl"])
def test_binary_jsonl_is_a_one_line_error(tmp_path, capsys, name):
    bad = tmp_path / "run" / name
    bad.parent.mkdir()
    bad.write_bytes(BINARY)
    err = _one_line_error(capsys, ["report", str(bad), "--out", str(tmp_path / "r")])
    assert "binary" in err and name in err
    err = _one_line_error(capsys, ["compare", str(bad), "--out", str(tmp_path / "c")])
    assert "binary" in err
    if name == "metrics.jsonl":
        with pytest.raises(UserError, match="binary"):
            run_monitor(MonitorConfig(run_dir=bad.parent, once=True))
    assert "binary" in _one_line_error(capsys, ["monitor", str(bad), "--once"])


def test_non_utf8_jsonl_names_the_byte(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_bytes(b'{"event": "log", "step": 1, "loss": 2.0}\n\xff\xfe{"x": 1}\n')
    with pytest.raises(UserError, match="not UTF-8 text \\(byte 41\\)"):
        run_report(ReportConfig(source=bad, out=tmp_path / "r"))
