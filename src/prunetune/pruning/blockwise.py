"""Block-wise reconstruction (EBFT-style, Guo et al. 2024): after a decoder layer is pruned, train its kept
weights so the layer reproduces the dense model's outputs on the calibration activations. One layer is resident
at a time; the loss is the mean squared error of the layer's output; gradients of pruned weights are masked and
the weights re-masked after every Adam step, so the pattern stays exact.

Training runs in float32 (Adam's moments and the small weight updates need it); a layer stored in bf16/fp16 is
upcast for the duration and cast back. The forward passes run in the calibration precision (autocast).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from prunetune.pruning.calibration import LayerInputs, layer_output


@dataclasses.dataclass(frozen=True)
class BlockResult:
    mse_before: float
    mse_after: float
    steps: int

    def record(self) -> dict[str, float | int]:
        return {"mse_before": self.mse_before, "mse_after": self.mse_after, "steps": self.steps}


@torch.no_grad()
def layer_mse(layer: nn.Module, inputs: LayerInputs, targets: torch.Tensor,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean squared error of `layer` over every calibration window against `targets` (nsamples, seqlen, hidden)."""
    total = 0.0
    for j in range(inputs.hidden.shape[0]):
        with autocast():
            out = layer_output(layer, inputs, j)
        total += float((out.float() - targets[j : j + 1].float()).pow(2).mean())
    return total / inputs.hidden.shape[0]


def reconstruct_block(
    layer: nn.Module,
    keeps: dict[nn.Linear, torch.Tensor],
    inputs: LayerInputs,
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> BlockResult:
    """Adam on the kept weights of `keeps` (module -> bool keep-mask), one calibration window per step, `epochs`
    passes in a seeded random order. Everything else in the layer is frozen."""
    stored = next(layer.parameters()).dtype
    flags = {p: p.requires_grad for p in layer.parameters()}
    layer.float()
    masks = {m: k.to(m.weight.device, torch.float32) for m, k in keeps.items()}
    for p in layer.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in masks]
    for w in weights:
        w.requires_grad_(True)
    before = layer_mse(layer, inputs, targets, autocast)
    opt = torch.optim.Adam(weights, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = 0
    try:
        for _ in range(epochs):
            for j in torch.randperm(inputs.hidden.shape[0], generator=gen).tolist():
                with autocast():
                    out = layer_output(layer, inputs, j)
                loss = (out.float() - targets[j : j + 1].float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for module, keep in masks.items():
                    module.weight.grad.mul_(keep)  # pruned weights get no update ...
                opt.step()
                with torch.no_grad():
                    for module, keep in masks.items():
                        module.weight.mul_(keep)  # ... and stay exactly zero whatever Adam's arithmetic does
                steps += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        layer.to(stored)
        with torch.no_grad():
            for module, keep in masks.items():
                module.weight.mul_(keep.to(module.weight.dtype))
    return BlockResult(before, layer_mse(layer, inputs, targets, autocast), steps)
