"""Where tensors are computed: the default device, one definition for every command."""

from __future__ import annotations

import torch


def default_device(requested: str | None = None) -> str:
    """`requested` when given, else `cuda` when a CUDA device is visible, else `cpu`."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
