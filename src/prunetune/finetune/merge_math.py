"""Merging LoRA deltas into pruned weights without losing the pruned pattern: pure tensor math.

A plain merge `W + s * B @ A` is dense: the low-rank delta is non-zero almost everywhere, so every pruned
weight comes back (Wanda users saw 40% sparsity fall to 32.7%). Masking the delta by the pruning keep-mask,
`W + keep * (s * B @ A)`, keeps exactly the pruned pattern at the cost of the masked part of the update;
`prunetune merge` reports that cost as the perplexity of the unmerged vs the merged model.

Like PEFT's `merge(safe_merge=True)`, nothing here writes a non-finite weight: the merge fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunetune.errors import UserError


@dataclass(frozen=True)
class MergeStats:
    """What one module's merge did, for `merge.json`."""

    pruned: int
    """Weights the keep-mask marks as pruned."""
    restored_by_plain_merge: int
    """Pruned weights a plain (unmasked) merge would have made non-zero: the sparsity a plain merge loses."""
    masked_delta_norm: float
    """Frobenius norm of the delta dropped by the mask, relative to the whole delta's norm (0 without a mask)."""


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The LoRA update `scaling * B @ A` in float32: A (r, in), B (out, r) -> (out, in), as PEFT computes it.

    float32 whatever the adapter dtype, so a bf16 adapter merged on CPU loses nothing before the final cast.
    """
    delta = (lora_b.float() @ lora_a.float()) * scaling  # (out, in)
    return delta.T if fan_in_fan_out else delta


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """UserError naming `what` when `tensor` holds NaN or Inf (`what` names the module and the tensor)."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise UserError(
            f"{what} has {bad} non-finite value(s) (NaN/Inf); refusing to merge: the adapter (or base model) is "
            f"broken, merge an earlier checkpoint instead (e.g. --adapter RUN/checkpoint-N)"
        )


def masked_merge(
    weight: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, MergeStats]:
    """New weight `weight + keep * delta` (`keep=None`: plain merge), computed in float32, cast to `weight`'s dtype.

    weight (out, in) any float dtype; delta (out, in); keep (out, in) bool, True = weight kept by pruning.
    Arguments are not modified. Raises UserError naming `name` for a non-finite delta or merged weight, or a
    keep-mask whose shape does not match.
    """
    if delta.shape != weight.shape:
        raise UserError(f"{name}: LoRA delta shape {tuple(delta.shape)} != weight shape {tuple(weight.shape)}")
    check_finite(delta, f"LoRA delta of {name}")
    if keep is None:
        merged = weight.float() + delta
        stats = MergeStats(pruned=0, restored_by_plain_merge=0, masked_delta_norm=0.0)
    else:
        if keep.shape != weight.shape:
            raise UserError(
                f"{name}: keep-mask shape {tuple(keep.shape)} != weight shape {tuple(weight.shape)}; "
                f"the masks belong to another model, give the pruned model they came with (--model)"
            )
        keep = keep.to(device=weight.device, dtype=torch.bool)
        # where() rather than `delta * keep`: a pruned position stays +0.0 exactly (never -0.0).
        kept_delta = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        merged = weight.float() + kept_delta
        dropped = delta - kept_delta
        total_norm = float(torch.linalg.vector_norm(delta))
        stats = MergeStats(
            pruned=int((~keep).sum()),
            restored_by_plain_merge=int(((weight.float() + dropped != 0) & ~keep).sum()),
            masked_delta_norm=float(torch.linalg.vector_norm(dropped)) / total_norm if total_norm > 0 else 0.0,
        )
    merged = merged.to(weight.dtype)
    check_finite(merged, f"merged weight of {name}")
    return merged, stats


def masked_nonzeros(weight: torch.Tensor, keep: torch.Tensor) -> int:
    """How many weights the keep-mask marks as pruned are non-zero (0 for a model that keeps its pattern)."""
    return int(((weight != 0) & ~keep.to(device=weight.device, dtype=torch.bool)).sum())
