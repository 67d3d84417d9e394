"""One matrix: scores -> keep-mask -> (updated) weights. Pure: tensors and a typed recipe in, tensors out.

The recipe is built once per run from `PruneConfig` (pattern parsed once); the engine calls `prune_matrix`
for every linear module with that module's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunetune.pruning.reconstruct import reconstruct
from prunetune.pruning.scores import magnitude_scores, obs_saliency, wanda_scores
from prunetune.pruning.sparsegpt import HessianFactors, sparsegpt_prune
from prunetune.sparsity.patterns import Pattern, make_mask


@dataclass(frozen=True)
class MatrixRecipe:
    """How every matrix of a run is pruned: the typed subset of `PruneConfig` the math needs."""

    method: str
    """wanda | magnitude | sparsegpt."""
    pattern: Pattern
    """Parsed once per run."""
    compare: str
    """Resolved comparison group: row | matrix | band | group | obs."""
    reconstruct: bool = False
    """Least-squares update of the kept weights after the mask is chosen."""
    percdamp: float = 0.01
    """Hessian dampening, fraction of the mean diagonal (SparseGPT: 1%)."""
    blocksize: int = 128
    """Columns per OBS block (SparseGPT: 128)."""


def prune_matrix(
    weight: torch.Tensor,
    recipe: MatrixRecipe,
    target: float,
    col_sq_norms: torch.Tensor | None = None,
    factors: HessianFactors | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep-mask) for one (out, in) matrix at sparsity `target`.

    `col_sq_norms` (in,) feeds Wanda; `factors` (the damped layer-input Hessian, shared by every module that
    reads the same input) feeds SparseGPT and reconstruction. Both are float32 whatever the model dtype.
    """
    if recipe.method == "sparsegpt":
        new, keep = _sparsegpt(weight, recipe, target, factors)
    else:
        scores = wanda_scores(weight, col_sq_norms) if recipe.method == "wanda" else magnitude_scores(weight)
        keep = make_mask(scores, recipe.pattern.at(target), target, recipe.compare)
        new = weight * keep
    if recipe.reconstruct:
        # From the dense weights: exact per-band least squares for blocks, converged CG for the rest.
        method = "least_squares" if recipe.pattern.kind == "block" else "cg"
        new = reconstruct(weight, factors.hessian, keep, method, recipe.percdamp, factors=factors)
    return new, keep


def _sparsegpt(
    weight: torch.Tensor, recipe: MatrixRecipe, target: float, factors: HessianFactors
) -> tuple[torch.Tensor, torch.Tensor]:
    pattern = recipe.pattern.at(target)
    if recipe.compare == "obs":  # SparseGPT's adaptive mask selection inside the sweep
        return sparsegpt_prune(weight, factors.hessian, target, pattern.n, pattern.m, blocksize=recipe.blocksize,
                               percdamp=recipe.percdamp, factors=factors)
    # A fixed pattern ranked by OBS saliency, then SparseGPT's update under it.
    keep = make_mask(obs_saliency(weight, torch.diag(factors.hinv_upper)), pattern, target, recipe.compare)
    return reconstruct(weight, factors.hessian, keep, "obs", recipe.percdamp, factors=factors), keep
