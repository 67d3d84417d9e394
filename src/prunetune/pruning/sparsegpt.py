"""SparseGPT / OBS math (Frantar & Alistarh, 2023), pure: a weight matrix and its layer-input Hessian in,
pruned-and-updated weights and the keep-mask out. Mirrors the reference `fasterprune` (block 128, 1% damping).

H = (1/n) sum_t x_t x_t^T over calibration tokens, (in, in) float32. All math is float32 whatever the model dtype.
"""

from __future__ import annotations

import torch

from prunetune.pruning.patterns import n_pruned


def hessian_update(hessian: torch.Tensor, count: int, x: torch.Tensor) -> int:
    """Fold a batch of inputs (..., in) into the running mean `hessian` in place; returns the new token count."""
    x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
    new = count + x.shape[0]
    hessian.mul_(count / new).addmm_(x.t(), x, alpha=1.0 / new)
    return new


def damped(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + percdamp * mean(diag H) * I, dead-column mask). Dead inputs (never active) get H_jj = 1 as in SparseGPT."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    return h, dead


def inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, the quantity the OBS sweep reads rows of."""
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    mask: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS pruning sweep over columns; returns (new weight in the input dtype, keep-mask).

    - `mask` given: the pattern is fixed and only the kept weights are updated (OBS under a fixed mask).
    - else `prune_n:prune_m` > 0: N:M chosen adaptively per group by saliency w^2 / [H^-1]_jj^2.
    - else unstructured: in each block of `blocksize` columns, exactly floor(sparsity * numel) weights of lowest
      saliency (the reference picks by a threshold, which can take one more on ties).
    """
    rows, cols = weight.shape
    w = weight.detach().float().clone()  # (out, in)
    h, dead = damped(hessian, percdamp)
    w[:, dead] = 0
    hinv = inverse_cholesky_upper(h)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)

        if mask is not None:
            prune1 = ~mask[:, i1:i2].to(w.device)
        elif prune_n == 0:
            saliency = (w1.pow(2) / d1.pow(2).unsqueeze(0)).flatten()
            prune1 = torch.zeros(rows * count, dtype=torch.bool, device=w.device)
            k = n_pruned(rows * count, sparsity)
            if k:
                prune1[torch.sort(saliency, stable=True).indices[:k]] = True
            prune1 = prune1.view(rows, count)
        else:
            prune1 = torch.zeros(rows, count, dtype=torch.bool, device=w.device)

        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if mask is None and prune_n != 0 and i % prune_m == 0:
                sal = w1[:, i : i + prune_m].pow(2) / d1[i : i + prune_m].pow(2).unsqueeze(0)
                prune1.scatter_(1, i + torch.sort(sal, dim=1, stable=True).indices[:, :prune_n], True)
            q = col.clone()
            q[prune1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d  # (out,)
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    w[~keep] = 0  # exact zeros regardless of float round-off in the sweep
    return w.to(weight.dtype), keep
