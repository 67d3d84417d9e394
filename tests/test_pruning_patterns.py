"""Pure scores and patterns against direct formulas and invariants."""

import math

import pytest
import torch

from prunetune.pruning.scores import magnitude_scores, wanda_scores
from prunetune.sparsity.patterns import (
    block_mask,
    make_mask,
    n_pruned,
    nm_mask,
    parse_pattern,
    pattern_violations,
    sparsity_tolerance,
    tile_sums,
    unstructured_mask,
)


def _scores(rows=24, cols=40, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_scores_match_direct_formulas():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = torch.randn(100, 7, generator=torch.Generator().manual_seed(2))
    sq = (x**2).sum(0)
    assert torch.equal(magnitude_scores(w), w.float().abs())
    expected = torch.tensor([[abs(float(w[i, j])) * math.sqrt(float(sq[j])) for j in range(7)] for i in range(5)])
    torch.testing.assert_close(wanda_scores(w, sq), expected)
    assert wanda_scores(w, sq).dtype == torch.float32
    with pytest.raises(ValueError):
        wanda_scores(w, sq[:3])


def test_unstructured_per_row_prunes_lowest_of_each_row():
    s = _scores()
    keep = unstructured_mask(s, 0.3, "row")
    k = n_pruned(40, 0.3)
    assert ((~keep).sum(1) == k).all()
    for i in range(s.shape[0]):  # the pruned are exactly the k lowest of the row
        assert set(torch.argsort(s[i])[:k].tolist()) == set(torch.nonzero(~keep[i]).squeeze(1).tolist())


def test_unstructured_per_matrix_threshold():
    s = _scores()
    keep = unstructured_mask(s, 0.5, "matrix")
    assert int((~keep).sum()) == s.numel() // 2
    assert s[~keep].max() <= s[keep].min()
    assert not ((~keep).sum(1) == 20).all()  # rows differ: it really compared across the matrix


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_exactly_n_zeros_per_group(n, m):
    s = _scores(16, 64)
    keep = nm_mask(s, n, m)
    zeros = (~keep).view(16, 64 // m, m).sum(-1)
    assert (zeros == n).all()
    grouped_s, grouped_k = s.view(16, -1, m), keep.view(16, -1, m)
    # every pruned weight scores no higher than every kept one in its group
    pruned_max = torch.where(~grouped_k, grouped_s, torch.tensor(-1.0)).amax(-1)
    kept_min = torch.where(grouped_k, grouped_s, torch.tensor(2.0)).amin(-1)
    assert (pruned_max <= kept_min).all()
    assert pattern_violations(keep, parse_pattern(f"{n}:{m}")) == []


def _stable_sort_reference(scores, k):
    """The mask a stable sort gives: the k lowest of each row, ties pruned in position order."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], False)
    return keep


@pytest.mark.parametrize("kind", ["ties", "continuous", "zeros", "inf", "nan"])
def test_masks_prune_ties_by_position_like_a_stable_sort(kind):
    """Quantised weights (GGUF) and magnitude scores tie a lot: the selection must prune exactly what a stable
    sort prunes, for every k, per row, per N:M group and per matrix."""
    g = torch.Generator().manual_seed(3)
    scores = {"ties": torch.randint(0, 3, (9, 16), generator=g).float(),
              "continuous": torch.rand(9, 16, generator=g),
              "zeros": torch.rand(9, 16, generator=g) * torch.randint(0, 2, (9, 16), generator=g)}.get(kind)
    if scores is None:
        scores = torch.randint(0, 3, (9, 16), generator=g).float()
        scores[::2, 3] = float("inf") if kind == "inf" else float("nan")
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9):
        k = n_pruned(16, sparsity)
        assert torch.equal(unstructured_mask(scores, sparsity, "row"), _stable_sort_reference(scores, k))
        assert torch.equal(unstructured_mask(scores, sparsity, "matrix"),
                           _stable_sort_reference(scores.reshape(1, -1), n_pruned(scores.numel(), sparsity))
                           .view(scores.shape))
    for n, m in ((1, 4), (2, 4), (3, 4), (4, 8)):
        assert torch.equal(nm_mask(scores, n, m),
                           _stable_sort_reference(scores.reshape(9, 16 // m, m), n).view(9, 16))


def test_parse_pattern_conventions():
    p = parse_pattern("2:4")
    assert (p.kind, p.n, p.m, p.fixed_sparsity) == ("nm", 2, 4, 0.5)
    assert parse_pattern("block16x8").h == 16 and parse_pattern("block16x8").w == 8
    assert parse_pattern("unstructured").kind == "unstructured"
    for bad in ("4:4", "5:4", "0:4", "block0x4", "blocky", "dense"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("shape", [(64, 64), (50, 37), (17, 100)])
@pytest.mark.parametrize("compare", ["matrix", "band"])
def test_block_tiles_whole_and_sparsity_within_one_tile(shape, compare):
    s = _scores(*shape, seed=3)
    h, w = 8, 8
    keep = block_mask(s, 0.5, h, w, compare)
    assert keep.shape == s.shape
    kept = tile_sums(keep.int(), h, w)
    areas = tile_sums(torch.ones(shape, dtype=torch.int32), h, w)
    assert ((kept == 0) | (kept == areas)).all()  # every tile all-zero or all-kept, edge tiles included
    pattern = parse_pattern(f"block{h}x{w}")
    achieved = 1 - keep.float().mean().item()
    assert abs(achieved - 0.5) <= sparsity_tolerance(shape, pattern, compare)
    if compare == "matrix":
        assert abs(achieved - 0.5) <= h * w / s.numel()
    else:  # each band of h rows hits the target up to one tile
        for r in range(0, shape[0], h):
            band = keep[r : r + h]
            assert abs((1 - band.float().mean().item()) - 0.5) <= h * w / band.numel() + 1e-9


def test_block_ranks_by_tile_sum_and_partial_tiles_by_mean():
    s = torch.ones(16, 12)
    s[:8, :8] = 0.1  # the lowest full tile
    s[8:, 8:] = 0.2  # a partial 8x4 edge tile: low mean, small sum
    # Ranked by mean: tile (0,0) [0.1, 64 weights], then the 8x4 edge tile (1,1) [0.2, 32 weights].
    keep = block_mask(s, 0.25, 8, 8, "matrix")  # target 48: pruning one tile (64) is closest
    assert not keep[:8, :8].any() and keep[8:, 8:].all()
    keep = block_mask(s, 0.5, 8, 8, "matrix")  # target 96 = 64 + 32: both
    assert not keep[:8, :8].any() and not keep[8:, 8:].any() and keep[:8, 8:].all() and keep[8:, :8].all()


def test_make_mask_dispatch_and_bad_compare():
    s = _scores()
    assert torch.equal(make_mask(s, parse_pattern("unstructured"), 0.5, "row"), unstructured_mask(s, 0.5, "row"))
    with pytest.raises(ValueError):
        unstructured_mask(s, 0.5, "band")
    with pytest.raises(ValueError):
        block_mask(s, 0.5, 4, 4, "row")
    with pytest.raises(ValueError):
        unstructured_mask(s, 1.0, "row")
    with pytest.raises(ValueError):
        nm_mask(_scores(4, 10), 2, 4)


def test_violations_detect_partial_tiles_and_wrong_groups():
    keep = block_mask(_scores(32, 32), 0.5, 8, 8, "matrix").clone()
    keep[0, 0] = ~keep[0, 0]
    assert pattern_violations(keep, parse_pattern("block8x8"))
    nm = nm_mask(_scores(8, 16), 2, 4).clone()
    nm[0, 0] = ~nm[0, 0]
    assert pattern_violations(nm, parse_pattern("2:4"))
