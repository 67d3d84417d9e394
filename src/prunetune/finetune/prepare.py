"""Preparing the pruned model for training: the training method (`FinetuneConfig.method`) decides what trains
and which callbacks keep the sparsity; the check afterwards asserts that every pruned weight is still zero.

Extension point for recovery methods: `prepare_model(model, cfg, masks) -> Prepared` is the one place the
engine makes the model trainable; the method's callbacks join the Trainer's, its banner the `lora` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from prunetune.architecture import module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig


@dataclass
class Prepared:
    """A model ready for the Trainer, and what the method adds to the one training loop."""

    model: nn.Module
    method: str
    callbacks: list[TrainerCallback] = field(default_factory=list)
    """E.g. re-masking in `on_optimizer_step` (after `optimizer.step()`, before `zero_grad`)."""
    banner: dict[str, Any] = field(default_factory=dict)
    """What trains and what it costs, for the `lora` record (trainable params, optimizer-state bytes)."""


def lora_config(model: nn.Module, cfg: FinetuneConfig):
    """The PEFT LoraConfig of `cfg`, its target module types checked against `model`."""
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if cfg.lora_targets == ("all-linear",) else list(cfg.lora_targets)
    available = sorted({module_type(name) for name in prunable_linears(model)})
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise UserError(
                f"--lora-targets {','.join(unknown)} not found in this model; choose from: {', '.join(available)} "
                "or all-linear"
            )
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def prepare_model(model: nn.Module, cfg: FinetuneConfig, masks: dict[str, torch.Tensor]) -> Prepared:
    """The model of `cfg.method`, ready to train (seed the RNG first: adapter inits draw from it).

    `lora`: PEFT LoRA on `cfg.lora_targets`; the frozen base keeps its zeros, the adapter's update is dense.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, cfg))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return Prepared(peft_model, cfg.method, [], {"method": cfg.method, "trainable": trainable})


@torch.no_grad()
def sparsity_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Names of the base matrices with a non-zero weight at a masked (pruned) position."""
    bad = []
    for name, module in prunable_linears(model).items():
        mask = masks.get(name)
        if mask is not None and bool((module.weight.detach().cpu()[~mask] != 0).any()):
            bad.append(name)
    return bad
