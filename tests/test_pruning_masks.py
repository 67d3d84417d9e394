"""Masks on disk: compact, and `load_masks` returns exactly what was saved as full bool tensors."""

import pytest
import torch

from prunetune.rundir import MASKS_FILE, META_DIR, load_masks, read_mask_meta, save_masks
from prunetune.sparsity.patterns import block_mask, unstructured_mask


def test_round_trip_bits_and_tiles(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {
        "model.layers.0.mlp.down_proj": block_mask(torch.rand(50, 37, generator=g), 0.5, 16, 16, "matrix"),
        "model.layers.0.self_attn.q_proj": block_mask(torch.rand(64, 64, generator=g), 0.5, 16, 16, "band"),
        # not whole tiles: must fall back to one bit per weight, still exact
        "model.layers.1.self_attn.k_proj": unstructured_mask(torch.rand(33, 20, generator=g), 0.5, "row"),
    }
    path = save_masks(masks, tmp_path, {"pattern": "block16x16", "tile": [16, 16]})
    assert path == tmp_path / META_DIR / MASKS_FILE
    meta = read_mask_meta(tmp_path)
    assert meta["modules"]["model.layers.0.mlp.down_proj"]["encoding"] == "tiles"
    assert meta["modules"]["model.layers.1.self_attn.k_proj"]["encoding"] == "bits"
    for loaded in (load_masks(tmp_path), load_masks(path)):
        assert set(loaded) == set(masks)
        for name, keep in masks.items():
            assert loaded[name].dtype == torch.bool
            assert torch.equal(loaded[name], keep)


def test_compact_storage(tmp_path):
    keep = block_mask(torch.rand(512, 512), 0.5, 16, 16, "matrix")
    bits = save_masks({"a": keep}, tmp_path / "bits.safetensors", {"pattern": "unstructured"})
    tiles = save_masks({"a": keep}, tmp_path / "tiles.safetensors", {"pattern": "block16x16", "tile": [16, 16]})
    assert bits.stat().st_size < 512 * 512 / 8 + 1024  # one bit per weight
    assert tiles.stat().st_size < 1024 + 512  # one bit per tile
    assert torch.equal(load_masks(tiles)["a"], keep) and torch.equal(load_masks(bits)["a"], keep)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path)
