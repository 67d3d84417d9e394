"""`prunetune compare`: curves overlaid and a table of several runs."""

from __future__ import annotations

import json
from pathlib import Path

from prunetune.analysis.compare import CompareConfig, run_compare
from prunetune.cli import main as cli_main

LOGS = Path(__file__).parent / "fixtures" / "logs"


def test_compare_runs(tmp_path, capsys):
    result = run_compare(CompareConfig(runs=(LOGS / "healthy", LOGS / "lr_low" / "console.log"), out=tmp_path))
    assert [r["run"] for r in result["runs"]] == ["healthy", "lr_low/console.log"]
    healthy, low = result["runs"]
    assert healthy["final_perplexity"] < low["final_perplexity"]
    assert healthy["best_step"] == 60 and healthy["steps"] == 60
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "compare.json").read_text())["table"][0]["run"] == "healthy"
    assert "| healthy | 60 |" in (tmp_path / "compare.md").read_text()

    assert cli_main(["compare", str(LOGS / "healthy" / "console.log"), str(LOGS / "healthy" / "trainer_state.json"),
                     "--out", str(tmp_path / "c2")]) == 0
    out = capsys.readouterr().out
    assert "healthy/console.log" in out and "healthy/trainer_state.json" in out
    assert cli_main(["compare", str(tmp_path / "missing")]) == 2
