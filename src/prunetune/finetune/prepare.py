"""Preparing the pruned model for training: the training method (`FinetuneConfig.method`) decides what trains
and which callbacks keep the sparsity; the check afterwards asserts that every pruned weight is still zero.

`prepare_model(model, cfg, masks) -> Prepared` is the one place the engine makes the model trainable (the
methods themselves live in `prunetune.finetune.methods`); the method's callbacks join the Trainer's
(re-masking in `on_optimizer_step`), its banner the `lora` record.
"""

from __future__ import annotations

import torch
from torch import nn

from prunetune.architecture import module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.finetune import methods
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.methods import Prepared

__all__ = ["Prepared", "lora_config", "prepare_model", "sparsity_violations"]


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

    `lora`: PEFT LoRA, base frozen, dense update; `masked-lora`: the update masked by the keep-mask in the
    forward; `sparse-ft`: the kept weights train, gradients masked, weights re-masked after every step.
    """
    lora = None if cfg.method == "sparse-ft" else lora_config(model, cfg)
    return methods.prepare(model, cfg.method, masks, lora_config=lora, sparse_targets=cfg.sparse_ft_targets)


@torch.no_grad()
def sparsity_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Names of the base matrices with a non-zero weight at a masked (pruned) position.

    Works on the PEFT-wrapped model too (`...q_proj.base_layer` is checked against the mask of `q_proj`);
    a mask that matches no module of the model is a bug, never a silently skipped check.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    bad, checked = [], 0
    for name, module in prunable_linears(base).items():
        mask = masks.get(name.removesuffix(".base_layer"))
        if mask is None or ".lora_" in name:
            continue
        checked += 1
        if bool((module.weight.detach().cpu()[~mask] != 0).any()):
            bad.append(name.removesuffix(".base_layer"))
    if checked != len(masks):
        raise RuntimeError(f"the sparsity check matched {checked} of {len(masks)} masked matrices: "
                           "this is a bug in prunetune")
    return bad
