"""Keep-mask encoding, pure (no I/O): block masks are stored one bit per tile, all others one bit per weight
(numpy `packbits`, big-endian bit order). The file itself (`masks.safetensors`) is read and written by
`prunetune.rundir` (`save_masks` / `load_masks`), which calls these.

Layout: one uint8 tensor per pruned module, keyed by the module's full name from
`prunetune.architecture.prunable_linears` on the plain model (e.g. `model.layers.0.self_attn.q_proj`); the
metadata is JSON {"version", "pattern", "modules": {name: {"shape", "encoding": "bits"|"tiles", "tile": [h, w]}}}
plus any extra pattern metadata the caller passes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from prunetune.sparsity.patterns import expand_tiles, tile_grid, tile_sums

FORMAT_VERSION = 1


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.detach().cpu().flatten().numpy().astype(bool)))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    if packed.numel() * 8 < count:  # np.unpackbits would pad with zeros: a truncated mask would read as "pruned"
        raise ValueError(f"packed mask holds {packed.numel() * 8} bits, {count} needed")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


def _tile_level(keep: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor | None:
    """The (R, C) tile mask when `keep` is whole tiles, else None (then it is stored per weight)."""
    h, w = tile
    kept = tile_sums(keep.to(torch.int32), h, w)
    areas = tile_sums(torch.ones(keep.shape, dtype=torch.int32), h, w)
    if bool(((kept != 0) & (kept != areas)).any()):
        return None
    return kept == areas


def mask_digest(keep: torch.Tensor) -> str:
    """sha256 of the packed mask: recorded in prune.json so `verify` notices an edited mask file."""
    return hashlib.sha256(_pack(keep).numpy().tobytes() + str(tuple(keep.shape)).encode()).hexdigest()[:16]


def encode_masks(
    masks: dict[str, torch.Tensor], pattern_meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(packed uint8 tensors by name, metadata) for `masks` (name -> bool keep-mask).

    With `pattern_meta["tile"] = [h, w]` (block patterns) a mask of whole tiles is stored one bit per tile.
    """
    tile = tuple(pattern_meta["tile"]) if pattern_meta.get("tile") else None
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, keep in masks.items():
        tensors[name], modules[name] = encode_mask(keep, tile)
    return tensors, masks_meta(modules, pattern_meta)


def encode_mask(keep: torch.Tensor, tile: tuple[int, int] | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(packed uint8 tensor, its metadata entry) of one bool keep-mask: one bit per tile when `tile` is given and
    the mask is whole tiles, else one bit per weight. What `prune` keeps of a layer's masks once it is done."""
    keep = keep.detach().cpu().bool()
    tiles = _tile_level(keep, tile) if tile else None
    if tiles is not None:
        return _pack(tiles), {"shape": list(keep.shape), "encoding": "tiles", "tile": list(tile)}
    return _pack(keep), {"shape": list(keep.shape), "encoding": "bits"}


def masks_meta(modules: dict[str, dict[str, Any]], pattern_meta: dict[str, Any]) -> dict[str, Any]:
    """The file metadata of masks encoded module by module (`encode_mask`)."""
    return {"version": FORMAT_VERSION, "pattern": pattern_meta, "modules": modules}


def decode_mask(packed: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
    """The full bool keep-mask from one packed tensor and its metadata entry."""
    shape = tuple(info["shape"])
    if info["encoding"] == "tiles":
        h, w = info["tile"]
        r, c = tile_grid(shape, h, w)
        return expand_tiles(_unpack(packed, r * c).view(r, c), shape, h, w)
    return _unpack(packed, shape[0] * shape[1]).view(shape)

