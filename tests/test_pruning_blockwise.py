"""Block-wise reconstruction (EBFT-style): the layer's output error on the calibration activations goes down
and the sparsity pattern stays exact, directly on one layer and through `prune`."""

import json

import pytest
import torch
from rich.console import Console

from prunetune.architecture import find_decoder_layers, linear_modules
from prunetune.data import load_text, tokenize
from prunetune.errors import UserError
from prunetune.models import load_model
from prunetune.pruning import calibration as cal
from prunetune.pruning.blockwise import layer_mse, outputs_mse, reconstruct_block
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.verify import verify_dir
from prunetune.rundir import load_masks
from prunetune.sparsity.patterns import block_mask, parse_pattern, pattern_violations

QUIET = Console(quiet=True)


def test_reconstruct_block_lowers_error_and_keeps_zeros(tiny_model_dir, shared_data):
    model, tok = load_model(str(tiny_model_dir))
    windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", str(shared_data)), tok).input_ids,
                                      4, 32, 0)
    _, layers = find_decoder_layers(model)
    inputs = cal.capture_first_layer_inputs(model, layers[0], windows, "cpu")
    layer = layers[0]
    dense = cal.run_layer(layer, inputs, torch.empty_like(inputs.hidden)).clone()
    keeps = {}
    with torch.no_grad():
        for module in linear_modules(layer).values():
            keep = block_mask(module.weight.abs(), 0.5, 16, 16)
            module.weight.mul_(keep)
            keeps[module] = keep
    before = layer_mse(layer, inputs, dense)
    result = reconstruct_block(layer, keeps, inputs, dense, epochs=4, lr=1e-3)
    assert result.mse_before == pytest.approx(before) and result.steps == 16
    assert result.mse_after < 0.8 * result.mse_before
    # the sequential walk takes mse_after from the outputs it computes for the next layer: the same number
    outs = cal.run_layer(layer, inputs, torch.empty_like(inputs.hidden))
    assert outputs_mse(outs, dense) == pytest.approx(result.mse_after, rel=1e-12)
    for module, keep in keeps.items():
        assert (module.weight[~keep] == 0).all() and module.weight.requires_grad
        assert pattern_violations(keep, parse_pattern("block16x16")) == []


@pytest.mark.parametrize("sequential", [True, False])
def test_prune_with_block_reconstruction(tmp_path, tiny_model_dir, shared_data, sequential):
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(tmp_path / "b"), calib_dataset="wikitext2",
                      data_dir=str(shared_data), nsamples=4, seqlen=64, pattern="block16x16",
                      block_reconstruct_epochs=3, block_reconstruct_lr=1e-3, sequential=sequential)
    out = run_prune(cfg, console=QUIET)
    info = json.loads((out / "prune.json").read_text())
    for rec in info["block_reconstruct"].values():
        assert rec["mse_after"] < rec["mse_before"] and rec["steps"] == 12
    assert info["pattern_check"]["ok"] and verify_dir(out).ok
    for name, keep in load_masks(out).items():
        assert pattern_violations(keep, parse_pattern("block16x16")) == []
        assert info["matrices"][name]["achieved"] == pytest.approx(0.5, abs=256 / keep.numel())


def test_max_steps_runs_the_first_steps_of_the_full_schedule_and_the_probe_changes_nothing(tiny_model_dir,
                                                                                           shared_data):
    """A budgeted layer trains the first `max_steps` of the same seeded order (3 steps of a 4 x 2 schedule are
    the first 3 steps of the full run), and timing a step leaves weights, flags and gradients as they were."""
    from prunetune.pruning.blockwise import probe_step_seconds

    def setup():
        model, tok = load_model(str(tiny_model_dir))
        windows = cal.calibration_windows(tokenize(load_text("wikitext2", "train", str(shared_data)), tok).input_ids,
                                          4, 32, 0)
        _, layers = find_decoder_layers(model)
        inputs = cal.capture_first_layer_inputs(model, layers[0], windows, "cpu")
        dense = cal.run_layer(layers[0], inputs, torch.empty_like(inputs.hidden)).clone()
        keeps = {}
        with torch.no_grad():
            for module in linear_modules(layers[0]).values():
                keeps[module] = block_mask(module.weight.abs(), 0.5, 16, 16)
                module.weight.mul_(keeps[module])
        return layers[0], keeps, inputs, dense

    layer, keeps, inputs, dense = setup()
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert probe_step_seconds(layer, keeps, inputs, dense) > 0
    for n, p in layer.named_parameters():
        assert torch.equal(p, weights[n]) and p.requires_grad == flags[n] and p.grad is None
    cut = reconstruct_block(layer, keeps, inputs, dense, epochs=2, lr=1e-3, seed=5, max_steps=3)
    assert cut.steps == 3
    other, other_keeps, _, _ = setup()
    # the same 3 steps, by hand: a 1-epoch run cut at 3 draws the same first permutation
    ref = reconstruct_block(other, other_keeps, inputs, dense, epochs=1, lr=1e-3, seed=5, max_steps=3)
    assert ref.steps == 3 and ref.mse_after == pytest.approx(cut.mse_after, rel=1e-6)
    third, third_keeps, _, _ = setup()
    full = reconstruct_block(third, third_keeps, inputs, dense, epochs=2, lr=1e-3, seed=5, max_steps=100)
    assert full.steps == 8  # the budget never adds steps


def test_prune_block_reconstruct_minutes_fits_steps_per_layer(tmp_path, tiny_model_dir, shared_data):
    base = dict(model=str(tiny_model_dir), calib_dataset="wikitext2", data_dir=str(shared_data), nsamples=4,
                seqlen=64, pattern="block16x16", block_reconstruct_epochs=3, block_reconstruct_lr=1e-3)
    tight = run_prune(PruneConfig(out=str(tmp_path / "tight"), block_reconstruct_minutes=1e-6, **base), console=QUIET)
    info = json.loads((tight / "prune.json").read_text())
    budget = info["block_reconstruct_budget"]
    assert budget["layers"] == 2 and budget["planned_steps_per_layer"] == 12 and budget["s_per_step"] > 0
    assert budget["steps_per_layer"] == 1 and budget["cut"]  # never 0: every layer trains at least one step
    assert [r["steps"] for r in info["block_reconstruct"].values()] == [1, 1]
    assert info["pattern_check"]["ok"] and verify_dir(tight).ok
    roomy = run_prune(PruneConfig(out=str(tmp_path / "roomy"), block_reconstruct_minutes=600, **base), console=QUIET)
    info = json.loads((roomy / "prune.json").read_text())
    assert info["block_reconstruct_budget"]["steps_per_layer"] == 12 and not info["block_reconstruct_budget"]["cut"]
    assert [r["steps"] for r in info["block_reconstruct"].values()] == [12, 12]
    with pytest.raises(UserError, match="block-reconstruct-minutes must be a positive number"):
        PruneConfig(out=str(tmp_path / "bad"), block_reconstruct_minutes=0, **base)
    with pytest.raises(UserError, match="block-wise stage, which is off"):
        PruneConfig(out=str(tmp_path / "bad"), block_reconstruct_minutes=3, **(base | {"block_reconstruct_epochs": 0}))
