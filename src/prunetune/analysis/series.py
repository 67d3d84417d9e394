"""The numeric series of a run (train loss, eval loss, LR, grad norm, non-finite values, errors) extracted
from records, and the window statistics the trend rules read from them. Pure functions on plain lists."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prunetune.analysis.thresholds import Thresholds
from prunetune.rundir.records import to_float

# keys a Trainer log carries only when its loss is not a language-model cross-entropy: preference training
# (TRL DPO/ORPO/KTO: rewards/*, logps/*), generation metrics (ROUGE, BLEU), classification scores
NOT_LM = re.compile(r"(?:^|[_/])(?:rewards?|logps|chosen|rejected|margins|rouge\w*|bleu|sacrebleu|f1|precision|"
                    r"recall|matthews_correlation|exact_match|gen_len|mse|mae|r2)(?:$|[_/])", re.IGNORECASE)


@dataclass(frozen=True)
class Series:
    """The numeric series a run's records carry, in step order."""

    train: list[tuple[int, float]]
    """(step, loss) of `log` records with a finite loss and a finite (or absent) grad norm: a loss logged beside
    a NaN gradient is not a measurement of the model (fp16 overflow prints 0.0)."""
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
    zero_loss_bad_grad: list[int] = field(default_factory=list)
    """Steps whose logged loss is exactly 0.0 beside a NaN/Inf grad norm: the fp16 overflow signature."""
    estimated: set[int] = field(default_factory=set)
    """Steps the log does not state (estimated from the epoch or the log ordinal)."""
    ended: bool = False
    """The records show the end of training (`train_end`, `final_eval`, `summary`)."""
    stopped: bool = False
    """The records show an interruption (`stopped`)."""
    max_steps: int | None = None
    """The planned optimizer steps, as the latest `log` record states them."""
    lm: bool = True
    """The loss is a language-model cross-entropy as far as the records tell (no rewards, ROUGE, F1 keys)."""

    def for_eval_set(self, name: str) -> Series:
        """This series with `evals` replaced by eval set `name`'s."""
        return replace(self, evals=self.eval_sets.get(name, []))


def record_step(record: Mapping[str, Any]) -> int | None:
    value = to_float(record.get("step"))
    return int(value) if value is not None and math.isfinite(value) else None


def _scan(records: Sequence[Mapping[str, Any]], series: Series, flags: dict[str, Any]) -> None:
    """Append what `records` carry to the lists of `series` (in record order); `flags` collects ended/stopped."""
    for rec in records:
        event = rec.get("event")
        if event == "error":
            series.errors.append(rec)
            continue
        if event == "stopped":
            flags["stopped"] = True
            continue
        if event in ("final_eval", "train_end", "summary"):
            flags["ended"] = True
            if event == "summary":
                continue
            # end-of-run numbers: a NaN there is as much a divergence as one in a step log
            key = "eval_loss" if event == "final_eval" else "train_loss"
            value = to_float(rec.get(key))
            if value is not None and not math.isfinite(value):
                series.nonfinite.append((record_step(rec), key, str(value)))
            continue
        if event not in ("log", "eval"):
            continue
        if flags["lm"]:
            for key in rec.keys() - flags["keys"]:
                flags["keys"].add(key)
                flags["lm"] = flags["lm"] and not NOT_LM.search(str(key))
        step = record_step(rec)
        if step is not None and rec.get("step_estimated"):
            series.estimated.add(step)
        keys = ("loss", "grad_norm") if event == "log" else ("eval_loss",)
        for key in keys:
            value = to_float(rec.get(key))
            if value is not None and not math.isfinite(value):
                series.nonfinite.append((step, key, str(value)))
        if step is None:
            continue
        if event == "log":
            planned = to_float(rec.get("max_steps"))
            if planned is not None and math.isfinite(planned) and planned > 0:
                flags["max_steps"] = int(planned)
            loss = to_float(rec.get("loss"))
            gn = to_float(rec.get("grad_norm"))
            bad_grad = gn is not None and not math.isfinite(gn)
            if bad_grad and loss == 0.0:
                series.zero_loss_bad_grad.append(step)
            if loss is not None and math.isfinite(loss) and not bad_grad:
                series.train.append((step, loss))
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
        self._flags: dict[str, Any] = {"ended": False, "stopped": False, "max_steps": None, "lm": True,
                                       "keys": set()}

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        _scan(records, self._raw, self._flags)

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
            list(raw.zero_loss_bad_grad),
            set(raw.estimated),
            self._flags["ended"],
            self._flags["stopped"],
            self._flags["max_steps"],
            self._flags["lm"],
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
    # an even count where the points allow it: a high/low alternation (batches of two kinds taking turns) then
    # puts as many highs as lows in every window, and window medians do not swing with the parity of the window
    w = min(w + w % 2, n // 2)
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


def enough_evidence(train: Sequence[tuple[int, float]], th: Thresholds, steps_known: bool = True) -> bool:
    """`min_train_points` points over `min_train_steps` steps (the span only when the log states its steps)."""
    return len(train) >= th.min_train_points and (not steps_known or train[-1][0] - train[0][0] >= th.min_train_steps)


def trend_stats(train: Sequence[tuple[int, float]], th: Thresholds, steps_known: bool = True) -> TrendStats | None:
    if not enough_evidence(train, th, steps_known):
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
    how far a typical large swing takes the loss, on the data's own (relative) scale (0 when a loss in the
    window is not positive: a ratio of losses means nothing there)."""
    level: float
    """Mean loss over the recent points."""
    points: int
    large_jumps: int = 0
    """How many of those detrended log jumps reach `osc_min_log_jump`: one outlying point makes two (down and
    back up), so a single bad batch can never make an oscillation."""


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def oscillation_stats(train: Sequence[tuple[int, float]], th: Thresholds) -> OscillationStats | None:
    """The jitter of the recent train losses. Judged on points, not on the steps they span: a jump is between
    two consecutive logs whatever the logging interval (ten per-step logs carry nine jumps)."""
    if len(train) < th.min_train_points:
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
    jump, large = 0.0, 0
    if min(recent) > 0:  # a loss that reaches zero or below (a custom objective) has no relative scale
        logs = [math.log(v) for v in recent]
        log_diffs = [b - a for a, b in zip(logs, logs[1:], strict=False)]
        trend = statistics.median(log_diffs)
        swings = [abs(d - trend) for d in log_diffs]
        jump, large = _quantile(swings, 0.75), sum(1 for d in swings if d >= th.osc_min_log_jump)
    return OscillationStats(amp, flip_frac, progress, (train[-k][0], train[-1][0]), jump, level, k, large)


def trend_z(values: Sequence[float], max_points: int = 400) -> float:
    """The Mann-Kendall statistic of `values` as a z-score: how far the count of rising minus falling pairs
    (every pair, not two windows) lies from zero in standard deviations, negative for a fall. Rank-based, so
    one outlier moves it by little, and it sees a slow steady fall that two window medians in wide noise miss;
    |z| >= 2 is a trend at ~95%. A long series is thinned evenly to `max_points` (the test is O(n^2))."""
    v = list(values)
    if len(v) > max_points:
        v = [v[i * len(v) // max_points] for i in range(max_points)]
    n = len(v)
    if n < 3:
        return 0.0
    s = sum((b > a) - (b < a) for i, a in enumerate(v) for b in v[i + 1 :])
    # tied values (losses printed to 4 decimals repeat) carry no order: the variance without their pairs
    ties = sum(t * (t - 1) * (2 * t + 5) for t in Counter(v).values() if t > 1)
    var = (n * (n - 1) * (2 * n + 5) - ties) / 18
    return (s - (s > 0) + (s < 0)) / math.sqrt(var) if var > 0 else 0.0  # continuity correction: 1 toward zero


def _lag_sigma(values: Sequence[float], lag: int) -> float | None:
    diffs = [b - a for a, b in zip(values, values[lag:], strict=False)]
    if len(diffs) < 2:
        return None
    trend = statistics.median(diffs)
    return 1.4826 * statistics.median(abs(d - trend) for d in diffs) / math.sqrt(2)


def noise_sigma(values: Sequence[float]) -> float:
    """Robust standard deviation of the point-to-point noise of `values` around their trend: the MAD of the
    differences (trend removed) scaled to a normal sigma, divided by sqrt(2) (a difference carries the noise of
    two points), at lag 1 and lag 2, the smaller: a regular high/low alternation (batches of two kinds taking
    turns) is no noise to a median of several points, and lag 2 sees through it."""
    recent = list(values[-2001:])
    sigmas = [s for lag in (1, 2) if (s := _lag_sigma(recent, lag)) is not None]
    return min(sigmas) if sigmas else 0.0


def head_level(values: Sequence[float], th: Thresholds) -> float:
    """The loss the run started from: the median of its first points, as few as its noise allows (enough that
    the median is known to ~1% of the level, at least `min_window`, at most one comparison window). A quiet
    curve is read at its very first logs, so a fast fall at the start (a warm-up) is never averaged away; a
    batch-1 curve over enough points that one lucky or unlucky batch does not set it."""
    w = len(windows(values, th)[0]) or 1
    level = abs(statistics.median(values[:w])) or 1.0
    sigma = noise_sigma(values)
    k = math.ceil((1.2533 * sigma / (0.01 * level)) ** 2) if sigma > 0 else th.min_window
    k = max(th.min_window, min(k, w))
    return statistics.median(values[: min(k, len(values))])


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


def warmup_end(train: Sequence[tuple[int, float]], lr: Sequence[tuple[int, float]],
               configured: int | None = None) -> int | None:
    """Index in `train` of the first point after the warm-up: where the logged LR stops rising, else the
    configured warm-up step, else 0. None while the logged LR is still rising."""
    if lr:
        i = warmup_end_index(lr)
        if i is None:
            return None
        step = lr[i][0] if i > 0 else None
    else:
        step = configured
    if not step:
        return 0
    return next((k for k, (s, _) in enumerate(train) if s >= step), len(train))


def lr_exposure(lr: Sequence[tuple[int, float]], start: int, end: int) -> float | None:
    """The LR summed over the steps [start, end) (each logged value holds until the next log): how far the
    optimizer could move the weights over that stretch. None without a logged LR."""
    if not lr or end <= start:
        return None
    total = 0.0
    for (s, v), nxt in zip(lr, [*lr[1:], (max(end, lr[-1][0] + 1), lr[-1][1])], strict=True):
        lo, hi = max(s, start), min(nxt[0], end)
        if hi > lo:
            total += (hi - lo) * v
    first_step, first_lr = lr[0]
    if start < first_step:
        total += (min(first_step, end) - start) * first_lr
    return total


# ---------------------------------------------------------------------------------------------------------
# The curves a report draws and report.json carries (one dict, so the plots and the JSON never disagree)


def _column(records: Sequence[Mapping[str, Any]], event: str, key: str) -> dict[str, list]:
    steps, values = [], []
    for rec in records:
        if rec.get("event") != event:
            continue
        step, value = record_step(rec), to_float(rec.get(key))
        if step is None or value is None or not math.isfinite(value):
            continue
        steps.append(step)
        values.append(value)
    return {"step": steps, key: values}


def _ppl(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None


def curves(records: Sequence[Mapping[str, Any]], final_step: int | None = None,
           final_of: str | None = None) -> dict[str, Any]:
    """Every series the report plots: train loss, eval loss and perplexity per eval set (`eval` for the plain
    eval loss), the final evaluation(s) after training at the step of the model they describe (`final_step`,
    else the last step), the pruned baseline, LR, grad norm and throughput. Finite values only."""
    evals: dict[str, dict[str, list]] = {}
    for rec in records:
        step, loss = record_step(rec), to_float(rec.get("eval_loss"))
        if rec.get("event") != "eval" or step is None or loss is None or not math.isfinite(loss):
            continue
        col = evals.setdefault(str(rec.get("eval_set") or "") or "eval",
                               {"step": [], "eval_loss": [], "perplexity": []})
        col["step"].append(step)
        col["eval_loss"].append(loss)
        col["perplexity"].append(_ppl(loss))
    last = max((s for r in records if (s := record_step(r)) is not None and r.get("event") in ("log", "eval")),
               default=None)
    finals = []
    for rec in records:
        loss = to_float(rec.get("eval_loss"))
        if rec.get("event") != "final_eval" or loss is None or not math.isfinite(loss):
            continue
        ppl = to_float(rec.get("perplexity"))
        finals.append({"eval_set": str(rec.get("eval_set") or "") or "eval",
                       "step": final_step if final_step is not None else record_step(rec) or last,
                       "eval_loss": loss, "perplexity": ppl if ppl is not None and math.isfinite(ppl) else _ppl(loss),
                       "of": final_of})
    baseline = next(({"step": 0, "eval_loss": v, "perplexity": _ppl(v)} for r in records
                     if r.get("event") == "baseline_eval" and (v := to_float(r.get("eval_loss"))) is not None
                     and math.isfinite(v)), None)
    lr = _column(records, "log", "lr")
    if not lr["step"]:
        lr = {"step": _column(records, "log", "learning_rate")["step"],
              "lr": _column(records, "log", "learning_rate")["learning_rate"]}
    throughput = _column(records, "log", "tokens_per_s")
    if not throughput["step"]:
        throughput = _column(records, "log", "steps_per_s")
    return {"train_loss": _column(records, "log", "loss"), "eval": evals, "final_eval": finals,
            "baseline": baseline, "lr": lr, "grad_norm": _column(records, "log", "grad_norm"),
            "throughput": throughput}
