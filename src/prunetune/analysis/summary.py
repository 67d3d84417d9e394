"""The summary numbers of a run, computed from records alone (so every source gives the same numbers)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prunetune.fmt import perplexity_from_loss
from prunetune.records import to_float


@dataclass(frozen=True)
class Summary:
    """What a run achieved. None where the records do not say."""

    steps: int | None
    """Last optimizer step of a log, eval or train_end record."""
    max_steps: int | None
    """Planned steps (from `log` records' `max_steps`), if known."""
    time_s: float | None
    """Training time: `train_end.train_runtime`, else the last `elapsed`, else the span of record times."""
    log_points: int
    eval_points: int
    final_train_loss: float | None
    """Last finite train loss."""
    final_eval_loss: float | None
    """The `final_eval` record's eval loss, else the last finite eval loss during training."""
    best_eval_loss: float | None
    best_step: int | None
    """Step of the lowest eval loss."""
    final_perplexity: float | None
    """Perplexity after training: the `final_eval` record's, else exp(final eval loss)."""
    best_perplexity: float | None
    tokens_per_s: float | None
    """Median training throughput, when the records carry it."""
    pruned_perplexity: float | None
    """Perplexity of the pruned model before recovery (final_eval record or --pruned-ppl)."""
    dense_perplexity: float | None
    """Perplexity of the dense model (final_eval record or --dense-ppl)."""
    improvement_pct: float | None
    """Perplexity reduction from pruned to final, in percent."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: Any) -> float | None:
    f = to_float(value)
    return f if f is not None and math.isfinite(f) else None


def summarize(
    records: Sequence[Mapping[str, Any]],
    dense_ppl: float | None = None,
    pruned_ppl: float | None = None,
) -> Summary:
    steps = [int(s) for r in records
             if r.get("event") in ("log", "eval", "train_end") and (s := _finite(r.get("step"))) is not None]
    logs = [r for r in records if r.get("event") == "log"]
    evals = [(int(_finite(r.get("step")) or 0), v, r) for r in records
             if r.get("event") == "eval" and (v := _finite(r.get("eval_loss"))) is not None]
    train = [v for r in logs if (v := _finite(r.get("loss"))) is not None]
    max_steps = next((int(m) for r in reversed(logs) if (m := _finite(r.get("max_steps")))), None)

    time_s = None
    # training time proper: the Trainer's train_runtime or finetune's train_end.runtime_s; the summary's
    # total_time_s (loading and final evaluation included) only when no train_end says it
    for event, keys in (("train_end", ("train_runtime", "runtime_s")), ("summary", ("train_runtime", "total_time_s"))):
        for r in records:
            if r.get("event") == event:
                for key in keys:
                    if (t := _finite(r.get(key))) is not None:
                        time_s = t
                        break
        if time_s is not None:
            break
    if time_s is None:
        elapsed = [v for r in logs if (v := _finite(r.get("elapsed"))) is not None]
        if elapsed:
            time_s = elapsed[-1]
    if time_s is None:
        times = [v for r in records if r.get("event") in ("log", "eval") and (v := _finite(r.get("time"))) is not None]
        if len(times) >= 2:
            time_s = max(times) - min(times)

    final_eval, best_eval, best_step = None, None, None
    if evals:
        final_eval = evals[-1][1]
        best_step, best_eval, _ = min(evals, key=lambda e: e[1])

    final_rec = next((r for r in reversed(records) if r.get("event") == "final_eval"), None)
    final_ppl = None
    if final_rec is not None:
        final_ppl = _finite(final_rec.get("perplexity"))
        if final_ppl is None:
            final_ppl = perplexity_from_loss(_finite(final_rec.get("eval_loss")))
    if final_rec is not None and (fl := _finite(final_rec.get("eval_loss"))) is not None:
        final_eval = fl  # the evaluation after training (best checkpoint loaded) is the run's result
    if final_ppl is None:
        final_ppl = perplexity_from_loss(final_eval)
    # the pruned model's perplexity measured on the same eval set before training beats the one from prune
    if pruned_ppl is None and final_rec is not None:
        pruned_ppl = _finite(final_rec.get("pruned_perplexity")) or _finite(final_rec.get("baseline_perplexity"))
    if pruned_ppl is None:
        base = next((r for r in reversed(records) if r.get("event") == "baseline_eval"), None)
        if base is not None:
            pruned_ppl = _finite(base.get("pruned_perplexity")) or _finite(base.get("perplexity"))
    if dense_ppl is None:
        for r in reversed(records):
            if (d := _finite(r.get("dense_perplexity"))) is not None:
                dense_ppl = d
                break
    if pruned_ppl is None:
        for r in reversed(records):
            if (p := _finite(r.get("pruned_perplexity"))) is not None:
                pruned_ppl = p
                break

    throughput = [v for r in logs if (v := _finite(r.get("tokens_per_s"))) is not None]
    improvement = None
    if pruned_ppl and final_ppl is not None and math.isfinite(final_ppl):
        improvement = (1 - final_ppl / pruned_ppl) * 100

    return Summary(
        steps=max(steps) if steps else None,
        max_steps=max_steps,
        time_s=time_s,
        log_points=len(logs),
        eval_points=len(evals),
        final_train_loss=train[-1] if train else None,
        final_eval_loss=final_eval,
        best_eval_loss=best_eval,
        best_step=best_step,
        final_perplexity=final_ppl,
        best_perplexity=perplexity_from_loss(best_eval),
        tokens_per_s=statistics.median(throughput) if throughput else None,
        pruned_perplexity=pruned_ppl,
        dense_perplexity=dense_ppl,
        improvement_pct=improvement,
    )
