"""The one count of weights that break a keep-mask: a non-zero weight where the mask says pruned. Fine-tuning's
sparsity assertion, `merge`'s checks, the recovery methods, `verify`'s model check and the benchmarks all count
here."""

from __future__ import annotations

import torch
from torch import nn

from prunetune import sharded
from prunetune.architecture import prunable_linears


def masked_nonzeros(weight: torch.Tensor, keep: torch.Tensor) -> int:
    """How many weights the keep-mask (True = kept) marks as pruned are non-zero (0 for a model that keeps it).
    A sharded weight (FSDP2) is counted on every rank's own shard against the same cut of the mask, and the counts
    summed over the ranks: every rank gets the whole model's answer."""
    if sharded.is_sharded(weight):
        piece = sharded.shard_like(keep.to(torch.bool), weight)
        return sharded.sum_over_ranks(masked_nonzeros(sharded.local(weight), piece), weight)
    return int(((weight != 0) & ~keep.to(device=weight.device, dtype=torch.bool)).sum())


@torch.no_grad()
def pattern_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """{module name: non-zero weights at pruned positions} for every matrix of `model` that breaks its mask
    (empty when the pattern holds). `model` may be PEFT-wrapped: a LoRA layer's base weight is checked against
    the mask of the module it wraps. A mask that names no matrix of the model is a bug (RuntimeError), never a
    silently skipped check."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    bad: dict[str, int] = {}
    checked = 0
    for name, module in prunable_linears(base).items():  # names of wrapped layers without `.base_layer`
        keep = masks.get(name)
        if keep is None:
            continue
        checked += 1
        count = masked_nonzeros(module.weight.detach(), keep)
        if count:
            bad[name] = count
    if checked != len(masks):
        raise RuntimeError(f"the sparsity check matched {checked} of {len(masks)} masked matrices: "
                           "this is a bug in prunetune")
    return bad
