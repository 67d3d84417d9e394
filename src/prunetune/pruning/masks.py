"""Keep-masks on disk (`masks.safetensors`), compact: block masks are stored one bit per tile, all others one bit
per weight (numpy `packbits`, big-endian bit order). `load_masks` always returns full bool tensors.

File layout: one uint8 tensor per pruned module, keyed by the module's full name from
`prunetune.architecture.prunable_linears` on the plain model (e.g. `model.layers.0.self_attn.q_proj`);
the safetensors metadata holds `prunetune_masks` = JSON {"version", "pattern", "modules": {name: {"shape",
"encoding": "bits"|"tiles", "tile": [h, w]}}} plus any extra pattern metadata the caller passes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunetune.pruning.patterns import expand_tiles, tile_grid, tile_sums

MASKS_FILE = "masks.safetensors"
PRUNE_JSON = "prune.json"
FORMAT_VERSION = 1
_META_KEY = "prunetune_masks"


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.detach().cpu().flatten().numpy().astype(bool)))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
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


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, pattern_meta: dict[str, Any]) -> Path:
    """Write `masks` (name -> bool keep-mask) to `path` (a directory gets `masks.safetensors`).

    `pattern_meta` is stored as-is; when it has `"tile": [h, w]` (block patterns) masks are stored per tile.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    tile = tuple(pattern_meta["tile"]) if pattern_meta.get("tile") else None
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, keep in masks.items():
        keep = keep.detach().cpu().bool()
        tiles = _tile_level(keep, tile) if tile else None
        if tiles is not None:
            tensors[name] = _pack(tiles)
            modules[name] = {"shape": list(keep.shape), "encoding": "tiles", "tile": list(tile)}
        else:
            tensors[name] = _pack(keep)
            modules[name] = {"shape": list(keep.shape), "encoding": "bits"}
    meta = {"version": FORMAT_VERSION, "pattern": pattern_meta, "modules": modules}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def _mask_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MASKS_FILE if path.is_dir() else path


def read_mask_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a masks file (pattern and per-module shapes/encodings)."""
    with safe_open(str(_mask_path(path)), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{_mask_path(path)} is not a prunetune masks file (no {_META_KEY} metadata)")
    return json.loads(raw)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Full bool keep-masks (True = kept), shaped like each weight, keyed by full module name.

    `path` is a pruned model directory or its `masks.safetensors`.
    """
    path = _mask_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no masks file at {path}")
    meta = read_mask_meta(path)
    masks: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name, info in meta["modules"].items():
            shape = tuple(info["shape"])
            packed = f.get_tensor(name)
            if info["encoding"] == "tiles":
                h, w = info["tile"]
                r, c = tile_grid(shape, h, w)
                masks[name] = expand_tiles(_unpack(packed, r * c).view(r, c), shape, h, w)
            else:
                masks[name] = _unpack(packed, shape[0] * shape[1]).view(shape)
    return masks
