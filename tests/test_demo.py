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


def test_demo_fit_shrinks_only_the_fixed_work_and_only_on_a_slow_machine(tmp_path, monkeypatch):
    """The full demo's calibration and evaluation sizes follow the machine's measured speed: unchanged where the
    demo fits its target, proportionally smaller (with floors) where it would not; a rerun reuses the sizes."""
    from rich.console import Console

    from prunetune.pipeline import demo as demo_mod
    from prunetune.pipeline.demo_fit import (
        FIXED_WINDOW_FORWARDS,
        TARGET_S,
        apply_fit,
        budgets_s,
        fit_sizes,
        recorded_fit,
    )

    doc = demo_mod.demo_dict()
    assert budgets_s(doc) == 60 * (doc["prune"]["block_reconstruct_minutes"] + doc["finetune"]["max_train_minutes"])
    quick = demo_mod.demo_dict(quick=True)
    assert budgets_s(quick) == 60 * quick["finetune"]["max_train_minutes"]  # no block-wise stage: no budget
    fast = fit_sizes(doc, 0.3, "bfloat16")
    assert fast.scale == 1.0 and fast.sizes == {} and apply_fit(doc, fast) == doc and "full" in fast.describe()
    slow_s = 2.65  # a 2-core CPU without native bf16, float32
    slow = fit_sizes(doc, slow_s, "float32")
    scale = (TARGET_S - budgets_s(doc)) / (FIXED_WINDOW_FORWARDS["float32"] * slow_s)
    assert slow.scale == pytest.approx(scale) and 0 < scale < 1
    assert slow.sizes == {"prune": {"nsamples": round(32 * scale)}, "eval": {"max_windows": round(20 * scale)},
                          "finetune": {"max_eval_samples": round(16 * scale)}}
    fitted = apply_fit(doc, slow)
    assert fitted["prune"]["nsamples"] < 32 and fitted["prune"]["seqlen"] == 512 and doc["prune"]["nsamples"] == 32
    assert "prune nsamples 32 -> " in slow.describe() and "configs/demo-cpu.yaml" in slow.describe()
    assert fit_sizes(doc, 0.9, "bfloat16").scale < 1 == fit_sizes(doc, 0.9, "float32").scale  # bf16: more units
    hopeless = fit_sizes(doc, 1000.0, "float32")
    assert hopeless.sizes == {"prune": {"nsamples": 8}, "eval": {"max_windows": 5}, "finetune": {"max_eval_samples": 4}}

    # through run_demo's helper: measured once, recorded in pipeline.json, reused by a rerun, refitted by --force
    calls = []
    monkeypatch.setattr(demo_mod, "time_window", lambda *a, **k: calls.append(1) or (slow_s, "float32"))
    out = tmp_path / "demo"
    quiet = Console(quiet=True)
    fit = demo_mod.fit_demo(demo_mod.DemoConfig(out=str(out)), out, quiet)
    assert fit.sizes == slow.sizes and len(calls) == 1
    assert demo_mod.demo_config(fit=fit).prune["nsamples"] == slow.sizes["prune"]["nsamples"]
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"demo_fit": fit.record()}))
    again = demo_mod.fit_demo(demo_mod.DemoConfig(out=str(out)), out, quiet)
    assert again.reused and again.sizes == fit.sizes and len(calls) == 1 and recorded_fit(out).sizes == fit.sizes
    assert demo_mod.fit_demo(demo_mod.DemoConfig(out=str(out), force=True), out, quiet).reused is False
    assert len(calls) == 2
    assert demo_mod.fit_demo(demo_mod.DemoConfig(out=str(out), fit=False), out, quiet) is None
    assert demo_mod.fit_demo(demo_mod.DemoConfig(out=str(out), quick=True), out, quiet) is None
    (out / "pipeline.json").write_text("{not json")
    assert recorded_fit(out) is None


def test_time_window_measures_a_real_forward(tiny_model_dir):
    from prunetune.pipeline.demo_fit import time_window

    seconds, precision = time_window(str(tiny_model_dir), 32)
    assert 0 < seconds < 60 and precision in ("float32", "bfloat16", "float16")
