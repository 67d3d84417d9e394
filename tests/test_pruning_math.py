"""SparseGPT/OBS and reconstruction math on synthetic but correlated activations, against direct computations."""

import torch

from prunetune.pruning.reconstruct import (
    cg_under_mask,
    least_squares_under_mask,
    obs_under_mask,
    output_error,
)
from prunetune.pruning.scores import magnitude_scores
from prunetune.pruning.sparsegpt import damped, hessian_update, sparsegpt_prune
from prunetune.sparsity.patterns import (
    block_mask,
    nm_mask,
    parse_pattern,
    pattern_violations,
    unstructured_mask,
)


def _data(rows=32, cols=48, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Strongly correlated inputs (a few directions dominate), as in real transformer layers.
    x = torch.randn(tokens, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = x + 0.1 * torch.randn(tokens, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    h = torch.zeros(cols, cols)
    count = 0
    for chunk in x.split(64):  # streamed in batches, as the hooks see it
        count = hessian_update(h, count, chunk.unsqueeze(0))
    return w, x, h


def test_hessian_is_mean_outer_product():
    _, x, h = _data()
    torch.testing.assert_close(h, x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_sparsegpt_unstructured_sparsity_and_error_beats_magnitude():
    w, x, h = _data()
    new, keep = sparsegpt_prune(w, h, 0.5, blocksize=16)
    assert torch.equal(new == 0, ~keep) or bool((new[~keep] == 0).all())
    # exactly floor(0.5 * rows * block) per block of 16 columns
    for c in range(0, 48, 16):
        assert int((~keep[:, c : c + 16]).sum()) == 32 * 16 // 2
    naive = w * unstructured_mask(magnitude_scores(w), 0.5, "matrix")
    assert output_error(w, new, h) < output_error(w, naive, h)


def test_sparsegpt_nm_and_fixed_mask():
    w, _, h = _data()
    new, keep = sparsegpt_prune(w, h, prune_n=2, prune_m=4)
    assert pattern_violations(keep, parse_pattern("2:4")) == []
    assert (new[~keep] == 0).all()
    fixed = nm_mask(torch.rand(32, 48, generator=torch.Generator().manual_seed(5)), 2, 4)
    new, keep = sparsegpt_prune(w, h, mask=fixed)
    assert torch.equal(keep, fixed) and (new[~fixed] == 0).all()


def _exact_rowwise(w, h, keep):
    """Reference: each row solved alone, w'_S = w_S + H_SS^-1 H_SD w_D (same dampening)."""
    hd, _ = damped(h)
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s, d = torch.nonzero(keep[i]).squeeze(1), torch.nonzero(~keep[i]).squeeze(1)
        out[i, s] = w[i, s] + torch.linalg.solve(hd[s][:, s], hd[s][:, d] @ w[i, d])
    return out


def test_least_squares_equals_per_row_solution_for_block_bands():
    w, _, h = _data()
    keep = block_mask(torch.rand(32, 48, generator=torch.Generator().manual_seed(1)), 0.5, 8, 8, "band")
    torch.testing.assert_close(least_squares_under_mask(w, h, keep), _exact_rowwise(w, h, keep), rtol=1e-3, atol=1e-4)


def test_reconstruction_lowers_output_error_on_calibration_data():
    w, x, h = _data()
    for keep in (
        block_mask(magnitude_scores(w), 0.5, 8, 8, "matrix"),
        unstructured_mask(magnitude_scores(w), 0.5, "row"),
        nm_mask(magnitude_scores(w), 2, 4),
    ):
        masked = w * keep
        err_masked = ((x @ (w - masked).t()) ** 2).mean()  # measured on the activations themselves
        cg = cg_under_mask(w, h, keep)
        for new, factor in ((least_squares_under_mask(w, h, keep), 0.2), (cg, 0.2), (obs_under_mask(w, h, keep), 0.95)):
            assert (new[~keep] == 0).all()
            assert ((x @ (w - new).t()) ** 2).mean() < factor * err_masked
        # exact least squares is the optimum under the mask: no worse than the greedy OBS sweep; CG reaches it
        assert output_error(w, cg, h) <= output_error(w, least_squares_under_mask(w, h, keep), h) * 1.01
        assert output_error(w, least_squares_under_mask(w, h, keep), h) <= output_error(w, obs_under_mask(w, h, keep), h) * 1.001


def test_inputs_not_mutated_and_dtype_kept():
    w, _, h = _data()
    w16, h0 = w.to(torch.bfloat16), h.clone()
    w0 = w16.clone()
    keep = unstructured_mask(magnitude_scores(w16), 0.5, "row")
    new = obs_under_mask(w16, h, keep)
    assert new.dtype == torch.bfloat16
    assert torch.equal(w16, w0) and torch.equal(h, h0)
