"""Measured sparsity of a model's prunable weights: overall and per linear module type."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from prunetune.architecture import module_type, prunable_linears


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum().item()) / weight.numel()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """`{"overall": f, "by_type": {"q_proj": f, ...}, "zeros": n, "total": n}` over the decoder linears."""
    zeros: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    for name, module in prunable_linears(model).items():
        kind = module_type(name)
        zeros[kind] += int((module.weight == 0).sum().item())
        totals[kind] += module.weight.numel()
    all_zeros, all_total = sum(zeros.values()), sum(totals.values())
    return {
        "overall": all_zeros / all_total if all_total else 0.0,
        "by_type": {kind: zeros[kind] / totals[kind] for kind in totals},
        "zeros": all_zeros,
        "total": all_total,
    }
