"""The numeric series of a run (train loss, eval loss, LR, grad norm, non-finite values, errors) extracted
from records, and the window statistics the trend rules read from them. Pure functions on plain lists."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prunetune.analysis.thresholds import Thresholds
from prunetune.rundir.records import to_float


@dataclass(frozen=True)
class Series:
    """The numeric series a run's records carry, in step order."""

    train: list[tuple[int, float]]
    """(step, loss) of `log` records with a finite loss."""
    evals: list[tuple[int, float]]
    """(step, eval_loss) of `eval` records with a finite eval loss."""
    lr: list[tuple[int, float]]
    """(step, lr) of `log` records."""
    grad_norm: list[tuple[int, float]]
    """(step, grad_norm) of `log` records with a finite grad norm."""
    nonfinite: list[tuple[int | None, str, str]]
    """(step, key, value) of every NaN/Inf loss, grad_norm or eval_loss."""
    errors: list[Mapping[str, Any]]
    """`error` records."""
    eval_sets: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """(step, eval_loss) per eval set (`eval_set` of the records; "" for the plain `eval_loss`), in the order
    the sets first appear; `evals` is the first of them. Sets are never merged into one series."""

    def for_eval_set(self, name: str) -> Series:
        """This series with `evals` replaced by eval set `name`'s."""
        return replace(self, evals=self.eval_sets.get(name, []))


def record_step(record: Mapping[str, Any]) -> int | None:
    value = to_float(record.get("step"))
    return int(value) if value is not None and math.isfinite(value) else None


def _scan(records: Sequence[Mapping[str, Any]], series: Series) -> None:
    """Append what `records` carry to the lists of `series` (in record order)."""
    for rec in records:
        event = rec.get("event")
        if event == "error":
            series.errors.append(rec)
            continue
        if event in ("final_eval", "train_end"):
            # end-of-run numbers: a NaN there is as much a divergence as one in a step log
            key = "eval_loss" if event == "final_eval" else "train_loss"
            value = to_float(rec.get(key))
            if value is not None and not math.isfinite(value):
                series.nonfinite.append((record_step(rec), key, str(value)))
            continue
        if event not in ("log", "eval"):
            continue
        step = record_step(rec)
        keys = ("loss", "grad_norm") if event == "log" else ("eval_loss",)
        for key in keys:
            value = to_float(rec.get(key))
            if value is not None and not math.isfinite(value):
                series.nonfinite.append((step, key, str(value)))
        if step is None:
            continue
        if event == "log":
            loss = to_float(rec.get("loss"))
            if loss is not None and math.isfinite(loss):
                series.train.append((step, loss))
            gn = to_float(rec.get("grad_norm"))
            if gn is not None and math.isfinite(gn):
                series.grad_norm.append((step, gn))
            rate = to_float(rec.get("lr", rec.get("learning_rate")))
            if rate is not None and math.isfinite(rate):
                series.lr.append((step, rate))
        else:
            value = to_float(rec.get("eval_loss"))
            if value is not None and math.isfinite(value):
                series.eval_sets.setdefault(str(rec.get("eval_set") or ""), []).append((step, value))


class SeriesBuilder:
    """The series of a growing list of records, scanning each record once: `add(new_records)`, then
    `series()`. A live run feeds it one record at a time (see `rules.LiveDiagnosis`)."""

    def __init__(self) -> None:
        self._raw = Series([], [], [], [], [], [])

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        _scan(records, self._raw)

    def series(self) -> Series:
        """Sorted copies: the scanned lists stay in record order and are never handed out."""
        raw = self._raw
        sets = {name: sorted(points, key=lambda p: p[0]) for name, points in raw.eval_sets.items()}
        return Series(
            sorted(raw.train, key=lambda p: p[0]),
            next(iter(sets.values()), []),
            sorted(raw.lr, key=lambda p: p[0]),
            sorted(raw.grad_norm, key=lambda p: p[0]),
            list(raw.nonfinite),
            list(raw.errors),
            sets,
        )


def extract_series(records: Sequence[Mapping[str, Any]]) -> Series:
    """The series of `records` (pure: scans them all)."""
    builder = SeriesBuilder()
    builder.add(records)
    return builder.series()


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure, on plain lists)


def windows(values: Sequence[float], th: Thresholds) -> tuple[list[float], list[float]]:
    n = len(values)
    w = max(th.min_window, min(th.max_window, int(round(n * th.window_fraction))))
    w = min(w, n // 2)
    return list(values[:w]), list(values[n - w :])


@dataclass(frozen=True)
class TrendStats:
    """Window statistics of the train loss used by the trend rules."""

    n: int
    first_median: float
    last_median: float
    mid_median: float
    rel_change: float
    """(first - last) / |first|: positive when the loss fell."""
    first_half_drop: float
    second_half_drop: float
    first_step: int
    last_step: int
    noise: float
    """median |step-to-step change| over all points."""
    window: int
    """points per comparison window."""


def enough_evidence(train: Sequence[tuple[int, float]], th: Thresholds) -> bool:
    return len(train) >= th.min_train_points and train[-1][0] - train[0][0] >= th.min_train_steps


def trend_stats(train: Sequence[tuple[int, float]], th: Thresholds) -> TrendStats | None:
    if not enough_evidence(train, th):
        return None
    values = [v for _, v in train]
    first, last = windows(values, th)
    n = len(values)
    half = len(first) // 2
    mid = values[n // 2 - half : n // 2 - half + len(first)]
    f, m, la = statistics.median(first), statistics.median(mid), statistics.median(last)
    rel = (f - la) / abs(f) if f != 0 else (0.0 if la == 0 else -math.inf)
    recent = values[-2001:]  # the noise of the latest 2000 steps; all of a 100k-step run would only cost time
    noise = statistics.median(abs(b - a) for a, b in zip(recent, recent[1:], strict=False))
    return TrendStats(n, f, la, m, rel, f - m, m - la, train[0][0], train[-1][0], noise, len(first))


@dataclass(frozen=True)
class OscillationStats:
    rel_amplitude: float
    """median |first difference| / mean level over the recent points."""
    sign_change_fraction: float
    progress: float
    """(mean of the window before - mean of the recent window) / |mean before|."""
    steps: tuple[int, int]
    log_jump: float
    """75th percentile of |change of log loss| between consecutive points, the trend (median change) taken out:
    how far a typical large swing takes the loss, on the data's own (relative) scale."""
    level: float
    """Mean loss over the recent points."""
    points: int


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def oscillation_stats(train: Sequence[tuple[int, float]], th: Thresholds) -> OscillationStats | None:
    if not enough_evidence(train, th):
        return None
    # the recent half of the run (at least `osc_recent_points`): an oscillation that started late still counts
    n = len(train)
    k = min(th.osc_recent_points, n // 2 + 1) if n < 2 * th.osc_recent_points else min(n // 2, 500)
    recent = [v for _, v in train[-k:]]
    before = [v for _, v in train[-2 * k + 1 : -k + 1]] or recent
    diffs = [b - a for a, b in zip(recent, recent[1:], strict=False)]
    # means, not medians: the median of a two-level oscillation sits on one of the two levels
    level = statistics.fmean(abs(v) for v in recent)
    amp = statistics.median(abs(d) for d in diffs) / level if level > 0 else 0.0
    signs = [d for d in diffs if d != 0]
    flips = sum(1 for a, b in zip(signs, signs[1:], strict=False) if (a > 0) != (b > 0))
    flip_frac = flips / (len(signs) - 1) if len(signs) > 1 else 0.0
    b_mean = statistics.fmean(before)
    progress = (b_mean - statistics.fmean(recent)) / abs(b_mean) if b_mean != 0 else 0.0
    logs = [math.log(max(v, 1e-6)) for v in recent]
    log_diffs = [b - a for a, b in zip(logs, logs[1:], strict=False)]
    trend = statistics.median(log_diffs)
    jump = _quantile([abs(d - trend) for d in log_diffs], 0.75)
    return OscillationStats(amp, flip_frac, progress, (train[-k][0], train[-1][0]), jump, level, k)


def noise_sigma(values: Sequence[float]) -> float:
    """Robust standard deviation of the point-to-point noise of `values` around their trend: the MAD of the
    consecutive differences (trend removed) scaled to a normal sigma, divided by sqrt(2) (a difference carries
    the noise of two points)."""
    recent = list(values[-2001:])
    diffs = [b - a for a, b in zip(recent, recent[1:], strict=False)]
    if len(diffs) < 2:
        return 0.0
    trend = statistics.median(diffs)
    mad = statistics.median(abs(d - trend) for d in diffs)
    return 1.4826 * mad / math.sqrt(2)


def running_medians(values: Sequence[float], w: int) -> list[float]:
    """Medians of windows of `w` points at (at most ~100) evenly spaced offsets, the last window included."""
    stride = max(1, (len(values) - w + 1) // 100)
    starts = [*range(0, len(values) - w + 1, stride), len(values) - w]
    return [statistics.median(values[i : i + w]) for i in starts]


def warmup_end_index(lr: Sequence[tuple[int, float]]) -> int | None:
    """Index of the first LR point after a rising (warm-up) phase; None while the LR is still rising."""
    if len(lr) < 2:
        return 0 if lr else None
    for i in range(1, len(lr)):
        if lr[i][1] <= lr[i - 1][1]:
            return i - 1
    return None


def train_loss_near(train: Sequence[tuple[int, float]], step: int, k: int = 3) -> float | None:
    """Median of the last `k` train losses logged at or before `step`: the train loss "at" an eval."""
    before = [v for s, v in train if s <= step][-k:]
    return statistics.median(before) if before else None
