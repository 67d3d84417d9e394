"""In which precision `prune` keeps the weights and runs its calibration forward passes (issue 13).

- `compute`: the dtype of the calibration forward passes (capture, every layer's forward, the perplexity
  checks), from `devices.resolve_dtype(cfg.dtype or "auto", device, "calibration")`.
- `storage`: the dtype the model is loaded, pruned and saved in. An explicit `--dtype` sets both. With `auto`
  on CPU the weights stay float32 (the dense checkpoint's precision is kept in the saved model) and the
  forward passes run under bf16 autocast where the CPU has native bf16; on CUDA both are the resolved dtype,
  so a 7B model is held in bf16 (half the host memory).
- Always float32, whatever is chosen here: the activation statistics and Hessians (`calibration.InputStats`
  runs its hooks with autocast off), scores (`scores.py`: ranking ties from bf16 rounding would change the
  masks, and scoring is O(out*in), nothing to gain), and all of reconstruction and SparseGPT
  (`reconstruct.py`, `sparsegpt.py`: Cholesky factorisations of X^T X lose rank in bf16).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from prunetune.devices import DTYPE_NAMES, dtype_name, resolve_dtype
from prunetune.errors import UserError


@dataclass(frozen=True)
class Precision:
    storage: torch.dtype
    compute: torch.dtype
    reason: str
    device: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every calibration forward pass runs in (a no-op when compute == storage)."""
        if self.compute == self.storage:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.compute)

    def record(self) -> dict[str, str]:
        return {"storage": dtype_name(self.storage), "compute": dtype_name(self.compute), "reason": self.reason}

    def describe(self) -> str:
        if self.compute == self.storage:
            return self.reason
        return f"{self.reason}; weights kept in {dtype_name(self.storage)}, forward passes under autocast"


def check_dtype_name(name: str | None) -> None:
    """UserError for a `--dtype` that is neither auto nor a known dtype (validated before any work)."""
    if name not in (None, "auto") and name not in DTYPE_NAMES:
        raise UserError(f"unknown --dtype {name!r}; choose auto, float32, bfloat16 or float16")


def resolve_precision(requested: str | None, device: str) -> Precision:
    compute, reason = resolve_dtype(requested or "auto", device, "calibration")
    explicit = requested not in (None, "auto")
    storage = compute if explicit or torch.device(device).type == "cuda" else torch.float32
    return Precision(storage, compute, reason, device)
