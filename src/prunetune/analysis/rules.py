"""Diagnosis rules: pure functions over a sequence of `prunetune.records` dicts.

The same code judges a run live (`finetune` calls `diagnose(records_so_far)` after every log/eval record and
prints each alert kind once) and after the fact (`prunetune report`). Hence two design constraints:

- robust statistics (medians of windows, not single points), so one noisy log line never raises an alert and
  an alert, once raised, does not vanish at the next log line;
- minimum evidence (points, evals, steps) before any trend rule speaks.

Anomaly kinds (`ANOMALY_KINDS`, the vocabulary of `report.json` and of `alert` records):

- `loss_flat`           (error)   train loss does not move at all: data or configuration broken (labels
                                  masked, LR 0, frozen parameters, the same batch repeated...).
- `loss_slow`           (warning) train loss falls, but too little and still at the same pace at the end
                                  (no plateau reached): the LR is too low.
- `loss_oscillating`    (warning) train loss jumps up and down by a large fraction of its level without
                                  progress: the LR is too high or the batch too small.
- `loss_diverging`      (error)   train loss ends clearly above where it started: the LR is far too high.
- `overfitting`         (warning) eval loss rises over consecutive evaluations while train loss keeps falling.
- `eval_far_above_train` (warning) eval loss stays far above the train loss at the same step.
- `nan_inf`             (error)   a NaN/Inf loss, grad norm or eval loss: training diverged numerically.
- `out_of_memory`       (error)   the run died of an out-of-memory error (an `error` record of that kind).
- `no_eval`             (warning) the run finished without a single evaluation (only with `final=True`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from prunetune.errors import UserError
from prunetune.records import to_float

ANOMALY_KINDS: tuple[str, ...] = (
    "loss_flat",
    "loss_slow",
    "loss_oscillating",
    "loss_diverging",
    "overfitting",
    "eval_far_above_train",
    "nan_inf",
    "out_of_memory",
    "no_eval",
)

SEVERITIES: tuple[str, ...] = ("warning", "error")

KIND_DOCS: dict[str, str] = {
    "loss_flat": "error: train loss does not move (or repeats exactly / zero gradients): data or configuration "
                 "broken. Fix: check labels, trainable parameters, LR.",
    "loss_slow": "warning: train loss falls, too little and still at its initial pace: LR too low. Fix: raise --lr.",
    "loss_oscillating": "warning: train loss jumps by a large fraction of its level without progress: LR too high "
                        "or batch too small. Fix: lower --lr or raise --gradient_accumulation_steps.",
    "loss_diverging": "error: train loss ends clearly above its start or its best: LR too high. Fix: lower --lr, "
                      "clip gradients, warm up.",
    "overfitting": "warning: eval loss rises at consecutive evaluations while train loss falls. Fix: more "
                   "--lora_dropout, fewer epochs, stop early at the best checkpoint, more data.",
    "eval_far_above_train": "warning: eval loss far above the train loss at the same step. Fix: check the eval "
                            "data matches, then as for overfitting.",
    "nan_inf": "error: a NaN/Inf loss, grad norm or eval loss (or non-finite weights, alerted by finetune). "
               "Fix: stop, keep the last good checkpoint, lower --lr; --logging_nan_inf_filter false.",
    "out_of_memory": "error: the run died of an out-of-memory error. Fix: shorter --block-size, "
                     "--gradient_checkpointing, smaller per-device batch; resume.",
    "no_eval": "warning (end of run only): no evaluation at all. Fix: --eval_strategy steps --eval_steps N.",
}


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against. Defaults are tuned on the labelled logs in `tests/fixtures/logs`."""

    min_train_points: int = 10
    """Finite train-loss log points needed before any train-loss trend rule (flat, slow, oscillating,
    diverging) may fire; with logging every 10 steps that is 100 steps ..."""
    min_train_steps: int = 50
    """... and the steps those points must span (per-step logging: 10 points are too few steps to judge)."""
    window_fraction: float = 0.2
    """Size of the first/last comparison windows as a fraction of the train-loss points."""
    min_window: int = 3
    """Smallest window (points) whose median is trusted."""
    max_window: int = 100
    """Largest window (points): more adds no robustness, only cost (`diagnose` runs after every log line)."""
    flat_max_rel_change: float = 0.005
    """`loss_flat` when the median of the last window differs from the median of the first window by less
    than this fraction of the latter (0.5%) ..."""
    flat_noise_multiple: float = 1.0
    """... or, in a quiet series (noise below `flat_quiet_noise` of the level), by less than this many times
    the noise (median |step-to-step change|): no change that stands out of the noise."""
    flat_quiet_noise: float = 0.02
    """Relative noise below which a series counts as quiet (a noisy series is never called flat by noise)."""
    flat_identical_points: int = 6
    """`loss_flat` at once (no step span needed) when this many consecutive train losses are exactly equal, or
    half as many consecutive grad norms are exactly 0: a model that no batch changes is frozen or dead."""
    slow_max_rel_drop: float = 0.1
    """`loss_slow` when the loss fell by less than this fraction (first vs last window medians) ..."""
    slow_min_late_share: float = 0.5
    """... the second half of the run still fell by at least this share of the first half's drop:
    the curve is still going down at its initial pace (no plateau), so a larger LR would help ..."""
    slow_min_significance: float = 2.0
    """... and the drop exceeds this many standard errors of a window median (noise / sqrt(window))."""
    osc_min_rel_amplitude: float = 0.25
    """`loss_oscillating` when the median |step-to-step change| of the recent losses exceeds this
    fraction of their mean level ..."""
    osc_min_sign_changes: float = 0.5
    """... the changes flip sign at least this often (fraction of consecutive pairs) ..."""
    osc_max_progress: float = 0.03
    """... and the recent window is not lower than the window before it by more than this fraction."""
    osc_recent_points: int = 20
    """How many of the latest train-loss points the oscillation rule looks at."""
    diverge_min_rel_rise: float = 0.1
    """`loss_diverging` when the last window's median exceeds by more than this fraction the lower of the
    first logged loss (the untrained model) and the minimum of the running window medians."""
    diverge_noise_multiple: float = 2.0
    """... and by more than this many times the noise (median |step-to-step change|), so the low points of an
    oscillation are not read as a rise."""
    overfit_min_evals: int = 3
    """Evaluations needed before `overfitting` may fire."""
    overfit_consecutive_rises: int = 2
    """`overfitting` when the eval loss rose at this many consecutive evaluations ..."""
    overfit_min_rel_rise: float = 0.01
    """... ends at least this fraction above its best value ..."""
    overfit_train_max_rel_change: float = 0.0
    """... while the train loss over the same steps changed by at most this fraction (0: did not rise)."""
    far_min_gap: float = 0.5
    """`eval_far_above_train` when eval loss exceeds the train loss at its step (median of the last 3 logged
    losses) by more than this many nats (perplexity x1.65) ..."""
    far_min_ratio: float = 1.2
    """... and by more than this factor ..."""
    far_consecutive_evals: int = 2
    """... at this many consecutive evaluations (a single eval is not evidence)."""
    ppl_relative_bands: tuple[float, float, float] = (1.3, 2.0, 10.0)
    """Relative perplexity bands (pruned or recovered / dense): ideal, good, fair upper bounds; above is poor."""
    ppl_llama2_7b_bands: tuple[float, float, float, float] = (6.5, 7.0, 10.0, 50.0)
    """Absolute Llama-2-7B WikiText-2 bands: ideal from the first to the second value, good to the third,
    fair to the fourth, poor above."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # values arrive from YAML and NAME=VALUE flags as floats and lists: counts must be ints
            if f.type == "int" and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"Thresholds.{f.name}={value!r} must be a whole number")
                value = int(value)
            elif isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, f.name, value)
            if not isinstance(value, (int, float, tuple)) or isinstance(value, bool):
                raise ValueError(f"Thresholds.{f.name}={value!r} must be a number")
            values = value if isinstance(value, tuple) else (value,)
            if any(v < 0 for v in values):
                raise ValueError(f"Thresholds.{f.name}={value!r} must not be negative")
        if not 0 < self.window_fraction <= 0.5:
            raise ValueError(f"Thresholds.window_fraction={self.window_fraction} must be in (0, 0.5]")
        if self.min_window < 1 or self.min_train_points < 2 * self.min_window:
            raise ValueError("Thresholds.min_train_points must be at least 2 * min_window and min_window >= 1")
        if self.overfit_consecutive_rises < 1 or self.far_consecutive_evals < 1:
            raise ValueError("Thresholds.overfit_consecutive_rises and far_consecutive_evals must be >= 1")


def thresholds_from_mapping(values: Mapping[str, Any] | None) -> Thresholds:
    """Thresholds with the given fields overridden; ValueError naming the valid fields for an unknown one."""
    values = dict(values or {})
    valid = [f.name for f in fields(Thresholds)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown threshold(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return Thresholds(**values)


def parse_threshold_flags(items: Sequence[str], flag: str) -> dict[str, float]:
    """`["slow_max_rel_drop=0.05", ...]` from repeated `--threshold`-style flags -> `{name: value}`."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{flag} {item!r}: expected NAME=VALUE, e.g. slow_max_rel_drop=0.05")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"{flag} {item!r}: VALUE must be a number") from None
    return out


@dataclass(frozen=True)
class Anomaly:
    """One diagnosis: what, how bad, the evidence (steps and values) and the concrete fix."""

    kind: str
    """One of `ANOMALY_KINDS`."""
    severity: str
    """`warning` or `error`."""
    message: str
    """One sentence a person reads in the console."""
    evidence: dict = field(default_factory=dict)
    """JSON-able numbers behind the verdict (steps, values, statistics)."""
    fix: str = ""
    """What to change: flags and values."""
    step: int | None = None
    """The step at which the evidence was conclusive (or where the problem began)."""

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"Anomaly.kind={self.kind!r}; choose one of {ANOMALY_KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Anomaly.severity={self.severity!r}; choose one of {SEVERITIES}")

    def to_record(self) -> dict[str, Any]:
        return {
            "event": "alert",
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "evidence": self.evidence,
            "fix": self.fix,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Series extraction


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


def _step(record: Mapping[str, Any]) -> int | None:
    value = to_float(record.get("step"))
    return int(value) if value is not None and math.isfinite(value) else None


def _scan(records: Sequence[Mapping[str, Any]], series: Series) -> None:
    """Append what `records` carry to the lists of `series` (in record order)."""
    for rec in records:
        event = rec.get("event")
        if event == "error":
            series.errors.append(rec)
            continue
        if event not in ("log", "eval"):
            continue
        step = _step(rec)
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
                series.evals.append((step, value))


# The trainer calls `diagnose` after every log line with the same growing list: scanning only the new records
# keeps a long run's alerts O(new records). Keyed by the list's id and checked by the identity of its first
# and last scanned records, so another list (or a rewritten one) is scanned from scratch.
_SCAN_CACHE: dict[int, tuple[int, Any, Any, Series]] = {}


def extract_series(records: Sequence[Mapping[str, Any]]) -> Series:
    n = len(records)
    cached = _SCAN_CACHE.get(id(records)) if isinstance(records, list) else None
    if cached is not None and 0 < cached[0] <= n and records[0] is cached[1] and records[cached[0] - 1] is cached[2]:
        done, raw = cached[0], cached[3]
    else:
        done, raw = 0, Series([], [], [], [], [], [])
    _scan(records[done:], raw)
    if isinstance(records, list) and n:
        _SCAN_CACHE.clear()  # one live run at a time; never grows
        _SCAN_CACHE[id(records)] = (n, records[0], records[n - 1], raw)
    # sorted copies: the cached lists stay in record order and are never handed out
    return Series(
        sorted(raw.train, key=lambda p: p[0]),
        sorted(raw.evals, key=lambda p: p[0]),
        sorted(raw.lr, key=lambda p: p[0]),
        sorted(raw.grad_norm, key=lambda p: p[0]),
        list(raw.nonfinite),
        list(raw.errors),
    )


# ---------------------------------------------------------------------------------------------------------
# Statistics (pure, on plain lists)


def _windows(values: Sequence[float], th: Thresholds) -> tuple[list[float], list[float]]:
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
    first, last = _windows(values, th)
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


def oscillation_stats(train: Sequence[tuple[int, float]], th: Thresholds) -> OscillationStats | None:
    if not enough_evidence(train, th):
        return None
    k = min(th.osc_recent_points, len(train) // 2 + 1)
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
    return OscillationStats(amp, flip_frac, progress, (train[-k][0], train[-1][0]))


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


# ---------------------------------------------------------------------------------------------------------
# Fix texts


def fmt_lr(value: float) -> str:
    """1e-4 rather than 0.0001 or 1.000000e-04: the way users type an LR."""
    if value >= 0.01:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _ctx(context: Mapping[str, Any] | None, key: str) -> Any:
    return None if context is None else context.get(key)


def _current_lr(series: Series, context: Mapping[str, Any] | None) -> float | None:
    lr = to_float(_ctx(context, "lr"))
    if lr is None and series.lr:
        lr = max(v for _, v in series.lr)
    return lr if lr is not None and lr > 0 and math.isfinite(lr) else None


def _resume_hint(context: Mapping[str, Any] | None) -> str:
    cmd = _ctx(context, "resume_command")
    return f" Resume with: {cmd}" if cmd else ""


def fix_raise_lr(lr: float | None) -> str:
    if lr:
        return f"raise --lr from {fmt_lr(lr)} to {fmt_lr(lr * 3)} (up to {fmt_lr(lr * 10)} for LoRA if it stays stable)"
    return "raise --lr by 3-10x (LoRA recovery usually trains at 1e-4 to 5e-4)"


def fix_lower_lr(lr: float | None, accum: int | None) -> str:
    acc = accum or 1
    lr_part = f"lower --lr from {fmt_lr(lr)} to {fmt_lr(lr / 3)}" if lr else "lower --lr by 3x"
    return f"{lr_part} or raise --gradient_accumulation_steps from {acc} to {acc * 4} (a larger, less noisy batch)"


# ---------------------------------------------------------------------------------------------------------
# Rules. Each takes the extracted series and returns an Anomaly or None.


def rule_nan_inf(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    if not series.nonfinite:
        return None
    step, key, value = series.nonfinite[0]
    good = [(s, v) for s, v in series.train if step is None or s < step]
    evidence: dict[str, Any] = {
        "first_bad_step": step,
        "key": key,
        "value": value,
        "count": len(series.nonfinite),
    }
    if good:
        evidence["last_finite_loss_step"], evidence["last_finite_loss"] = good[-1]
    lr = _current_lr(series, context)
    lr_part = f"restart with --lr {fmt_lr(lr / 10)} (10x lower than {fmt_lr(lr)})" if lr else "restart with a 10x lower --lr"
    fix = (
        f"stop the run: everything after step {step} is lost; keep the last checkpoint saved before step {step} "
        f"and {lr_part}, add warm-up (--warmup_steps) and gradient clipping (--max_grad_norm 1.0); in plain "
        "Trainer runs set --logging_nan_inf_filter false, its default hides NaN losses."
        + _resume_hint(context)
    )
    return Anomaly(
        "nan_inf", "error",
        f"{key} became {value} at step {step}: training diverged numerically.",
        evidence, fix, step,
    )


def rule_out_of_memory(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    ooms = [e for e in series.errors if e.get("kind") == "out_of_memory"]
    if not ooms:
        return None
    rec = ooms[0]
    step = _step(rec)
    block = to_float(_ctx(context, "block_size"))
    batch = to_float(_ctx(context, "per_device_train_batch_size"))
    accum = to_float(_ctx(context, "gradient_accumulation_steps")) or 1
    parts = [f"--block-size {int(block) // 2}" if block and block >= 2 else "a shorter --block-size (e.g. 512)"]
    parts.append("--gradient_checkpointing")
    if batch and batch > 1:
        b = max(1, int(batch) // 2)
        parts.append(
            f"--per_device_train_batch_size {b} with --gradient_accumulation_steps "
            f"{int(accum * batch // b)} (same total batch)"
        )
    else:
        parts.append("--per_device_train_batch_size 1 (raise --gradient_accumulation_steps to keep the total batch)")
    evidence = {"step": step, "message": str(rec.get("message", ""))[:300]}
    fix = "free memory with " + ", ".join(parts) + "." + _resume_hint(context)
    return Anomaly("out_of_memory", "error", f"out of memory at step {step}.", evidence, fix, step)


def rule_diverging(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    tr = trend_stats(series.train, th)
    if tr is None:
        return None
    values = [v for _, v in series.train]
    first, last = _windows(values, th)
    w = len(first)
    # at most ~100 window positions: the minimum of a smooth running median does not need every offset
    stride = max(1, (len(values) - w + 1) // 100)
    starts = [*range(0, len(values) - w + 1, stride), len(values) - w]
    medians = [statistics.median(values[i : i + w]) for i in starts]
    best = min(medians)
    best_step = series.train[starts[medians.index(best)] + w // 2][0]
    if values[0] < best:
        best, best_step = values[0], series.train[0][0]
    if best <= 0 or tr.last_median <= best * (1 + th.diverge_min_rel_rise):
        return None
    if tr.last_median - best <= th.diverge_noise_multiple * tr.noise:
        return None
    evidence = {
        "best_window_median": round(best, 4),
        "best_window_step": best_step,
        "last_window_median": round(tr.last_median, 4),
        "rel_rise": round(tr.last_median / best - 1, 4),
        "last_step": tr.last_step,
    }
    lr = _current_lr(series, context)
    fix = f"{fix_lower_lr(lr, _ctx(context, 'gradient_accumulation_steps'))}; add --max_grad_norm 1.0 and warm-up."
    msg = (
        f"train loss is rising: median {_fmt(tr.last_median)} over the last logs vs {_fmt(best)} "
        f"around step {best_step} (+{(tr.last_median / best - 1) * 100:.0f}%): the LR is too high."
    )
    return Anomaly("loss_diverging", "error", msg, evidence, fix, tr.last_step)


def rule_oscillating(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    os_ = oscillation_stats(series.train, th)
    if os_ is None:
        return None
    if not (
        os_.rel_amplitude >= th.osc_min_rel_amplitude
        and os_.sign_change_fraction >= th.osc_min_sign_changes
        and os_.progress <= th.osc_max_progress
    ):
        return None
    evidence = {
        "steps": list(os_.steps),
        "rel_amplitude": round(os_.rel_amplitude, 4),
        "sign_change_fraction": round(os_.sign_change_fraction, 3),
        "progress": round(os_.progress, 4),
    }
    lr = _current_lr(series, context)
    msg = (
        f"train loss oscillates between steps {os_.steps[0]} and {os_.steps[1]}: typical jump "
        f"{os_.rel_amplitude * 100:.0f}% of its level, direction flips {os_.sign_change_fraction * 100:.0f}% "
        "of the time, no progress: the LR is too high or the batch too small."
    )
    fix = fix_lower_lr(lr, _ctx(context, "gradient_accumulation_steps")) + "."
    return Anomaly("loss_oscillating", "warning", msg, evidence, fix, os_.steps[1])


def _longest_run(values: Sequence[float], pred) -> tuple[int, int]:
    """(length, end index) of the longest run of consecutive values where pred(prev, cur) holds."""
    best, best_end, cur = 1 if values else 0, 0, 1
    for i in range(1, len(values)):
        cur = cur + 1 if pred(values[i - 1], values[i]) else 1
        if cur > best:
            best, best_end = cur, i
    return best, best_end


def rule_frozen(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    """Exactly repeated losses or exactly zero gradients: no statistics needed, the model does not change."""
    n_same, end = _longest_run([v for _, v in series.train], lambda a, b: a == b)
    zero = [(s, v) for s, v in series.grad_norm]
    n_zero, zend = _longest_run([v for _, v in zero], lambda a, b: a == 0.0 and b == 0.0)
    if n_same >= th.flat_identical_points:
        step, value = series.train[end]
        evidence = {"identical_losses": n_same, "value": value, "until_step": step}
        what = f"the train loss is exactly {_fmt(value)} at {n_same} log lines in a row (until step {step})"
    elif zero and n_zero >= max(2, th.flat_identical_points // 2):
        step = zero[zend][0]
        evidence = {"zero_grad_norms": n_zero, "until_step": step}
        what = f"the gradient norm is exactly 0 at {n_zero} log lines in a row (until step {step})"
    else:
        return None
    lr = _current_lr(series, context)
    fix = (
        "the weights no longer change: check that parameters are trainable (LoRA --target-modules match the "
        "model), the labels are not all masked, and the LR is sane"
        + (f" (--lr {fmt_lr(lr)}: an absurd LR saturates the network; restart from the last good checkpoint "
           f"with --lr {fmt_lr(lr / 1000)} or lower)" if lr and lr >= 0.1 else "")
        + "."
    )
    return Anomaly("loss_flat", "error", f"{what}: the model is not learning.", evidence, fix, step)


def rule_flat_or_slow(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    frozen = rule_frozen(series, th, context)
    if frozen is not None:
        return frozen
    warm = warmup_end_index(series.lr) if series.lr else 0
    if warm is None:
        return None  # still warming up: a flat loss is expected while the LR climbs
    tr = trend_stats(series.train, th)
    if tr is None or len(series.train) - warm < th.min_train_points // 2:
        return None
    evidence = {
        "first_window_median": round(tr.first_median, 4),
        "last_window_median": round(tr.last_median, 4),
        "rel_drop": round(tr.rel_change, 4),
        "steps": [tr.first_step, tr.last_step],
        "points": tr.n,
    }
    lr = _current_lr(series, context)
    span = f"steps {tr.first_step}-{tr.last_step}"
    evidence["noise"] = round(tr.noise, 5)
    change = abs(tr.first_median - tr.last_median)
    quiet = tr.noise <= th.flat_quiet_noise * abs(tr.first_median)
    if abs(tr.rel_change) < th.flat_max_rel_change or (quiet and change < th.flat_noise_multiple * tr.noise):
        msg = (
            f"train loss is flat: {_fmt(tr.first_median)} -> {_fmt(tr.last_median)} over {span} "
            f"({tr.rel_change * 100:+.2f}%): the model is not learning."
        )
        fix = (
            "check the data and configuration: labels not all -100/padding, trainable parameters > 0 "
            "(LoRA --target-modules match the model), LR not 0, the dataset not a repeated/empty text; "
            f"then {fix_raise_lr(lr)} if all of that is right."
        )
        return Anomaly("loss_flat", "error", msg, evidence, fix, tr.last_step)
    late_share = tr.second_half_drop / tr.first_half_drop if tr.first_half_drop > 0 else math.inf
    evidence["late_share"] = round(late_share, 3) if math.isfinite(late_share) else None
    significant = tr.first_median - tr.last_median > th.slow_min_significance * tr.noise / math.sqrt(tr.window)
    if (
        0 < tr.rel_change < th.slow_max_rel_drop
        and significant
        and tr.second_half_drop > 0
        and late_share >= th.slow_min_late_share
    ):
        per100 = tr.rel_change / max(1, tr.last_step - tr.first_step) * 100
        evidence["rel_drop_per_100_steps"] = round(per100, 5)
        msg = (
            f"train loss falls too slowly: {_fmt(tr.first_median)} -> {_fmt(tr.last_median)} over {span} "
            f"(-{tr.rel_change * 100:.1f}%, {per100 * 100:.2f}% per 100 steps) and still falling at the same "
            "pace: the LR is too low."
        )
        return Anomaly("loss_slow", "warning", msg, evidence, fix_raise_lr(lr) + ".", tr.last_step)
    return None


def rule_overfitting(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    evals = series.evals
    k = th.overfit_consecutive_rises
    if len(evals) < max(th.overfit_min_evals, k + 1):
        return None
    tail = evals[-(k + 1) :]
    if not all(b[1] > a[1] for a, b in zip(tail, tail[1:], strict=False)):
        return None
    best_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    if best <= 0 or last < best * (1 + th.overfit_min_rel_rise):
        return None
    train_start = train_loss_near(series.train, tail[0][0])
    train_end = train_loss_near(series.train, last_step)
    if train_start is None or train_end is None:
        return None
    train_change = (train_end - train_start) / abs(train_start) if train_start else 0.0
    if train_change > th.overfit_train_max_rel_change:
        return None  # both rising: that is divergence, not overfitting
    evidence = {
        "best_eval_step": best_step,
        "best_eval_loss": round(best, 4),
        "eval_steps": [s for s, _ in tail],
        "eval_losses": [round(v, 4) for _, v in tail],
        "train_loss_start": round(train_start, 4),
        "train_loss_end": round(train_end, 4),
    }
    dropout = to_float(_ctx(context, "lora_dropout"))
    epochs = to_float(_ctx(context, "epochs"))
    parts = [
        f"raise --lora_dropout from {dropout:g} to {min(0.5, max(0.1, dropout * 2)):g}" if dropout is not None
        else "raise --lora_dropout (e.g. 0.1)",
        f"train fewer epochs (--epochs {max(1, int(epochs) // 2)} instead of {epochs:g})" if epochs and epochs > 1
        else "train fewer steps",
        f"or stop early and keep the best checkpoint (step {best_step}; --load_best_model_at_end "
        "--metric_for_best_model eval_loss)",
        "more training text (--max-train-samples) helps most",
    ]
    msg = (
        f"eval loss rose {k} evaluations in a row to {_fmt(last)} at step {last_step} "
        f"(best {_fmt(best)} at step {best_step}) while train loss went {_fmt(train_start)} -> {_fmt(train_end)}."
    )
    return Anomaly("overfitting", "warning", msg, evidence, "; ".join(parts) + ".", last_step)


def rule_far_above(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    k = th.far_consecutive_evals
    if len(series.evals) < k or not series.train:
        return None
    tail = [(step, ev, train_loss_near(series.train, step)) for step, ev in series.evals[-k:]]
    if any(tr is None or tr <= 0 for _, _, tr in tail):
        return None
    if not all(ev - tr > th.far_min_gap and ev / tr > th.far_min_ratio for _, ev, tr in tail):
        return None
    step, ev, tr = tail[-1]
    evidence = {
        "eval_steps": [s for s, _, _ in tail],
        "eval_losses": [round(e, 4) for _, e, _ in tail],
        "train_losses": [round(t, 4) for _, _, t in tail],
        "gap_nats": round(ev - tr, 4),
        "perplexity_ratio": round(math.exp(min(ev - tr, 50.0)), 3),
    }
    msg = (
        f"eval loss {_fmt(ev)} is far above train loss {_fmt(tr)} at step {step} "
        f"(gap {ev - tr:.2f} nats, perplexity x{math.exp(min(ev - tr, 50.0)):.2f})."
    )
    dropout = to_float(_ctx(context, "lora_dropout"))
    fix = (
        "check that train and eval text come from the same distribution (--dataset and its eval split); "
        "if they do, the model memorises the train set: "
        + (f"raise --lora_dropout from {dropout:g} to {min(0.5, max(0.1, dropout * 2)):g}" if dropout is not None
           else "raise --lora_dropout")
        + ", use more training text (--max-train-samples) or fewer epochs."
    )
    return Anomaly("eval_far_above_train", "warning", msg, evidence, fix, step)


def rule_no_eval(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    if series.evals or not series.train:
        return None
    if any(k == "eval_loss" for _, k, _ in series.nonfinite):
        return None
    last = series.train[-1][0]
    msg = f"the run finished at step {last} without a single evaluation: overfitting cannot be seen."
    fix = (
        "evaluate during training: --eval_strategy steps --eval_steps "
        f"{max(10, last // 10)} (and --max-eval-samples 128 to keep it quick)."
    )
    return Anomaly("no_eval", "warning", msg, {"last_step": last, "train_points": len(series.train)}, fix, last)


LIVE_RULES = (
    rule_out_of_memory,
    rule_nan_inf,
    rule_diverging,
    rule_oscillating,
    rule_flat_or_slow,
    rule_overfitting,
    rule_far_above,
)
FINAL_RULES = (rule_no_eval,)


def anomalies_from_alerts(records: Sequence[Mapping[str, Any]], known: Sequence[Anomaly] = ()) -> list[Anomaly]:
    """`alert` records of kinds not in `known`, as Anomalies (first of each kind): what the run itself saw
    live, e.g. non-finite weights caught before a NaN loss was ever logged."""
    seen = {a.kind for a in known}
    out = []
    for rec in records:
        kind, severity = rec.get("kind"), rec.get("severity")
        if rec.get("event") != "alert" or kind not in ANOMALY_KINDS or kind in seen:
            continue
        seen.add(kind)
        evidence = rec.get("evidence")
        out.append(Anomaly(
            kind, severity if severity in SEVERITIES else "warning", str(rec.get("message", "")),
            dict(evidence) if isinstance(evidence, Mapping) else {"recorded": evidence} if evidence else {},
            str(rec.get("fix", "")), _step(rec),
        ))
    return out


def diagnose(
    records: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = Thresholds(),
    final: bool = False,
    context: Mapping[str, Any] | None = None,
) -> list[Anomaly]:
    """Every anomaly the records show, most severe first. `final=True` adds end-of-run rules (`no_eval`).

    `context` (optional) carries the run's settings so fixes name values: lr, block_size,
    per_device_train_batch_size, gradient_accumulation_steps, lora_dropout, epochs, resume_command.
    """
    series = extract_series(records)
    found: list[Anomaly] = []
    rules = LIVE_RULES + (FINAL_RULES if final else ())
    for rule in rules:
        anomaly = rule(series, thresholds, context)
        if anomaly is not None:
            found.append(anomaly)
    kinds = {a.kind for a in found}
    if "nan_inf" in kinds:
        # After a NaN the finite losses left are the pre-divergence part of the run: trend verdicts on them
        # would only repeat the NaN story with a weaker word.
        found = [a for a in found if a.kind not in ("loss_flat", "loss_slow")]
    if kinds & {"nan_inf", "out_of_memory"}:
        found = [a for a in found if a.kind != "no_eval"]  # the run died; the missing eval is not the story
    if kinds & {"loss_diverging", "loss_oscillating"}:
        # A window median of a jumping series says nothing about progress; the LR story is the one to tell.
        found = [a for a in found if a.kind not in ("loss_slow", "loss_flat")]
    found.sort(key=lambda a: (a.severity != "error", ANOMALY_KINDS.index(a.kind)))
    return found


# ---------------------------------------------------------------------------------------------------------
# Verdicts and ratings for the report


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
    thresholds: Thresholds = Thresholds(),
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
    thresholds: Thresholds = Thresholds(),
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


def describe() -> str:
    """Markdown of the anomaly vocabulary and every threshold with its default and meaning, read from this
    module's source so the documentation cannot drift from the code (RULES.md is this text)."""
    import ast
    import inspect

    lines = ["# Diagnosis rules (`prunetune.analysis.rules`)", "",
             "Generated by `python -m prunetune.analysis.rules`; used live by `prunetune finetune` and by "
             "`prunetune report`.", "", "## Anomaly kinds", "", "| kind | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {KIND_DOCS[k]} |" for k in ANOMALY_KINDS]
    lines += ["", "## Thresholds (`Thresholds` fields; override with `--threshold NAME=VALUE` in report, "
              "`--alert-threshold NAME=VALUE` in finetune)", "", "| name | default | meaning |", "|---|---|---|"]
    body = ast.parse(inspect.getsource(Thresholds)).body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = body[i + 1] if i + 1 < len(body) else None
            text = doc.value.value if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) else ""
            text = " ".join(str(text).split()).replace("|", "\\|")
            lines.append(f"| `{node.target.id}` | {ast.unparse(node.value)} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(describe(), end="")
