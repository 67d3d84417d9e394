"""Block-wise reconstruction (EBFT-style): the layer's output error on the calibration activations goes down
and the sparsity pattern stays exact, directly on one layer and through `prune`."""

import json

import pytest
import torch
from rich.console import Console

from prunetune.architecture import find_decoder_layers, linear_modules
from prunetune.data import load_text, tokenize
from prunetune.models import load_model
from prunetune.pruning import calibration as cal
from prunetune.pruning.blockwise import layer_mse, reconstruct_block
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.patterns import block_mask, parse_pattern, pattern_violations
from prunetune.pruning.verify import verify_dir
from prunetune.rundir import load_masks

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
