"""Perplexity by the protocol of the Wanda/SparseGPT evaluation code, so numbers sit beside published tables:
the split's rows joined with "\\n\\n", tokenised once, cut into non-overlapping windows of `seqlen`
(the remainder dropped), mean token negative log-likelihood, perplexity = exp(mean)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per token (nats)."""
    tokens: int
    """Tokens in the evaluated windows (windows x seqlen)."""
    windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def windows_of(input_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(N,) -> (W, seqlen): non-overlapping windows, remainder dropped, optionally the first `max_windows`."""
    count = input_ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return input_ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on a (N,) token stream. `on_batch(done_windows, total_windows)` drives a progress bar.

    Each window's loss counts as `seqlen` tokens, exactly as Wanda's `eval_ppl` weighs it.
    """
    windows = windows_of(input_ids, seqlen, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum = 0.0
    for first in range(0, windows.shape[0], batch_size):
        batch = windows[first : first + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        # Predict token t+1 from positions <= t; float32 for the softmax even when the model runs in bf16.
        loss = nn.functional.cross_entropy(
            logits[:, :-1, :].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        nll_sum += float(loss.mean(dim=1).sum()) * seqlen
        if on_batch is not None:
            on_batch(min(first + batch_size, windows.shape[0]), windows.shape[0])
    model.train(was_training)
    seconds = time.perf_counter() - start
    tokens = windows.numel()
    mean_nll = nll_sum / tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, tokens, windows.shape[0], seconds)
