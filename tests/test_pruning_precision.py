"""`prune --dtype auto` chooses the calibration precision by bf16's measured cost (issue 22): the rule on every
branch, the table against the benchmark's own numbers, and a real prune that records the choice and its reason."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

import prunetune.pruning.precision as precision
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.precision import TOLERANCE_PCT, Bf16Cost, CalibrationRecipe, resolve_precision

BENCH_JSON = Path(__file__).resolve().parents[1] / "bench" / "calib_precision.json"


@pytest.fixture
def native_bf16(monkeypatch):
    """A device that computes bf16 natively (any machine can run the rule's branches)."""
    def fake(requested, device, purpose):
        if requested not in (None, "auto"):
            return precision.DTYPE_NAMES[requested], f"{requested}: requested"
        return torch.bfloat16, "bf16: native (test)"
    monkeypatch.setattr(precision, "resolve_dtype", fake)


@pytest.fixture
def table(monkeypatch):
    costs = {("wanda", "nm"): Bf16Cost(1.9, 0.4, 3, 2.5, "test"), ("sparsegpt", "nm"): Bf16Cost(0.2, 0.1, 3, 1.8, "test"),
             ("sparsegpt", "block"): Bf16Cost(TOLERANCE_PCT, 0.1, 3, 1.8, "test")}
    monkeypatch.setattr(precision, "MEASURED", costs)
    return costs


def test_auto_takes_float32_where_bf16_costs_more_than_the_tolerance(native_bf16, table):
    p = resolve_precision(None, "cpu", CalibrationRecipe("wanda", "nm"))
    assert (p.storage, p.compute) == (torch.float32, torch.float32)
    assert "+1.9% perplexity on average over 3 seeds (sd 0.4%" in p.reason and "2.5x faster" in p.reason and "--dtype bfloat16" in p.reason
    assert p.record()["bf16_cost"] == {"ppl_pct": 1.9, "sd_pct": 0.4, "seeds": 3, "float32_time_x": 2.5,
                                       "measured_on": "test", "tolerance_pct": TOLERANCE_PCT}


@pytest.mark.parametrize("pattern_kind", ["nm", "block"])  # 0.2%, and exactly the tolerance: both bf16
def test_auto_takes_bf16_where_it_costs_at_most_the_tolerance(native_bf16, table, pattern_kind):
    p = resolve_precision("auto", "cpu", CalibrationRecipe("sparsegpt", pattern_kind))
    assert (p.storage, p.compute) == (torch.float32, torch.bfloat16)  # CPU: float32 weights, autocast forwards
    assert p.reason.startswith("bf16: native (test); bf16 calibration costs sparsegpt")
    assert "float32 would take 1.8x as long" in p.reason and p.cost is table[("sparsegpt", pattern_kind)]


@pytest.mark.parametrize("recipe", [
    None,  # a caller that does not say what it prunes
    CalibrationRecipe("magnitude", "unstructured", ("reconstruct",)),  # never measured
    CalibrationRecipe("sparsegpt", "nm", ("owl",)),  # measured plain, not with OWL: not assumed the same
])
def test_an_unmeasured_recipe_calibrates_in_float32(native_bf16, table, recipe):
    p = resolve_precision(None, "cpu", recipe)
    assert p.compute == torch.float32 and p.cost is None and "unmeasured" in p.reason


def test_explicit_dtype_wins_and_cpu_keeps_float32_weights(native_bf16, table):
    p = resolve_precision("bfloat16", "cpu", CalibrationRecipe("wanda", "nm"))  # bf16 costs 1.9% here: asked anyway
    assert (p.storage, p.compute, p.cost) == (torch.float32, torch.bfloat16, None)
    assert resolve_precision("float32", "cpu", CalibrationRecipe("sparsegpt", "nm")).compute == torch.float32


def test_cuda_holds_the_weights_in_the_compute_dtype(native_bf16, table):
    assert resolve_precision(None, "cuda", CalibrationRecipe("sparsegpt", "nm")).storage == torch.bfloat16
    assert resolve_precision(None, "cuda", CalibrationRecipe("wanda", "nm")).storage == torch.float32


def test_without_native_bf16_nothing_is_looked_up(monkeypatch, table):
    monkeypatch.setattr(precision, "resolve_dtype", lambda r, d, p: (torch.float32, "float32: no native bf16 (test)"))
    p = resolve_precision(None, "cpu", CalibrationRecipe("sparsegpt", "nm"))
    assert (p.compute, p.reason, p.cost) == (torch.float32, "float32: no native bf16 (test)", None)


def test_the_config_names_its_recipe():
    assert PruneConfig(model="m", out="o", pattern="2:4").calibration_recipe == CalibrationRecipe("wanda", "nm")
    cfg = PruneConfig(model="m", out="o", method="sparsegpt", pattern="block16x16", reconstruct=True, owl=True,
                      block_reconstruct_epochs=2)
    assert cfg.calibration_recipe == CalibrationRecipe("sparsegpt", "block", ("reconstruct", "owl", "block-wise"))


def test_the_table_is_the_benchmarks_measurement():
    """MEASURED carries the numbers bench/bench_calib_precision.py wrote (bench/calib_precision.json), rounded as
    the reason prints them, for every (method, pattern) it measured on at least 3 seeds, and nothing else."""
    bench = json.loads(BENCH_JSON.read_text())
    kinds = {"unstructured": "unstructured", "2:4": "nm", "block16x16": "block"}
    measured = {(s["method"], kinds[s["pattern"]]): s for s in bench["summary"] if s["seeds"] >= 3}
    assert set(precision.MEASURED) == set(measured)
    for key, cost in precision.MEASURED.items():
        s = measured[key]
        assert (cost.ppl_pct, cost.sd_pct) == (round(s["mean_cost_pct"], 2), round(s["sd_cost_pct"], 2)), key
        assert (cost.seeds, cost.time_x) == (s["seeds"], round(s["mean_time_x"], 1)), key


def test_prune_records_the_choice_and_why(tmp_path, tiny_model_dir, shared_data, native_bf16, table):
    """The real command on a native-bf16 device: Wanda 2:4 (bf16 costs 1.9% in this table) calibrates in float32;
    prune.json and the banner carry the reason."""
    console = Console(record=True, width=400)
    out = run_prune(PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "p"), pattern="2:4",
                                calib_dataset="wikitext2", data_dir=str(shared_data), nsamples=2, seqlen=32),
                    console=console)
    info = json.loads((out / "prune.json").read_text())
    assert info["dtype"]["compute"] == "float32" and info["dtype"]["bf16_cost"]["ppl_pct"] == 1.9
    assert info["dtype"]["reason"] in console.export_text()
