"""The labelled-log generator still produces what the committed fixtures claim: regenerate one case from a
real tiny Trainer run and check the report names its condition."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from prunetune.analysis.report import ReportConfig, analyse
from prunetune.analysis.sources import load_source

FIXTURES = Path(__file__).parent / "fixtures"


def _make_logs():
    spec = importlib.util.spec_from_file_location("make_logs", FIXTURES / "make_logs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_regenerated_nan_case_matches_the_fixture(tmp_path, tokenizer_dir):
    out = _make_logs().generate("nan", tmp_path, tokenizer_dir)
    assert {p.name for p in out.iterdir()} == {"console.log", "trainer_state.json"}
    for name in ("console.log", "trainer_state.json"):
        data = analyse(load_source(out / name), ReportConfig(source=out / name))
        assert [a["kind"] for a in data["anomalies"]] == ["nan_inf"], name
    fresh = [(r["step"], r["event"]) for r in load_source(out / "trainer_state.json").records]
    committed = [(r["step"], r["event"]) for r in load_source(FIXTURES / "logs" / "nan" / "trainer_state.json").records]
    assert fresh == committed
