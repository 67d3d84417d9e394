"""Keep-masks on disk (`prunetune/masks.safetensors` in a model directory, `names.META_DIR` says why): written
atomically, read back whole or as a user error. The encoding itself is `prunetune.sparsity.masks` (pure)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prunetune.architecture import prunable_linears
from prunetune.errors import UserError
from prunetune.rundir.names import MASKS_FILE, META_DIR, PERMUTATION_FILE
from prunetune.rundir.reading import check_safetensors
from prunetune.sparsity.masks import decode_mask, encode_masks

_MASKS_META_KEY = "prunetune_masks"

def masks_target(model_dir: str | Path) -> Path:
    """Where a model directory's masks are written: `prunetune/masks.safetensors`, out of weight loaders' way."""
    return Path(model_dir) / META_DIR / MASKS_FILE


def masks_file(model_dir: str | Path) -> Path | None:
    """The masks file of a model directory: `prunetune/masks.safetensors`, else `masks.safetensors` beside the
    weights (directories written before issue 21); None when it has neither."""
    for path in (masks_target(model_dir), Path(model_dir) / MASKS_FILE):
        if path.is_file():
            return path
    return None


def copy_masks(src_dir: str | Path, dst_dir: str | Path) -> Path | None:
    """Copy `src_dir`'s masks (either layout) into `dst_dir` in the current layout, with the channel permutation
    the model was pruned with when it has one (a model trained from it keeps its channel order); None when it
    has no masks."""
    src = masks_file(src_dir)
    if src is None:
        return None
    dst = masks_target(dst_dir)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    perm = Path(src_dir) / META_DIR / PERMUTATION_FILE
    if perm.is_file():
        shutil.copy2(perm, dst.parent / PERMUTATION_FILE)
    return dst


def _masks_path(path: str | Path) -> Path:
    """A masks file given itself or its model directory (where it is, or where it would be written)."""
    path = Path(path)
    return (masks_file(path) or masks_target(path)) if path.is_dir() else path


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, pattern_meta: dict[str, Any]) -> Path:
    """Write `masks` (name -> bool keep-mask) to `path` (a model directory gets `prunetune/masks.safetensors`),
    atomically.

    `pattern_meta` is stored as-is; with `"tile": [h, w]` (block patterns) whole-tile masks take one bit a tile.
    Layout: see `prunetune.pruning.masks`.
    """
    return save_encoded_masks(*encode_masks(masks, pattern_meta), path)


def save_encoded_masks(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Path:
    """`save_masks` of masks already encoded (`sparsity.masks.encode_mask` + `masks_meta`): what `prune` writes
    from the packed masks it keeps instead of one bool per weight."""
    path = masks_target(path) if Path(path).is_dir() else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={_MASKS_META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_mask_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a masks file (pattern and per-module shapes/encodings). ValueError if not ours."""
    with safe_open(str(_masks_path(path)), framework="pt") as f:
        raw = (f.metadata() or {}).get(_MASKS_META_KEY)
    if raw is None:
        raise ValueError(f"{_masks_path(path)} is not a prunetune masks file (no {_MASKS_META_KEY} metadata)")
    return json.loads(raw)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Full bool keep-masks (True = kept) shaped like each weight, by full module name.

    `path` is a pruned model directory (either layout) or its masks file. Raises FileNotFoundError / ValueError /
    SafetensorError on a missing or damaged file (`load_keep_masks` turns these into user errors).
    """
    path = _masks_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no masks file at {path}")
    meta = read_mask_meta(path)
    with safe_open(str(path), framework="pt") as f:
        return {name: decode_mask(f.get_tensor(name), info) for name, info in meta["modules"].items()}


def load_keep_masks(pruned_dir: str | Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Keep-mask (True = kept) of every prunable linear of `model`, on CPU, and where it came from.

    From the directory's masks file when it has one (a module it lacks: `weight != 0`), else from the zero
    weights of a plain model. A damaged masks file or one of another model is a UserError.
    """
    pruned_dir = Path(pruned_dir)
    linears = prunable_linears(model)
    path = masks_file(pruned_dir)
    if path is None:
        # Without a saved mask the zeros are the pattern; a weight that happens to be exactly 0 counts as pruned,
        # which only keeps it at 0.
        return {n: (m.weight != 0).cpu() for n, m in linears.items()}, f"weight != 0 ({MASKS_FILE} absent)"
    check_safetensors(path, "masks file")
    try:
        saved = {name: keep.to(torch.bool) for name, keep in load_masks(path).items()}
    except (ValueError, KeyError, OSError, SafetensorError) as err:
        raise UserError(
            f"cannot read {path} ({str(err)[:200]}); re-run `prunetune prune`, or check it with "
            f"`prunetune verify {pruned_dir}`"
        ) from None
    unknown = sorted(set(saved) - set(linears))
    if unknown:
        raise UserError(f"{path} names modules this model lacks ({', '.join(unknown[:3])}); "
                        "the masks belong to another model, pass the matching model")
    for name, keep in saved.items():
        if tuple(keep.shape) != tuple(linears[name].weight.shape):
            raise UserError(f"{name}: mask shape {tuple(keep.shape)} != weight shape "
                            f"{tuple(linears[name].weight.shape)} in {path}; pass the model the masks came with")
    masks = {n: saved[n] if n in saved else (m.weight != 0).cpu() for n, m in linears.items()}
    return masks, str(path.relative_to(pruned_dir))
