"""Verdicts for the report: one judgement per metric (train loss, eval loss) from the anomalies found, and the
perplexity rating against relative or absolute bands."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from prunetune.analysis.anomaly import Anomaly
from prunetune.analysis.rules import diagnose
from prunetune.analysis.series import Series, extract_series, noise_sigma
from prunetune.analysis.thresholds import DEFAULTS, Thresholds
from prunetune.rundir.records import to_float


@dataclass(frozen=True)
class Verdict:
    """The judgement on one metric."""

    metric: str
    """`train_loss` or `eval_loss`."""
    status: str
    """`ok`, `warning`, `error` or `unknown` (too little data)."""
    label: str
    """Short text, e.g. `decreasing steadily`."""
    symbol: str
    """✅, ⚠ or ❌ (or ? when unknown)."""
    reason: str
    """What the label means for the user."""
    kinds: tuple[str, ...] = ()
    """The anomaly kinds behind it."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


_SYMBOL = {"ok": "✅", "warning": "⚠", "error": "❌", "unknown": "?"}


def _verdict(metric: str, status: str, label: str, reason: str, kinds: tuple[str, ...] = ()) -> Verdict:
    return Verdict(metric, status, label, _SYMBOL[status], reason, kinds)


def _train_verdict(series: Series, found: Sequence[Anomaly], th: Thresholds) -> Verdict:
    kinds = {a.kind for a in found}
    memorised = any(a.kind == "overfitting" and "train_loss_end" in a.evidence and "eval_steps" not in a.evidence
                    for a in found)
    for kind, (status, label, reason) in _TRAIN_LABELS.items():
        if kind in kinds:
            return _verdict("train_loss", status, label, reason, (kind,))
    if memorised:
        return _verdict("train_loss", "warning", "converged near zero", "the model memorised its training text",
                        ("overfitting",))
    if not series.train:
        return _verdict("train_loss", "unknown", "nothing to judge", "0 train-loss points found")
    values = [v for _, v in series.train]
    w = max(th.min_window, len(values) // 10)
    head = statistics.median(values[: th.min_window]) if len(values) >= 2 * th.min_window else values[0]
    tail = statistics.median(values[-w:]) if len(values) >= 2 * w else values[-1]
    fell = (head - tail) / abs(head) if head else 0.0
    went = f"{head:.4g} -> {tail:.4g}, {-fell * 100:+.1f}%"
    if len(values) < th.min_train_points:
        need = f"{len(values)} finite train-loss logs, {th.min_train_points} needed"
        return _verdict("train_loss", "unknown", "too few points", f"{need} (it went {went})")
    sigma = noise_sigma(values)
    noise = 2 * 1.2533 * sigma * math.sqrt(2 / w)  # two standard errors of a difference of window medians
    if head - tail <= noise or fell <= 0:
        return _verdict("train_loss", "warning", "not decreasing",
                        f"it went {went}, within its noise or up; no rule's pattern matched")
    if fell >= th.verdict_min_rel_drop:
        evals = "" if not series.evals else (
            ", and the eval loss fell too" if series.evals[-1][1] < series.evals[0][1] else "")
        return _verdict("train_loss", "ok", "decreasing steadily",
                        f"it fell {fell * 100:.0f}% ({went[:went.rindex(',')]}) without blowing up, oscillating "
                        f"or stalling{evals}: nothing calls for another LR")
    return _verdict("train_loss", "ok", "decreasing a little",
                    f"it went {went}; no rule fired, but the LR is not shown to suit the run")


_TRAIN_LABELS: dict[str, tuple[str, str, str]] = {  # the anomaly that decides the train verdict, first match
    "nan_inf": ("error", "NaN/Inf", "training diverged numerically"),
    "loss_diverging": ("warning", "rising", "LR too high"),
    "loss_oscillating": ("warning", "oscillating", "LR too high"),
    "loss_flat": ("error", "flat", "data or configuration broken"),
    "loss_slow": ("warning", "falling too slowly", "LR too low"),
}


def _eval_verdict(metric: str, series: Series, found: Sequence[Anomaly], th: Thresholds,
                  name: str | None) -> Verdict:
    mine = [a for a in found if name is None or a.evidence.get("eval_set") == name]
    kinds = {a.kind for a in mine if a.kind != "overfitting" or "eval_steps" in a.evidence}
    evals = series.evals
    if "overfitting" in kinds:
        return _verdict(metric, "warning", "rising", "overfitting", ("overfitting",))
    if "eval_far_above_train" in kinds:
        return _verdict(metric, "warning", "far above train", "eval data differs or the model memorises",
                        ("eval_far_above_train",))
    if not evals:
        return _verdict(metric, "unknown", "no evaluation", "the run has no eval loss",
                        ("no_eval",) if any(a.kind == "no_eval" for a in found) else ())
    if len(evals) < 2:
        return _verdict(metric, "unknown", "one evaluation", "a trend needs two or more evaluations")
    first, last = evals[0][1], evals[-1][1]
    best_step, best = min(evals, key=lambda e: e[1])
    if series.train and last > series.train[0][1] * (1 + th.diverge_min_rel_rise):
        return _verdict(metric, "warning", "worse than the start",
                        f"eval loss {last:.4g} ends above the first train loss {series.train[0][1]:.4g}")
    if last > best * (1 + th.overfit_min_rel_rise):
        return _verdict(metric, "warning", "rose after its best",
                        f"best {best:.4g} at step {best_step}, last {last:.4g} at step {evals[-1][0]}")
    if last < first * (1 - th.flat_max_rel_change):
        return _verdict(metric, "ok", "improving", f"{first:.4g} -> {last:.4g}" + (
            "" if last <= best else f", within {th.overfit_min_rel_rise:.0%} of its best {best:.4g} at step "
                                    f"{best_step}") + ": generalises to held-out text")
    why = ("eval loss ended above its first value" if last > first else
           f"eval loss fell less than {th.flat_max_rel_change:.1%} since the first evaluation")
    return _verdict(metric, "warning", "not improving", f"{why} ({first:.4g} -> {last:.4g})")


def eval_metric(name: str) -> str:
    """The log's own key for an eval set's loss: `eval_loss`, or `eval_<name>_loss`."""
    return f"eval_{name}_loss" if name else "eval_loss"


def verdicts(
    records: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = DEFAULTS,
    anomalies: Sequence[Anomaly] | None = None,
) -> dict[str, Verdict]:
    """A verdict for the train loss and one per eval set (`eval_loss`, or `eval_<name>_loss` per set when the
    run evaluates several), from the same rules as `diagnose`."""
    series = extract_series(records)
    found = list(anomalies) if anomalies is not None else diagnose(records, thresholds, final=True)
    out = {"train_loss": _train_verdict(series, found, thresholds)}
    named = [n for n in series.eval_sets if n] if len(series.eval_sets) > 1 else []
    if not named:
        only = next(iter(series.eval_sets), "")
        out["eval_loss"] = _eval_verdict("eval_loss", series, found, thresholds, None)
        if only:
            out["eval_loss"] = replace(out["eval_loss"], metric=eval_metric(only))
        return out
    for name in series.eval_sets:
        metric = eval_metric(name)
        out[metric] = _eval_verdict(metric, series.for_eval_set(name), found, thresholds, name or None)
    return out


@dataclass(frozen=True)
class Rating:
    """A perplexity judged against bands."""

    band: str
    """`ideal`, `good`, `fair`, `poor`, or `unrated` (no reference)."""
    symbol: str
    ppl: float | None
    reference: float | None
    """The dense perplexity (relative bands) or None (absolute bands)."""
    ratio: float | None
    bands: str
    """`relative` or `llama2-7b`."""
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BAND_SYMBOL = {"ideal": "✅", "good": "✅", "fair": "⚠", "poor": "❌", "unrated": "?"}
BAND_PRESETS: tuple[str, ...] = ("relative", "llama2-7b")


def rate_perplexity(
    ppl: float | None,
    dense_ppl: float | None = None,
    bands: str = "relative",
    thresholds: Thresholds = DEFAULTS,
) -> Rating:
    """Rate a perplexity: relative to the dense model (default bands ≤1.3x ideal, ≤2x good, ≤10x fair,
    poor above) or on the absolute Llama-2-7B WikiText-2 scale (6.5-7 ideal, 7-10 good, 10-50 fair, >50 poor)."""
    if bands not in BAND_PRESETS:
        raise ValueError(f"bands={bands!r}; choose one of {BAND_PRESETS}")
    value = to_float(ppl)
    if value is None:
        return Rating("unrated", "?", None, dense_ppl, None, bands, "no perplexity known")
    if not math.isfinite(value):
        return Rating("poor", "❌", value, dense_ppl, None, bands, f"perplexity is {value}: the model is broken")
    if bands == "relative":
        ref = to_float(dense_ppl)
        if ref is None or not math.isfinite(ref) or ref <= 0:
            return Rating("unrated", "?", value, None, None, bands,
                          "dense perplexity unknown: pass --dense-ppl X, or --bands llama2-7b for a 7B model")
        ratio = value / ref
        ideal, good, fair = thresholds.ppl_relative_bands
        band = "ideal" if ratio <= ideal else "good" if ratio <= good else "fair" if ratio <= fair else "poor"
        text = f"{value:.2f} is {ratio:.2f}x the dense {ref:.2f}: {band} (ideal <= {ideal}x, good <= {good}x, fair <= {fair}x)"
        return Rating(band, BAND_SYMBOL[band], value, ref, ratio, bands, text)
    _low, ideal_hi, good_hi, fair_hi = thresholds.ppl_llama2_7b_bands
    band = "ideal" if value <= ideal_hi else "good" if value <= good_hi else "fair" if value <= fair_hi else "poor"
    text = (
        f"{value:.2f} on the Llama-2-7B scale: {band} (ideal {_low}-{ideal_hi}, good <= {good_hi}, "
        f"fair <= {fair_hi}, poor above)"
    )
    return Rating(band, BAND_SYMBOL[band], value, None, None, bands, text)
