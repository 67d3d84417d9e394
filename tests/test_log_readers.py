"""The log-format registry: a new format is one module with a `LogReader` and one line in
`analysis.sources.registry` — shown by registering a toy format and reading it through `prunetune report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunetune.analysis.sources import LogReader, Source, registry
from prunetune.analysis.sources.base import Peek
from prunetune.cli import main as cli_main


class CsvLosses:
    """A toy format: `step,loss` lines with a `# toy-losses` header."""

    name = "toy_csv"
    kind = "console_log"
    describes = "a toy step,loss CSV"

    def detect(self, peek: Peek) -> float:
        return 1.0 if peek.head.startswith("# toy-losses") else 0.0

    def in_directory(self, directory: Path) -> list[Path]:
        return sorted(directory.glob("*.csv"))

    def read(self, path: Path) -> Source:
        rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
        records = [{"event": "log", "step": int(s), "loss": float(v)} for s, v in rows]
        records.append({"event": "train_end", "step": records[-1]["step"]})
        return Source(self.kind, path, records, {"format": self.name, "flavour": "trainer", "step_source": "toy"})


@pytest.fixture
def toy_registered(monkeypatch):
    reader = CsvLosses()
    assert isinstance(reader, LogReader)
    monkeypatch.setattr(registry, "READERS", [reader, *registry.READERS])  # the one registry line
    return reader


def test_a_new_format_is_one_reader_and_one_registry_line(tmp_path, toy_registered, capsys):
    run = tmp_path / "run"
    run.mkdir()
    losses = [6.0 - 0.05 * i for i in range(40)]
    (run / "losses.csv").write_text("# toy-losses\n" + "".join(f"{10 * (i + 1)},{v}\n" for i, v in enumerate(losses)))
    for source in (run / "losses.csv", run):  # the file itself, and the directory holding it
        out = tmp_path / f"report-{source.name}"
        assert cli_main(["report", str(source), "--out", str(out)]) == 0, capsys.readouterr().err
        data = json.loads((out / "report.json").read_text())
        assert data["source"]["format"] == "toy_csv" and data["summary"]["steps"] == 400
        assert data["summary"]["log_points"] == 40 and data["summary"]["status"] == "finished"
    capsys.readouterr()


def test_unregistered_toy_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "losses.jsonl"
    path.write_text('{"toy": 1}\n')
    assert cli_main(["report", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a log format prunetune reads" in err and len(err.splitlines()) == 1

