"""Verdicts for the report: one judgement per metric (train loss, eval loss) from the anomalies found, and the
perplexity rating against relative or absolute bands."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prunetune.analysis.anomaly import Anomaly
from prunetune.analysis.rules import diagnose
from prunetune.analysis.series import extract_series
from prunetune.analysis.thresholds import DEFAULTS, Thresholds
from prunetune.records import to_float


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


def verdicts(
    records: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = DEFAULTS,
    anomalies: Sequence[Anomaly] | None = None,
) -> dict[str, Verdict]:
    """A verdict for the train loss and the eval loss, from the same rules as `diagnose`."""
    series = extract_series(records)
    found = list(anomalies) if anomalies is not None else diagnose(records, thresholds, final=True)
    kinds = {a.kind for a in found}

    if "nan_inf" in kinds:
        train = _verdict("train_loss", "error", "NaN/Inf", "training diverged numerically (LR far too high)", ("nan_inf",))
    elif "loss_diverging" in kinds:
        train = _verdict("train_loss", "warning", "rising", "LR too high", ("loss_diverging",))
    elif "loss_oscillating" in kinds:
        train = _verdict("train_loss", "warning", "oscillating", "LR too high", ("loss_oscillating",))
    elif "loss_flat" in kinds:
        train = _verdict("train_loss", "error", "flat", "data or configuration broken", ("loss_flat",))
    elif "loss_slow" in kinds:
        train = _verdict("train_loss", "warning", "falling too slowly", "LR too low", ("loss_slow",))
    elif len(series.train) < thresholds.min_train_points:
        train = _verdict("train_loss", "unknown", "too few points",
                         f"{len(series.train)} finite train-loss logs, {thresholds.min_train_points} needed")
    else:
        train = _verdict("train_loss", "ok", "decreasing steadily", "the LR suits the run")

    if "overfitting" in kinds:
        ev = _verdict("eval_loss", "warning", "rising", "overfitting", ("overfitting",))
    elif "eval_far_above_train" in kinds:
        ev = _verdict("eval_loss", "warning", "far above train", "eval data differs or the model memorises",
                      ("eval_far_above_train",))
    elif not series.evals:
        ev = _verdict("eval_loss", "unknown", "no evaluation", "the run has no eval loss",
                      ("no_eval",) if "no_eval" in kinds else ())
    elif len(series.evals) < 2:
        ev = _verdict("eval_loss", "unknown", "one evaluation", "a trend needs two or more evaluations")
    elif series.train and series.evals[-1][1] > series.train[0][1] * (1 + thresholds.diverge_min_rel_rise):
        ev = _verdict("eval_loss", "warning", "worse than the start",
                      f"eval loss {series.evals[-1][1]:.4g} ends above the first train loss {series.train[0][1]:.4g}")
    elif series.evals[-1][1] < series.evals[0][1] * (1 - thresholds.flat_max_rel_change):
        ev = _verdict("eval_loss", "ok", "improving", "generalises to held-out text")
    else:
        first, last = series.evals[0][1], series.evals[-1][1]
        why = ("eval loss ended above its first value" if last > first else
               f"eval loss fell less than {thresholds.flat_max_rel_change:.1%} since the first evaluation")
        ev = _verdict("eval_loss", "warning", "not improving", f"{why} ({first:.4g} -> {last:.4g})")
    return {"train_loss": train, "eval_loss": ev}


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
