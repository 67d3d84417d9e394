"""Importance scores: pure functions of a weight matrix (and activation statistics), higher = more important.

All scores are float32 whatever the weight dtype, so ranking never suffers from bf16 rounding.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: (out, in) -> (out, in) float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, col_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||x_j||_2, where `col_sq_norms` (in,) is the sum over calibration tokens of x_j^2.

    Wanda's code keeps a running mean of the squared norms instead of the sum; a constant factor per matrix
    changes no ranking, so both give the same mask.
    """
    if col_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"col_sq_norms has shape {tuple(col_sq_norms.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().float().abs() * col_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)


def obs_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """SparseGPT/OBS saliency w_ij^2 / [H^-1]_jj^2, the error of removing one weight (used for fixed patterns)."""
    return weight.detach().float().pow(2) / hinv_diag.float().pow(2).unsqueeze(0)
