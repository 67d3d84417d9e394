"""Perplexity, measured: the protocol of the Wanda/SparseGPT evaluation code, so numbers sit beside published
tables. A token stream cut into non-overlapping windows of `seqlen` (the remainder dropped), mean token negative
log-likelihood in float32, perplexity = exp(mean). Every command that reports a perplexity (prune, finetune's
baseline via the same windows, merge, evaluate, the benchmarks) measures it here; `prunetune.evaluate` is the
command around it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.data import windows_of
from prunetune.devices import free_memory

# Largest automatic batch on CPU; BatchTuner times 1, 2 and 4 and keeps the fastest (beyond 4, CPU throughput
# stopped growing on every machine measured).
MAX_AUTO_BATCH = 4
# Below this many windows the automatic batch is not timed (BatchTuner): the largest that fits is used.
TUNE_MIN_WINDOWS = 8
# Share of the free memory the automatic batch may spend on logits and their float32 log-softmax.
AUTO_BATCH_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    """Mean negative log-likelihood per token (nats)."""
    tokens: int
    """Tokens in the evaluated windows (windows x seqlen)."""
    windows: int
    seconds: float
    batch_size: int = 1
    """The batch most windows ran at (with `tune`: the fastest one measured)."""
    batch_rates: tuple[tuple[int, float], ...] = ()
    """With `tune`: (batch, tokens/s) measured for each batch tried, in the order tried."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _token_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T-1) NLL of token t+1 given positions <= t, in float32 even when the
    model runs in bf16. logsumexp - gather = cross_entropy without its (B*T, V) reshape copy and log-softmax
    output: 30% less time on SmolLM2's 49k vocabulary in float32 (measured, same values to 1e-6)."""
    pred = logits[:, :-1, :].float()  # (B, T-1, V); a view in float32, one copy in bf16
    return torch.logsumexp(pred, dim=-1) - pred.gather(-1, batch[:, 1:, None]).squeeze(-1)


class BatchTuner:
    """Picks the fastest batch by timing the evaluation's own windows: one warm-up window, then batches of
    1, 2, 4, ... up to `limit`, each timed once, then the fastest for the rest. No window is evaluated twice,
    and the perplexity does not depend on the batch.

    Why measure instead of a fixed rule: the best batch is a property of the machine. On one 2-core CPU batch 4
    ran 1.5x batch 1; on another (AMD EPYC with avx512_bf16) batch 4 ran 0.88x batch 1 in float32 and batch 2
    was best in bf16 (bench/RESULTS.md), because the (B, T, V) logits stop fitting in cache.
    """

    @staticmethod
    def applies(limit: int, windows: int) -> bool:
        """Tuning pays from a handful of windows on; fewer simply run at the largest batch allowed."""
        return limit > 1 and windows >= TUNE_MIN_WINDOWS

    def __init__(self, limit: int) -> None:
        self.candidates = [1] + [b for b in (2, 4, 8, 16, 32) if b <= limit]
        self.rates: list[tuple[int, float]] = []
        self.warmed = False

    def next_size(self, remaining: int) -> int:
        if not self.warmed:
            return 1
        tried = len(self.rates)
        # Only try a larger batch while enough windows remain to profit from the answer.
        if tried < len(self.candidates) and self.candidates[tried] * 2 <= remaining:
            return self.candidates[tried]
        return self.best

    @property
    def best(self) -> int:
        return max(self.rates, key=lambda r: r[1])[0] if self.rates else 1

    def record(self, size: int, tokens: int, seconds: float) -> None:
        if not self.warmed:
            self.warmed = True  # the first forward pays for kernel selection, allocation and thread start-up
        elif len(self.rates) < len(self.candidates) and size == self.candidates[len(self.rates)]:
            self.rates.append((size, tokens / max(seconds, 1e-9)))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    tune: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` on a (N,) token stream. `on_batch(done_windows, total_windows)` drives a progress bar.

    Each window's loss counts as `seqlen` tokens, exactly as Wanda's `eval_ppl` weighs it. With `tune`,
    `batch_size` is the largest batch allowed and `BatchTuner` picks the fastest up to it.
    """
    windows = windows_of(input_ids, seqlen, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tuner = BatchTuner(batch_size) if tune and BatchTuner.applies(batch_size, windows.shape[0]) else None
    start = time.perf_counter()
    nll_sum = 0.0
    first, total = 0, windows.shape[0]
    while first < total:
        size = tuner.next_size(total - first) if tuner else batch_size
        began = time.perf_counter()
        batch = windows[first : first + size].to(device)  # (B, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        nll_sum += float(_token_nll(logits, batch).mean(dim=1).sum()) * seqlen  # float(): waits for the device
        del logits
        if tuner:
            tuner.record(size, batch.numel(), time.perf_counter() - began)
        first += batch.shape[0]
        if on_batch is not None:
            on_batch(first, total)
    model.train(was_training)
    seconds = time.perf_counter() - start
    tokens = windows.numel()
    mean_nll = nll_sum / tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, tokens, total, seconds,
                            tuner.best if tuner else batch_size, tuple(tuner.rates) if tuner else ())


def auto_batch_size(seqlen: int, vocab: int, windows: int, device: str) -> tuple[int, str]:
    """(batch, reason): as many windows per forward as fit, up to `MAX_AUTO_BATCH` on CPU (16 on a GPU).

    The peak of a batched forward is its logits: (B, T, V) in the model dtype plus the float32 copy and the
    log-softmax of the loss, ~12 bytes per logit; they may take `AUTO_BATCH_MEMORY_SHARE` of the free memory.
    """
    per_window = 12 * seqlen * vocab
    cap = 16 if torch.device(device).type == "cuda" else MAX_AUTO_BATCH
    free = free_memory(device) or 0
    fits = int(AUTO_BATCH_MEMORY_SHARE * free // per_window)
    batch = max(1, min(cap, fits, windows))
    size = f"{per_window / 2**30:.2f} GiB" if per_window >= 2**30 else f"{per_window / 2**20:.0f} MiB"
    why = (f"~{size} of logits per window, {free / 2**30:.1f} GiB free"
           + (f"; capped at {cap}" if batch == cap and fits > cap else "")
           + ("; all windows" if batch == windows and windows < min(cap, fits) else ""))
    return batch, f"batch {batch}: {why}"
