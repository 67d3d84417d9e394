"""Adapter directories: prunetune's record beside PEFT's files (which pruned base, its digest), and the checks
that an adapter is complete and belongs to the model it is applied to."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from prunetune.architecture import prunable_linears
from prunetune.errors import UserError
from prunetune.rundir.names import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS
from prunetune.rundir.reading import check_readable_dir, check_safetensors, read_json
from prunetune.sparsity.masks import mask_digest


def base_digest(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None) -> str:
    """A fingerprint of the base an adapter is trained on: names, shapes and values of the prunable weights.

    Values are hashed rounded to bfloat16, so the same checkpoint loaded in float32 or bfloat16 gives the same
    digest; a strided sample (every 61st value, ~2% of the bytes) keeps it well under a second on CPU.
    With `masks`, their digests are included too (the pattern is part of the base).
    """
    h = hashlib.sha256()
    for name, module in sorted(prunable_linears(model).items()):
        w = module.weight.detach()
        sample = w.flatten()[::61].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(sample.numpy().tobytes())
        if masks is not None and name in masks:
            h.update(mask_digest(masks[name]).encode())
    return h.hexdigest()[:16]


def write_adapter_meta(adapter_dir: str | Path, *, pruned_model: str | Path, base_model: str | None,
                       digest: str, **extra: Any) -> Path:
    """Write `prunetune_adapter.json`: which pruned model the adapter belongs to and the base's digest."""
    from prunetune.runinfo import write_json

    path = Path(adapter_dir) / ADAPTER_META
    write_json(path, {"pruned_model": str(Path(pruned_model).resolve()), "base_model": base_model,
                      "base_digest": digest, **extra})
    return path


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """prunetune's record of an adapter ({} for a PEFT adapter prunetune did not write)."""
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        return {}
    meta = read_json(path, ADAPTER_META, "delete it or re-run `prunetune finetune`")
    return meta if isinstance(meta, dict) else {}


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on: prunetune's record first, then PEFT's own."""
    adapter_dir = Path(adapter_dir).expanduser()
    ours = read_adapter_meta(adapter_dir).get("pruned_model")
    if ours:
        return str(ours)
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        base = read_json(adapter_dir / ADAPTER_CONFIG, ADAPTER_CONFIG).get("base_model_name_or_path")
        return str(base) if base else None
    return None


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """A readable, complete PEFT adapter directory (config parses, weights not truncated), or a UserError."""
    path = check_readable_dir(adapter_dir, "adapter")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"adapter {str(adapter_dir)!r} has no {ADAPTER_CONFIG}; give the adapter directory "
                        "`prunetune finetune` wrote (RUN/adapter)")
    config = read_json(path / ADAPTER_CONFIG, "adapter config", "the adapter is damaged; use another checkpoint")
    if not isinstance(config, dict):
        raise UserError(f"{path / ADAPTER_CONFIG} is not an adapter config (a JSON object)")
    weights = path / ADAPTER_WEIGHTS
    if weights.exists():
        check_safetensors(weights, "adapter weights")
    elif not (path / "adapter_model.bin").is_file():
        raise UserError(f"adapter {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; the adapter was not saved "
                        "completely, use a checkpoint-*/ of the run or train again")
    return path


def check_adapter_base(adapter_dir: str | Path, model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                       *, force: bool = False) -> str | None:
    """Refuse an adapter trained on another base (digest mismatch) unless `force`; returns a note, or None.

    Adapters without a recorded digest (older prunetune, plain PEFT) pass with a note saying it was not checked.
    """
    meta = read_adapter_meta(adapter_dir)
    recorded = meta.get("base_digest")
    if not recorded:
        return "the adapter records no base digest; cannot check it was trained on this model"
    actual = base_digest(model, masks)
    if actual == recorded:
        return None
    message = (f"adapter {str(adapter_dir)!r} was trained on another base (digest {recorded}, this model "
               f"{actual}; trained on {meta.get('pruned_model')!r})")
    if force:
        return message + "; merged anyway (--force)"
    raise UserError(message + "; pass the model it was trained on, or --force to merge anyway")
