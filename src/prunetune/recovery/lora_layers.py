"""The masked LoRA forward: a PEFT LoRA variant (the hook DoRA uses) that holds one module's keep-mask.

`masked=True`: the layer adds `keep * (s * B @ A)` (what masked LoRA trains, and what a masked merge writes);
`False`: vanilla LoRA (its deployable model is measured inside `deployable(model)`, which switches every variant
to the masked delta without merging). The mask is a plain tensor, never a module buffer: it is not saved in the
adapter and DDP does not broadcast it every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from prunetune.recovery.merge import masked_merge


class _MaskedLoraDelta(torch.autograd.Function):
    """y = x @ (keep * (B @ A))^T, without keeping the (out, in) masked delta alive for the backward pass.

    Saves x, A, B and keep; the backward recomputes the delta. Peak extra memory is two (out, in) matrices
    of the module being computed, never one per module of the network.
    x (..., in), A (r, in), B (out, r), keep (out, in) bool -> (..., out).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        delta = torch.where(keep, lora_b @ lora_a, 0.0)  # (out, in) in the adapter's dtype
        ctx.save_for_backward(x, lora_a, lora_b, keep)
        return F.linear(x.to(delta.dtype), delta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, lora_a, lora_b, keep = ctx.saved_tensors
        dtype = lora_a.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            delta = torch.where(keep, lora_b @ lora_a, 0.0)
            grad_x = (g @ delta).reshape(x.shape).to(x.dtype)  # (N, in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_delta = torch.where(keep, g.T @ x.reshape(-1, x.shape[-1]).to(dtype), 0.0)  # (out, in)
            grad_a = lora_b.T @ grad_delta  # (r, in)
            grad_b = grad_delta @ lora_a.T  # (out, r)
        return grad_x, grad_a, grad_b, None


def masked_lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x @ (keep * (B @ A))^T, differentiable in x, A and B. x (..., in), A (r, in), B (out, r), keep (out, in)."""
    return _MaskedLoraDelta.apply(x, lora_a, lora_b, keep)


class MaskedLoraVariant:
    """A PEFT LoRA variant (the hook DoRA uses) holding one module's keep-mask.

    `masked=True`: the forward adds `keep * (s * B @ A)` and the PEFT merge writes exactly that; `False`:
    vanilla LoRA. The mask is a plain tensor, not a module buffer: it is never saved in the adapter and DDP
    does not broadcast it every step.
    """

    keeps_pattern = True
    """Marks prunetune's own variant: `recovery.merge` merges a layer holding it like plain LoRA, masked by the
    pattern (it refuses variants that change the math, such as DoRA)."""

    def __init__(self, keep: torch.Tensor, masked: bool) -> None:
        self.keep = keep.bool()
        self.masked = masked

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        return None

    def _keep_on(self, device: torch.device) -> torch.Tensor:
        if self.keep.device != device:
            self.keep = self.keep.to(device)
        return self.keep

    def delta(self, module: nn.Module, adapter: str) -> torch.Tensor:
        delta = module.get_delta_weight(adapter)  # (out, in), scaling included
        if not self.masked:
            return delta
        return torch.where(self._keep_on(delta.device), delta, 0.0)

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        # PEFT's own merge path through the variant: the same math as `prunetune merge` (recovery.merge).
        delta = module.get_delta_weight(active_adapter)
        keep = self._keep_on(delta.device) if self.masked else None
        return masked_merge(orig_weight, delta, keep, "LoRA layer")[0]

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(self.merge_safe(module, active_adapter, orig_weight))

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return (orig_weight.float() - self.delta(module, active_adapter).float()).to(orig_weight.dtype)

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        lora_a = module.lora_A[active_adapter].weight  # (r, in)
        lora_b = module.lora_B[active_adapter].weight  # (out, r)
        x = module.lora_dropout[active_adapter](x)
        scaling = module.scaling[active_adapter]
        if not self.masked:
            return result + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
        return result + masked_lora_delta(x, lora_a, lora_b, self._keep_on(lora_a.device)) * scaling


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA linear layers by the name of the base module they wrap (as in `prunable_linears`)."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor], masked: bool) -> int:
    """Give every LoRA layer of the PEFT `model` its keep-mask; `masked`: train/evaluate with the masked delta.

    Returns the number of LoRA layers that got a mask. A LoRA layer on a matrix that was not pruned (no mask)
    stays vanilla: its delta changes no pattern. Raises ValueError for a mask of the wrong shape.
    """
    count = 0
    for name, layer in _lora_layers(model).items():
        keep = masks.get(name)
        if keep is None:
            continue
        weight = layer.get_base_layer().weight
        if tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: keep-mask {tuple(keep.shape)} != weight {tuple(weight.shape)}")
        for adapter in layer.lora_A:
            layer.lora_variant[adapter] = MaskedLoraVariant(keep.to(weight.device), masked)
        count += 1
    return count


@contextlib.contextmanager
def masked_forward(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[int]:
    """Within the block, the PEFT `model` computes the masked delta (what a masked-LoRA adapter was trained
    as); afterwards its LoRA layers are plain PEFT layers again, so PEFT's own merge/unload apply."""
    count = attach_masks(model, masks, masked=True)
    try:
        yield count
    finally:
        for layer in _lora_layers(model).values():
            for adapter in [a for a, v in layer.lora_variant.items() if isinstance(v, MaskedLoraVariant)]:
                del layer.lora_variant[adapter]


def _variants(model: nn.Module) -> list[MaskedLoraVariant]:
    return [v for layer in _lora_layers(model).values() for v in layer.lora_variant.values()
            if isinstance(v, MaskedLoraVariant)]


@contextlib.contextmanager
def deployable(model: nn.Module) -> Iterator[int]:
    """Within the block, every LoRA layer with a keep-mask adds the masked delta: the model computes what
    `merge --keep-sparsity` would write. Yields the number of masked layers; restores the previous setting."""
    variants = _variants(model)
    before = [v.masked for v in variants]
    for v in variants:
        v.masked = True
    try:
        yield len(variants)
    finally:
        for v, was in zip(variants, before, strict=True):
            v.masked = was
