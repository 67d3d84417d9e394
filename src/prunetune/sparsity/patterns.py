"""Sparsity patterns: pure functions from a score matrix (out, in) to a bool keep-mask (True = kept).

Conventions
- `N:M` (Wanda's and NVIDIA's): exactly N of every M consecutive weights along the input dimension are
  ZERO. "2:4" keeps 2 of every 4; "4:8" keeps 4 of every 8. Sparsity is N/M.
- Counts round down as Wanda's code does: a group of n weights at sparsity s loses floor(s * n) weights.
- Ties are broken by position (stable sort), so the same scores always give the same mask.
- `blockHxW`: the matrix is cut into H-row x W-column tiles; a tile is pruned or kept whole. Edge tiles of
  matrices whose dimensions are not multiples of the block are smaller; they are ranked by their MEAN score
  times the full tile area (so a partial tile is neither favoured nor penalised for its size) and count their
  true area toward the target. The number of pruned tiles is the one whose total area is closest to the
  target, so achieved sparsity equals the target up to one tile per comparison group.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

PatternKind = Literal["unstructured", "nm", "block"]
COMPARE_CHOICES = ("row", "matrix", "band", "obs")
"""`row`: each output row keeps the same fraction (Wanda's default); `matrix`: one ranking per matrix
(magnitude's default, and blocks as in the block-Wanda research code); `band`: blocks ranked within each band
of H rows; `obs`: SparseGPT's own adaptive choice per 128-column block during the OBS sweep."""

_BLOCK = re.compile(r"^block(\d+)x(\d+)$")
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """A parsed `--pattern` string."""

    kind: PatternKind
    n: int = 0
    """N:M: zeros per group."""
    m: int = 0
    """N:M: group size along the input dimension."""
    h: int = 0
    """Block: tile height (output rows)."""
    w: int = 0
    """Block: tile width (input columns)."""

    @property
    def name(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.h}x{self.w}"
        return "unstructured"

    def at(self, sparsity: float) -> Pattern:
        """The pattern of one matrix pruned to `sparsity`: N:M with N = sparsity * M (OWL can give a layer its own
        N, e.g. 3:8 in a 4:8 run); the other kinds are the same at every sparsity."""
        if self.kind != "nm":
            return self
        return Pattern("nm", n=round(sparsity * self.m), m=self.m)

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity at N/M; the other patterns take it from `--sparsity`."""
        return self.n / self.m if self.kind == "nm" else None


def parse_pattern(text: str) -> Pattern:
    """`unstructured` | `N:M` | `blockHxW`; ValueError with the valid forms otherwise."""
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    if found := _NM.match(text):
        n, m = int(found[1]), int(found[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M (N zeros in every M weights), e.g. 2:4")
        return Pattern("nm", n=n, m=m)
    if found := _BLOCK.match(text):
        h, w = int(found[1]), int(found[2])
        if h < 1 or w < 1:
            raise ValueError(f"pattern {text!r}: block sides must be >= 1, e.g. block16x16")
        return Pattern("block", h=h, w=w)
    raise ValueError(f"unknown pattern {text!r}; use unstructured, N:M (e.g. 2:4 = 2 zeros per 4), or blockHxW (e.g. block16x16)")


def n_pruned(count: int, sparsity: float) -> int:
    """Weights to prune in a group of `count` (floor, as Wanda's code)."""
    return int(math.floor(count * sparsity + 1e-9))


def _lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim pruning exactly the k lowest scores of each row; among scores equal to the
    k-th lowest, the first ones by position go (what a stable sort would prune).

    A selection, not a sort: the k-th value per row, everything below it, and the ties at it by position. The
    same mask as `torch.sort(stable=True)[:k]` at ~0.4x its time on CPU for rows of hundreds of weights (a
    layer's masks were ~15% of a sequential Wanda prune in bf16). Short groups (N:M) are sorted, which is faster
    there; so are rows holding NaN, which has no order to select by.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= scores.shape[-1]:
        return ~keep
    if scores.shape[-1] <= 16 or bool(scores.isnan().any()):  # N:M groups: sorting a few values is faster
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        return keep.scatter_(-1, order, False)
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < kth
    at = scores == kth
    room = k - below.sum(-1, keepdim=True)  # how many of the tied scores still go, per row
    return ~(below | (at & (at.cumsum(-1) <= room)))


def unstructured_mask(scores: torch.Tensor, sparsity: float, compare: str = "row") -> torch.Tensor:
    """Prune the lowest-scoring floor(sparsity * n) weights per output row (`row`) or per matrix (`matrix`)."""
    _check_sparsity(sparsity)
    if compare == "row":
        return _lowest_k_mask(scores, n_pruned(scores.shape[1], sparsity))
    if compare == "matrix":
        return _lowest_k_mask(scores.reshape(1, -1), n_pruned(scores.numel(), sparsity)).view(scores.shape)
    raise ValueError(f"compare {compare!r} does not apply to unstructured; use row or matrix")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Exactly `n` zeros in every group of `m` consecutive input columns; in_features must divide by m."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns do not divide into groups of {m}")
    grouped = scores.reshape(rows, cols // m, m)
    return _lowest_k_mask(grouped, n).view(rows, cols)


def tile_grid(shape: tuple[int, int], h: int, w: int) -> tuple[int, int]:
    """(tile rows, tile cols), counting partial edge tiles."""
    return math.ceil(shape[0] / h), math.ceil(shape[1] / w)


def tile_sums(values: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(out, in) -> (R, C): the sum of each HxW tile; edge tiles sum what they hold."""
    rows, cols = values.shape
    r, c = tile_grid((rows, cols), h, w)
    padded = torch.nn.functional.pad(values, (0, c * w - cols, 0, r * h - rows))
    return padded.reshape(r, h, c, w).sum(dim=(1, 3))


def expand_tiles(tile_keep: torch.Tensor, shape: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """(R, C) tile mask -> (out, in) element mask, cropped to `shape`."""
    full = tile_keep.repeat_interleave(h, dim=0).repeat_interleave(w, dim=1)
    return full[: shape[0], : shape[1]].contiguous()


def _prune_tiles(tile_scores: torch.Tensor, areas: torch.Tensor, target: int) -> torch.Tensor:
    """Keep-mask over a 1-D group of tiles: prune lowest first, as many as bring the pruned area closest to `target`."""
    order = torch.sort(tile_scores, stable=True).indices
    cum = torch.cat([areas.new_zeros(1), torch.cumsum(areas[order], 0)])  # pruned area after t tiles
    t = int(torch.argmin((cum - target).abs()))  # first minimum: never overshoots on a tie
    keep = torch.ones_like(tile_scores, dtype=torch.bool)
    keep[order[:t]] = False
    return keep


def block_mask(scores: torch.Tensor, sparsity: float, h: int, w: int, compare: str = "matrix") -> torch.Tensor:
    """Whole HxW tiles pruned, ranked by summed score (mean x full area for edge tiles); per `matrix` or `band`."""
    shape = (scores.shape[0], scores.shape[1])
    return expand_tiles(tile_keep(tile_sums(scores.float(), h, w), shape, sparsity, h, w, compare), shape, h, w)


def tile_keep(sums: torch.Tensor, shape: tuple[int, int], sparsity: float, h: int, w: int,
              compare: str = "matrix") -> torch.Tensor:
    """(R, C) tile keep-mask of a (out, in) matrix of `shape` from its tile score sums (`tile_sums`): the
    selection `block_mask` makes, for callers that work on tiles only (the channel permutation search)."""
    _check_sparsity(sparsity)
    areas = tile_sums(torch.ones(shape, dtype=torch.float64), h, w).to(torch.long)  # (R, C) elements per tile
    ranked = sums.float() / areas.float() * (h * w)
    if compare == "matrix":
        return _prune_tiles(ranked.flatten(), areas.flatten(), n_pruned(shape[0] * shape[1], sparsity)).view(ranked.shape)
    if compare == "band":
        return torch.stack([
            _prune_tiles(ranked[i], areas[i], n_pruned(int(areas[i].sum()), sparsity)) for i in range(ranked.shape[0])
        ])
    raise ValueError(f"compare {compare!r} does not apply to block patterns; use matrix or band")


def make_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, compare: str) -> torch.Tensor:
    """Dispatch on the pattern; `sparsity` is ignored for N:M (it is N/M)."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(scores, sparsity, pattern.h, pattern.w, compare)
    return unstructured_mask(scores, sparsity, compare)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")


# ---- checks: used after pruning (asserted) and by `prunetune verify` ----

def comparison_groups(shape: tuple[int, int], pattern: Pattern, compare: str) -> int:
    """How many independent rankings a matrix had; each may round by up to one unit (weight or tile)."""
    if pattern.kind == "block":
        return tile_grid(shape, pattern.h, pattern.w)[0] if compare == "band" else 1
    if compare == "row":
        return shape[0]
    if compare == "obs":
        return math.ceil(shape[1] / 128)
    return 1


def sparsity_tolerance(shape: tuple[int, int], pattern: Pattern, compare: str) -> float:
    """Largest |achieved - target| that rounding can explain, as a fraction of the matrix."""
    numel = shape[0] * shape[1]
    if pattern.kind == "nm":
        return 0.0
    unit = pattern.h * pattern.w if pattern.kind == "block" else 1
    return comparison_groups(shape, pattern, compare) * unit / numel


def pattern_violations(keep: torch.Tensor, pattern: Pattern) -> list[str]:
    """Structural violations of a keep-mask (empty list = the mask has the pattern)."""
    if pattern.kind == "nm":
        rows, cols = keep.shape
        if cols % pattern.m:
            return [f"{cols} columns are not a multiple of M={pattern.m}"]
        zeros = (~keep).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        bad = int((zeros != pattern.n).sum())
        return [f"{bad} groups of {pattern.m} do not have exactly {pattern.n} zeros"] if bad else []
    if pattern.kind == "block":
        kept = tile_sums(keep.to(torch.int32), pattern.h, pattern.w)
        areas = tile_sums(torch.ones(keep.shape, dtype=torch.int32), pattern.h, pattern.w)
        bad = int(((kept != 0) & (kept != areas)).sum())
        return [f"{bad} tiles of {pattern.h}x{pattern.w} are partly pruned"] if bad else []
    return []


def matrix_violations(weight: torch.Tensor, keep: torch.Tensor, pattern: Pattern, target: float, compare: str) -> list[str]:
    """Violations of one pruned matrix: weights outside the mask, pattern structure, achieved vs target."""
    if tuple(keep.shape) != tuple(weight.shape):
        return [f"mask shape {tuple(keep.shape)} != weight shape {tuple(weight.shape)}"]
    keep = keep.cpu()
    problems = []
    leaked = int((weight.detach().cpu()[~keep] != 0).sum())
    if leaked:
        problems.append(f"{leaked} pruned weights are non-zero")
    problems += pattern_violations(keep, pattern)
    achieved = 1.0 - float(keep.float().mean())
    tol = sparsity_tolerance((keep.shape[0], keep.shape[1]), pattern, compare)
    if abs(achieved - target) > tol + 1e-9:
        problems.append(f"achieved sparsity {achieved:.4f} is not the target {target:.4f} (tolerance {tol:.4f})")
    return problems
