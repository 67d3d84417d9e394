"""The per-step finite-weights check that stops a diverged run."""

from __future__ import annotations

import torch
from torch import nn

from prunetune.finetune.callbacks import trainable_finite


def test_trainable_finite_checks_only_trainable_weights_and_only_real_nonfinite_values():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    assert trainable_finite(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen base weights are not the adapter's business
    assert trainable_finite(model)
    with torch.no_grad():
        model[1].weight[0, 0] = 1e30  # the fused norm overflows, yet every weight is finite
    assert trainable_finite(model)
    with torch.no_grad():
        model[1].bias[2] = float("-inf")
    assert not trainable_finite(model)
