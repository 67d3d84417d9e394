"""The one masked merge: LoRA deltas folded into pruned weights without losing the pruned pattern. `prunetune
merge`, the pipeline, PEFT's merge through the masked variant, the tests and the benchmarks all merge here.

A plain merge `W + s * B @ A` is dense: the low-rank delta is non-zero almost everywhere, so every pruned
weight comes back (Wanda users saw 40% sparsity fall to 32.7%). Masking the delta by the pruning keep-mask,
`W + keep * (s * B @ A)`, keeps exactly the pruned pattern at the cost of the masked part of the update;
`prunetune merge` reports that cost as the perplexity of the unmerged vs the merged model.

`masked_merge` is the tensor math (pure); `merge_lora_layers` applies it to every LoRA layer of a PEFT model and
`merge_adapter` returns the merged plain model with the pattern asserted.

Like PEFT's `merge(safe_merge=True)`, nothing here writes a non-finite weight: the merge fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunetune.errors import UserError
from prunetune.sparsity.violations import pattern_violations


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


@torch.no_grad()
def merge_lora_layers(
    peft_model: torch.nn.Module, masks: dict[str, torch.Tensor] | None
) -> dict[str, MergeStats | None]:
    """Write `W + keep * delta` into every LoRA-wrapped base layer (masks=None: plain merge).

    All merged weights are computed and checked finite before any is written, so a refusal leaves the
    model untouched. Returns per-module stats (None for a module outside the masks, e.g. lm_head).
    """
    from peft.tuners.lora import LoraLayer

    planned: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
    stats: dict[str, MergeStats | None] = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        target = layer.get_base_layer()
        if not isinstance(target, torch.nn.Linear):
            raise UserError(f"{name}: LoRA on {type(target).__name__} is not supported by merge (Linear only)")
        weight, bias = target.weight, target.bias
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            variant = getattr(layer, "lora_variant", {}).get(adapter)
            # prunetune's own masked variant changes no math here (the merge masks by `masks`); others (DoRA) do.
            if variant is not None and not getattr(variant, "keeps_pattern", False):
                raise UserError(f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); merge handles plain LoRA")
            delta = lora_delta(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter],
                               layer.fan_in_fan_out)
            keep = None if masks is None else masks.get(name)
            weight, stat = masked_merge(weight, delta.to(weight.device), keep, name)
            stats[name] = stat if keep is not None else None
            if layer.lora_bias.get(adapter):
                # Biases are never pruned, so the LoRA bias merges unmasked.
                bias = bias + layer.lora_B[adapter].bias * layer.scaling[adapter]
                if not bool(torch.isfinite(bias).all()):
                    raise UserError(f"LoRA bias of {name} is non-finite (NaN/Inf); refusing to merge")
        planned.append((target, weight, bias))
    if not planned:
        raise UserError("the adapter has no LoRA layers on this model; nothing to merge")
    for target, weight, bias in planned:
        target.weight.data = weight
        if bias is not None:
            target.bias.data = bias.to(target.bias.dtype)
    return stats


@torch.no_grad()
def merge_adapter(peft_model: torch.nn.Module, masks: dict[str, torch.Tensor] | None
                  ) -> tuple[torch.nn.Module, dict[str, MergeStats | None]]:
    """The merged plain model of a PEFT LoRA model (`masks=None`: a plain merge) and per-module stats. With
    masks, every pruned weight is asserted still zero afterwards (a failure is a bug, not a user error)."""
    stats = merge_lora_layers(peft_model, masks)
    merged = peft_model.unload()
    if masks is not None:
        leaked = pattern_violations(merged, masks)
        if leaked:
            raise AssertionError(f"pruned weights became non-zero in {len(leaked)} modules: {leaked}")
    return merged, stats
