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
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from prunetune.pruning.calibration import LayerInputs, layer_output


@dataclasses.dataclass(frozen=True)
class BlockResult:
    mse_before: float
    mse_after: float | None
    """None when the caller measures it from outputs it computes anyway (`outputs_mse`)."""
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
        total += _window_mse(out, targets[j : j + 1])
    return total / inputs.hidden.shape[0]


def outputs_mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """`layer_mse` of outputs already computed (nsamples, seqlen, hidden): the same number, window by window."""
    return sum(_window_mse(outputs[j : j + 1], targets[j : j + 1]) for j in range(outputs.shape[0])) / outputs.shape[0]


def _window_mse(out: torch.Tensor, target: torch.Tensor) -> float:
    return float((out.float() - target.float()).pow(2).mean())


@contextlib.contextmanager
def _trainable(layer: nn.Module, keeps: dict[nn.Linear, torch.Tensor]) -> Iterator[dict[nn.Linear, torch.Tensor]]:
    """The layer in float32 with only the weights of `keeps` trainable; yields module -> float keep-mask. On
    exit: the stored dtype and requires_grad flags restored, pruned weights exactly zero."""
    stored = next(layer.parameters()).dtype
    flags = {p: p.requires_grad for p in layer.parameters()}
    layer.float()
    masks = {m: k.to(m.weight.device, torch.float32) for m, k in keeps.items()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for m in masks:
        m.weight.requires_grad_(True)
    try:
        yield masks
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        layer.to(stored)
        with torch.no_grad():
            for module, keep in masks.items():
                module.weight.mul_(keep.to(module.weight.dtype))
                module.weight.grad = None


def _window_loss(layer: nn.Module, inputs: LayerInputs, targets: torch.Tensor, j: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    with autocast():
        out = layer_output(layer, inputs, j)
    return (out.float() - targets[j : j + 1].float()).pow(2).mean()


def probe_step_seconds(layer: nn.Module, keeps: dict[nn.Linear, torch.Tensor], inputs: LayerInputs,
                       targets: torch.Tensor,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Seconds of one block-wise step (forward + backward on one window; the Adam update is negligible beside
    it), the second of two: the first pays one-off costs. The layer is left as it was."""
    seconds = 0.0
    with _trainable(layer, keeps):
        for _ in range(2):
            start = time.perf_counter()
            _window_loss(layer, inputs, targets, 0, autocast).backward()
            if inputs.hidden.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    return seconds


def reconstruct_block(
    layer: nn.Module,
    keeps: dict[nn.Linear, torch.Tensor],
    inputs: LayerInputs,
    targets: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_steps: int | None = None,
    measure_after: bool = True,
) -> BlockResult:
    """Adam on the kept weights of `keeps` (module -> bool keep-mask), one calibration window per step, `epochs`
    passes in a seeded random order, or the first `max_steps` of those steps (a time budget, see
    `prunetune.budget`). Everything else in the layer is frozen. `measure_after=False` skips the closing pass
    over the windows (mse_after None) for a caller that runs the trained layer over them anyway."""
    gen = torch.Generator().manual_seed(seed)
    order = [j for _ in range(epochs) for j in torch.randperm(inputs.hidden.shape[0], generator=gen).tolist()]
    total = len(order) if max_steps is None else min(max_steps, len(order))
    with _trainable(layer, keeps) as masks:
        before = layer_mse(layer, inputs, targets, autocast)
        opt = torch.optim.Adam([m.weight for m in masks], lr=lr)
        for j in order[:total]:
            loss = _window_loss(layer, inputs, targets, j, autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for module, keep in masks.items():
                module.weight.grad.mul_(keep)  # pruned weights get no update ...
            opt.step()
            with torch.no_grad():
                for module, keep in masks.items():
                    module.weight.mul_(keep)  # ... and stay exactly zero whatever Adam's arithmetic does
    return BlockResult(before, layer_mse(layer, inputs, targets, autocast) if measure_after else None, total)
