"""`prunetune demo`: the demo's own code path (data choice, the pipeline, the final story), run on the tiny
model through the hidden --model option; CI runs the real `prunetune demo --quick` on SmolLM2-135M."""

from __future__ import annotations

import json

import pytest

from prunetune.cli import main as cli_main
from prunetune.pipeline.demo import demo_config
from prunetune.pipeline.stages import choose_data


def test_data_choice_prefers_local_wikitext_and_says_why_it_falls_back(shared_data, tmp_path, monkeypatch):
    chosen = choose_data("wikitext2", str(shared_data), "wikipedia-vital")
    assert chosen.dataset == "wikitext2" and not chosen.fallback_used
    assert "local copy" in chosen.reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    fallback = choose_data("wikitext2", str(empty), "wikipedia-vital")
    assert fallback.dataset == "wikipedia-vital" and fallback.fallback_used
    assert "instead of wikitext2" in fallback.reason and str(empty) in fallback.reason
    none = choose_data("wikitext2", None, "wikipedia-vital")
    assert none.fallback_used and "PRUNETUNE_DATA_DIR" in none.reason


def test_demo_config_is_the_pipeline_config():
    full, quick = demo_config(), demo_config(quick=True)
    assert full.model == quick.model == "smollm2-135m"
    assert full.prune["pattern"] == "block16x16" and full.prune["sparsity"] == 0.5 and full.prune["reconstruct"]
    assert quick.finetune["max_steps"] < full.finetune["max_steps"]


@pytest.mark.slow
def test_demo_quick_path_on_the_tiny_model(tmp_path, tiny_model_dir, shared_data, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--out", str(out), "--data-dir", str(shared_data)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "wikitext2, local copy" in text
    story = json.loads((out / "pipeline.json").read_text())["results"]
    assert set(story["test"]) >= {"dense", "pruned", "recovered"}
    assert f"Report: {story['report']}" in text.replace("\n", "")
    assert (out / "report" / "report.html").is_file()
    # A second run is the pipeline skipping finished stages.
    assert cli_main(args) == 0
    doc = json.loads((out / "pipeline.json").read_text())
    assert {s["status"] for s in doc["stages"].values()} == {"skipped"}
