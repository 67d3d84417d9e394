"""The training precision of a run: `--bf16` / `--fp16` when given, else `--dtype` (`auto`: bf16 autocast where
the device computes bf16 natively, float32 elsewhere; `prunetune.devices.resolve_dtype` decides and says why).

What stays float32 and why: the trainable parameters and the optimizer state (AdamW moments in bf16 lose the
small updates a recovery run is made of), and the loss (the Trainer's causal-LM loss upcasts the logits before
the log-softmax). bf16 is autocast on the forward pass; the frozen base of a LoRA method is also loaded in
half precision (it never receives updates), on CUDA and CPU alike; a method that trains the base weights
(`trains_base`, e.g. sparse-ft) keeps them float32 and autocast casts them per matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prunetune.devices import resolve_dtype
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig
from prunetune.recovery import registry as recovery_methods


@dataclass(frozen=True)
class Precision:
    name: str
    """fp32 | bf16 | fp16: the Trainer's mixed-precision mode."""
    reason: str
    """Why this precision, for the banner and run_config.json."""
    load_dtype: torch.dtype
    """The dtype the base model is loaded in."""
    teacher_dtype: torch.dtype = torch.float32
    """The dense teacher's dtype: frozen and forward-only, so half precision on CUDA (a 7B teacher: 13.5 GB
    instead of 27) and bf16 on a CPU training in bf16; float32 otherwise."""

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        return self.name == "fp16"

    def to_record(self) -> dict[str, Any]:
        return {"precision": self.name, "reason": self.reason,
                "load_dtype": str(self.load_dtype).removeprefix("torch."),
                "teacher_dtype": str(self.teacher_dtype).removeprefix("torch.")}


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_precision(cfg: FinetuneConfig, device: str) -> Precision:
    if cfg.fp16 and device == "cpu":
        raise UserError("--fp16 needs a CUDA GPU (loss scaling for float16); on CPU use --bf16")
    if cfg.bf16:
        name, reason = "bf16", "bf16: requested (--bf16)"
    elif cfg.fp16:
        name, reason = "fp16", "fp16: requested (--fp16)"
    else:
        dtype, reason = resolve_dtype(cfg.dtype, device, "train")
        name = _NAMES[dtype]
        if name == "fp16" and device == "cpu":
            raise UserError("--dtype float16 needs a CUDA GPU (loss scaling); on CPU use --dtype bfloat16")
    load_dtype = torch.float32
    if name != "fp32" and not recovery_methods.get(cfg.method).trains_base:  # a trained base: fp32 master weights
        # The frozen base in half precision, adapters stay float32: on CUDA and on a bf16 CPU alike, autocast
        # then has no float32 base matrix to cast at every forward and backward.
        load_dtype = torch.bfloat16 if name == "bf16" else torch.float16
    teacher = torch.float32
    if device == "cuda":
        teacher = torch.float16 if name == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    elif name == "bf16":
        teacher = torch.bfloat16  # forward-only: bf16 weights save autocast's cast of every matrix at every step
    return Precision(name, reason, load_dtype, teacher)
