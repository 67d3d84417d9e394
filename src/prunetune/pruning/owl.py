"""OWL: non-uniform per-layer sparsity for the same overall target (Yin et al., 2023, "Outlier Weighed Layerwise
Sparsity"). Pure functions; the engine gathers the statistics.

Per decoder layer l, the outlier ratio D_l is the fraction of the layer's Wanda scores |W_ij| * ||x_j|| that
exceed M times their mean (M = 5..7 in the paper). Layers with more outliers keep more weights: the densities
1 - s_l are spread linearly in D_l over [-lambda, +lambda] (lambda ~ 0.08), then centred so that the overall
sparsity is the requested one. Here the centring is weighted by each layer's parameter count (OWL's code takes
a plain mean, which is the same only when every layer has the same size), and a per-module sparsity map is
kept: each module's own target moves by its layer's offset.

Rounding: a layer's offset becomes a multiple of the coarsest step its pattern can take (one weight per row
for row-wise unstructured, one tile per matrix or per band for blocks, one zero per group of M for N:M, where
an offset therefore becomes a per-layer N: 4:8 turns into 3:8 / 4:8 / 5:8 layers; 2:4 steps by 0.25 and so
stays uniform at lambda 0.08). The rounding keeps the parameter-weighted sum of offsets as close to zero as the
steps allow, so the overall target is the requested one up to one step of one layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prunetune.sparsity.patterns import Pattern


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of all scores (the layer's matrices together) above `m` times their mean."""
    numel = sum(s.numel() for s in scores)
    mean = sum(float(s.float().sum()) for s in scores) / numel
    return sum(int((s.float() > m * mean).sum()) for s in scores) / numel  # no concatenated copy of the layer


def density_offsets(ratios: Sequence[float], lam: float) -> list[float]:
    """OWL's raw spread: linear in the outlier ratio over [-lam, +lam] (unweighted centring; see `layer_offsets`)."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [0.0] * len(ratios)
    return [(r - lo) / (hi - lo) * 2 * lam - lam for r in ratios]


def step_of(shape: tuple[int, int], pattern: Pattern, compare: str) -> float:
    """The smallest sparsity change the pattern can make in one matrix of `shape` (out, in)."""
    rows, cols = shape
    if pattern.kind == "nm":
        return 1.0 / pattern.m
    if pattern.kind == "block":
        return pattern.w / cols if compare == "band" else pattern.h * pattern.w / (rows * cols)
    return 1.0 / cols if compare == "row" else 1.0 / (rows * cols)


def layer_offsets(ratios: Sequence[float], params: Sequence[int], steps: Sequence[float], lam: float,
                  bounds: Sequence[tuple[float, float]] | None = None) -> list[float]:
    """Sparsity offset per layer: minus OWL's density offset, centred by parameter count, each a multiple of its
    layer's `steps[l]`, with the weighted sum kept as close to zero as the steps allow.

    `bounds[l]` = (lowest, highest) offset layer l can take (its targets must stay what the pattern can hold,
    e.g. below 0.99); each contains 0. A layer OWL would push past a bound stops there and the other layers
    take up the difference (one shift for all, found by bisection), so the overall target is kept for any
    lambda: a large lambda near the ends of the range spreads less, it never fails."""
    raw = wanted_offsets(ratios, params, lam)
    if bounds is not None:
        raw = _balanced_clip(raw, params, bounds)
    lo_units = [-math.inf] * len(raw) if bounds is None else [math.ceil(lo / st - 1e-9) for (lo, _), st in
                                                             zip(bounds, steps, strict=True)]
    hi_units = [math.inf] * len(raw) if bounds is None else [math.floor(hi / st + 1e-9) for (_, hi), st in
                                                            zip(bounds, steps, strict=True)]
    units = [int(min(max(round(r / st), lo), hi)) for r, st, lo, hi in zip(raw, steps, lo_units, hi_units, strict=True)]
    # Largest-remainder repair: move single steps where rounding lost most until the weighted sum is balanced.
    for _ in range(4 * len(units) + 8):
        residual = sum(u * st * p for u, st, p in zip(units, steps, params, strict=True))
        if residual == 0:
            break
        move = -int(math.copysign(1, residual))
        movable = [i for i in range(len(units)) if lo_units[i] <= units[i] + move <= hi_units[i]]
        if not movable:
            break
        best = min(movable, key=lambda i: abs(residual + move * steps[i] * params[i]))
        if abs(residual + move * steps[best] * params[best]) >= abs(residual):
            break
        units[best] += move
    return [u * st for u, st in zip(units, steps, strict=True)]


def wanted_offsets(ratios: Sequence[float], params: Sequence[int], lam: float) -> list[float]:
    """OWL's sparsity offsets before bounds and rounding: minus the density offsets, centred by parameter count."""
    dens = density_offsets(ratios, lam)
    mean = sum(d * p for d, p in zip(dens, params, strict=True)) / float(sum(params))
    return [-(d - mean) for d in dens]


def _balanced_clip(raw: Sequence[float], params: Sequence[int], bounds: Sequence[tuple[float, float]]) -> list[float]:
    """clip(raw_l + mu, lo_l, hi_l) with the one shift mu that keeps the parameter-weighted sum at zero (the sum is
    monotone in mu and spans zero, since every range holds 0)."""
    def clipped(mu: float) -> list[float]:
        return [min(max(r + mu, lo), hi) for r, (lo, hi) in zip(raw, bounds, strict=True)]

    def weighted(mu: float) -> float:
        return sum(o * p for o, p in zip(clipped(mu), params, strict=True))

    low, high = -2.0, 2.0
    for _ in range(80):
        mid = (low + high) / 2
        if weighted(mid) > 0:
            high = mid
        else:
            low = mid
    return clipped((low + high) / 2)


def target_range(pattern: Pattern) -> tuple[float, float]:
    """The per-module targets OWL may give a pattern: N:M keeps 1..M-1 zeros per group; others stay in [0, 0.99]."""
    if pattern.kind == "nm":
        return 1 / pattern.m, (pattern.m - 1) / pattern.m
    return 0.0, 0.99


def clamp_target(target: float, pattern: Pattern) -> float:
    """A per-module target the pattern can hold (`target_range`), N:M rounded to whole zeros per group."""
    lo, hi = target_range(pattern)
    if pattern.kind == "nm":
        return min(max(round(target * pattern.m), 1), pattern.m - 1) / pattern.m
    return min(max(target, lo), hi)
