"""Diagnosis rules: pure functions over a sequence of `prunetune.rundir.records` dicts.

The same code judges a run live (`finetune` calls `diagnose(records_so_far)` after every log/eval record and
prints each alert kind once) and after the fact (`prunetune report`). Hence two design constraints:

- robust statistics (medians of windows, not single points), so one noisy log line never raises an alert and
  an alert, once raised, does not vanish at the next log line;
- minimum evidence (points, evals, steps) before any trend rule speaks.

The trend rules read the shape of the curve, not two windows: the train curve is judged after its warm-up
(from the logged LR, else the configured warm-up), against its own noise; a blow-up after the first updates is
a divergence however the curve drifts later; "too slow" compares the pace after warm-up per unit of LR and
stays quiet once the eval loss has bottomed. A run still going is judged against the steps its plan has left
(an early stretch of a long run is no evidence of a flat or slow run); a run whose end or stop the records show,
on what it did. At the end of a run the live oscillation rule is replayed over it, so a report says what the
live alerts would have said.

Anomaly kinds (`ANOMALY_KINDS`, the vocabulary of `report.json` and of `alert` records):

- `loss_flat`           (error)   train loss does not move at all: data or configuration broken (labels
                                  masked, LR 0, frozen parameters, the same batch repeated...).
- `loss_slow`           (warning) train loss falls, but too little and still at its LR-limited pace at the end
                                  (no plateau reached, the eval loss not bottomed): the LR is too low.
- `loss_oscillating`    (warning) train loss jumps up and down by a large fraction of its level without
                                  progress: the LR is too high or the batch too small.
- `loss_diverging`      (error)   train loss blew up above where it started, or ends clearly above its best:
                                  the LR is far too high.
- `overfitting`         (warning) eval loss rises over consecutive evaluations after its minimum while train
                                  loss does not, or the train loss converged near zero.
- `eval_far_above_train` (warning) eval loss stays far above the train loss at the same step.
- `nan_inf`             (error)   a NaN/Inf loss, grad norm or eval loss: training diverged numerically.
- `out_of_memory`       (error)   the run died of an out-of-memory error (an `error` record of that kind).
- `no_eval`             (info)    a note, not an alarm: the run finished without a single evaluation, so
                                  overfitting cannot be seen (only with `final=True`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from prunetune.analysis import fixes
from prunetune.analysis.anomaly import ANOMALY_KINDS, SEVERITIES, Anomaly, anomalies_from_alerts
from prunetune.analysis.context import Fact, FixContext
from prunetune.analysis.series import (
    OscillationStats,
    Series,
    SeriesBuilder,
    TrendStats,
    extract_series,
    head_level,
    lr_exposure,
    noise_sigma,
    oscillation_stats,
    record_step,
    running_medians,
    train_loss_near,
    trend_stats,
    trend_z,
    warmup_end,
    windows,
)
from prunetune.analysis.thresholds import DEFAULTS, Thresholds
from prunetune.fmt import fmt_lr, fmt_sig

Rule = Callable[[Series, Thresholds, FixContext], Anomaly | None]
"""A rule: the run's series, the thresholds and what is known of its settings -> an anomaly or None."""


def _anomaly(kind: str, severity: str, message: str, evidence: dict[str, Any], fix: fixes.Fix,
             step: int | None) -> Anomaly:
    return Anomaly(kind, severity, message, evidence, fix.text, step, fix.basis)


def _lr(series: Series, ctx: FixContext) -> Fact | None:
    """The run's LR: configured where a source states it, else the peak the log reports."""
    if ctx.lr is not None:
        return ctx.lr
    if not series.lr:
        return None
    step, peak = max(series.lr, key=lambda p: p[1])
    return Fact(peak, f"the peak learning rate the log reports, step {step}") if peak > 0 else None


def _at(series: Series, step: int | None) -> str:
    """`step 80`, `about step 4687 (estimated from the log, which states no step)`, or `an unknown step`."""
    if step is None:
        return "an unknown step"
    return f"about step {step} (estimated: the log states no step)" if step in series.estimated else f"step {step}"


def _warmup(series: Series, ctx: FixContext) -> int | None:
    """Index of the first train point after the warm-up (None while the logged LR still rises)."""
    configured = ctx.value("warmup_steps")
    if not configured and ctx.value("warmup_ratio") and ctx.value("max_steps"):
        configured = ctx.value("warmup_ratio") * ctx.value("max_steps")
    return warmup_end(series.train, series.lr, int(configured) if configured else None)


def _steps_left(series: Series, ctx: FixContext) -> tuple[int, int] | None:
    """(last step logged, planned steps) while the run is still going and has steps left by its plan (the
    records' or the settings' max_steps): a live run is judged against what it has left. None once the records
    show its end or its stop (what it did is then all there is: a user often stops a run because it looks
    wrong), for an excerpt that states no plan, a log without steps (a step estimated from the epoch is on the
    plan's scale; one read from the line order states no plan)."""
    planned = series.max_steps or ctx.value("max_steps")
    if not series.train or not planned or series.ended or series.stopped:
        return None
    last = series.train[-1][0]
    return (last, int(planned)) if 0 < last < planned else None


def _warmup_seen(series: Series) -> str | None:
    """The basis line for a warm-up the log shows (a rising LR at the start)."""
    if len(series.lr) >= 2 and series.lr[1][1] > series.lr[0][1]:
        i = 1
        while i + 1 < len(series.lr) and series.lr[i + 1][1] > series.lr[i][1]:
            i += 1
        return f"a warm-up the log shows (LR rising until step {series.lr[i][0]})"
    return None


# ---------------------------------------------------------------------------------------------------------
# Rules. Each takes the extracted series and returns an Anomaly or None.


def rule_nan_inf(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    if not series.nonfinite:
        return None
    step, key, value = series.nonfinite[0]
    good = [(s, v) for s, v in series.train if step is None or s < step]
    evidence: dict[str, Any] = {"first_bad_step": step, "key": key, "value": value, "count": len(series.nonfinite)}
    if step in series.estimated:
        evidence["step_estimated"] = True
    if good:
        evidence["last_finite_loss_step"], evidence["last_finite_loss"] = good[-1]
    signs: list[str] = []
    if series.zero_loss_bad_grad:
        zero = series.zero_loss_bad_grad[0]
        signs.append(f"a loss of exactly 0.0 beside a non-finite grad norm at {_at(series, zero)} (the log)")
        evidence["zero_loss_with_nonfinite_grad"] = len(series.zero_loss_bad_grad)
    if ctx.value("precision") == "fp16":
        signs.append(fixes.stated("precision fp16:", ctx.precision) or "")
    fix = fixes.nan_inf(ctx, step, _lr(series, ctx), tuple(s for s in signs if s))
    cause = " (the fp16 overflow signature)" if series.zero_loss_bad_grad else ""
    return _anomaly("nan_inf", "error", f"{key} became {value} at {_at(series, step)}{cause}: training diverged "
                    "numerically.", evidence, fix, step)


def rule_out_of_memory(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    ooms = [e for e in series.errors if e.get("kind") == "out_of_memory"]
    if not ooms:
        return None
    rec = ooms[0]
    step = record_step(rec)
    ran = step is not None and any(s <= step for s, _ in series.train) and step > 0
    during_eval = rec.get("during") == "evaluation"
    evidence = {"step": step, "message": str(rec.get("message", ""))[:300], "steps_ran_before": ran}
    if rec.get("step_basis"):
        evidence["step_basis"] = rec["step_basis"]
    if during_eval:
        evidence["during"] = "evaluation"
    max_steps = series.max_steps or ctx.value("max_steps")
    where = (f"at step {step}" + (f" of {max_steps}" if max_steps else "") if step is not None else
             "at an unknown step (the log shows no progress before the error)")
    what = " during an evaluation" if during_eval else ""
    if rec.get("after_training"):
        evidence["after_training"] = True
        msg = (f"out of memory after training had ended ({where.removeprefix('at ')}): what ran next (an "
               "evaluation, generation, the next notebook cell) did not fit; the training itself finished.")
    else:
        msg = f"out of memory {where}{what}" + (": the steps before it fit." if ran else ".")
    fix = fixes.out_of_memory(ctx, step, ran, during_eval)
    return _anomaly("out_of_memory", "error", msg, evidence, fix, step)


def _blowup(series: Series, th: Thresholds) -> tuple[int, float, float] | None:
    """(step, peak, level before) when the loss climbed far above where it was: the median of `blowup_points`
    consecutive points above `blowup_factor` x the level before them (the first log, the model before any
    update, while the climb starts within the first points; else the median of the points before it, since one
    low first batch of a noisy run is no level), by a factor beyond the run's relative noise."""
    values = [v for _, v in series.train]
    k = th.blowup_points
    if len(values) < k + 1 or values[0] <= 0 or max(values) < values[0] * th.blowup_factor:
        return None
    # the noise on the log scale: a blow-up is a rise by a factor, judged against the run's relative jitter
    sigma = noise_sigma([math.log(max(v, 1e-12)) for v in values])
    for i in range(1, len(values) - k + 1):
        climbed = statistics.median(values[i : i + k])
        if climbed < values[0] * th.blowup_factor:
            continue  # the level before is at least the first log: no climb from it either
        before = values[0] if i < k else max(values[0], statistics.median(values[:i]))
        if before > 0 and climbed >= before * th.blowup_factor \
                and math.log(climbed / before) > th.blowup_noise_multiple * sigma:
            stretch = range(i, min(len(values), i + max(k, len(values) // 4)))
            top = max(stretch, key=values.__getitem__)
            return series.train[top][0], values[top], before
    return None


def _steps_known(series: Series) -> bool:
    """Whether the train steps are the log's own (not the ordinal of a line that states none)."""
    return not series.train or series.train[-1][0] not in series.estimated


def _both_rose(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """Train and eval loss both ended `blowup_factor` above their first values: a divergence however few the
    points (per-epoch tables log two or three)."""
    if len(series.train) < 2 or len(series.evals) < 2 or len(series.train) >= th.min_train_points:
        return None
    (s0, t0), (s1, t1) = series.train[0], series.train[-1]
    e0, e1 = series.evals[0][1], series.evals[-1][1]
    if min(t0, e0) <= 0 or t1 < t0 * th.blowup_factor or e1 < e0 * th.blowup_factor:
        return None
    evidence = {"first_train_loss": t0, "last_train_loss": t1, "first_eval_loss": e0, "last_eval_loss": e1}
    msg = (f"train loss {fmt_sig(t0)} -> {fmt_sig(t1)} and eval loss {fmt_sig(e0)} -> {fmt_sig(e1)} between step {s0} "
           f"and step {s1}: both rose x{min(t1 / t0, e1 / e0):.1f}, the run diverged: the LR is too high.")
    return _anomaly("loss_diverging", "error", msg, evidence, fixes.diverging(ctx, _lr(series, ctx),
                                                                             _warmup_seen(series)), s1)


def _to_infinity(series: Series, ctx: FixContext) -> Anomaly | None:
    """The train loss became +Inf and no finite loss followed: it diverged to infinity (a NaN alone is not
    counted: it may be a bad batch or a 0/0; an Inf the run came back from was one overflowing batch)."""
    inf = next(((step, key) for step, key, value in series.nonfinite if key == "loss" and value == "inf"), None)
    if inf is None or inf[0] is None or any(s > inf[0] for s, _ in series.train):
        return None
    step = inf[0]
    evidence: dict[str, Any] = {"inf_step": step}
    came = ""
    if series.train:
        (last_step, last), first = series.train[-1], series.train[0][1]
        evidence.update(last_finite_loss=last, last_finite_step=last_step)
        came = (f" from {fmt_sig(first)} at the first log over" if len(series.train) > 1 else " from") + \
            f" {fmt_sig(last)} at {_at(series, last_step)}"
    msg = (f"train loss went{came} to inf at {_at(series, step)}, and no finite loss came after it: the run diverged: "
           "the LR is too high.")
    return _anomaly("loss_diverging", "error", msg, evidence,
                    fixes.diverging(ctx, _lr(series, ctx), _warmup_seen(series)), step)


def _grad_growth(series: Series, th: Thresholds) -> float | None:
    """How many times the grad norm's last window median exceeds its first window median (None without enough
    grad norms): an order of magnitude says the optimizer has left the stable region."""
    norms = [g for _, g in series.grad_norm]
    if len(norms) < 2 * th.min_window:
        return None
    first, last = windows(norms, th)
    base = statistics.median(first)
    return statistics.median(last) / base if base > 0 else None


def _climb_from_low(series: Series, th: Thresholds) -> tuple[int, float, int, float] | None:
    """(low step, low, last step, last) when every log since the run's lowest loss (at least `blowup_points`
    of them) was higher than the one before and the last is `blowup_factor` above the low, by a factor beyond
    `blowup_noise_multiple` sigma of the log-loss noise: a sustained climb after the loss had come down, which
    the blow-up test (a climb above the first log) misses once a run has fallen far (15.5 -> 1.43 -> 10) and
    window medians of a sparse log (a few points a run) average away."""
    values = [v for _, v in series.train]
    low_i = min(range(len(values)), key=values.__getitem__)
    after, low = values[low_i:], values[low_i]
    if len(after) <= th.blowup_points or low <= th.overfit_memorise_loss or after[-1] < low * th.blowup_factor:
        return None
    if any(b <= a for a, b in zip(after, after[1:], strict=False)):
        return None
    sigma = noise_sigma([math.log(max(v, 1e-12)) for v in values])
    if math.log(after[-1] / low) <= th.blowup_noise_multiple * sigma:
        return None
    return series.train[low_i][0], low, series.train[-1][0], after[-1]


def _blowup_anomaly(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """A blow-up above the first log, or a sustained climb from the run's low."""
    fix = fixes.diverging(ctx, _lr(series, ctx), _warmup_seen(series))
    blown = _blowup(series, th)
    if blown is not None:
        step, peak, first = blown
        last_step, last = series.train[-1]
        evidence = {"first_loss": round(first, 4), "peak_loss": round(peak, 4), "peak_step": step,
                    "factor": round(peak / first, 2), "last_loss": round(last, 4), "last_step": last_step}
        big_grads = [g for s, g in series.grad_norm if s <= step + 1]
        if big_grads:
            evidence["max_grad_norm_until_peak"] = round(max(big_grads), 4)
        msg = (f"train loss blew up: {fmt_sig(first)} at the first log -> {fmt_sig(peak)} at step {step} "
               f"(x{peak / first:.1f}); it ended at {fmt_sig(last)} at step {last_step}, but a drift down from a "
               "blow-up is the optimizer recovering from damage, not a healthy fall: the LR is too high.")
        return _anomaly("loss_diverging", "error", msg, evidence, fix, step)
    climb = _climb_from_low(series, th)
    if climb is None:
        return None
    low_step, low, last_step, last = climb
    # the event is the first log above the low by the blow-up factor: where the climb became a divergence
    step = next(s for s, v in series.train if s > low_step and v >= low * th.blowup_factor)
    evidence = {"low_loss": round(low, 4), "low_step": low_step, "last_loss": round(last, 4), "last_step": last_step,
                "factor": round(last / low, 2), "first_step_above": step}
    msg = (f"train loss climbed at every log since its low {fmt_sig(low)} at step {low_step}, to {fmt_sig(last)} at "
           f"step {last_step} (x{last / low:.1f}): the run is diverging: the LR is too high.")
    return _anomaly("loss_diverging", "error", msg, evidence, fix, step)


def rule_diverging(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    infinite = _to_infinity(series, ctx)
    if infinite is not None:
        return infinite
    blown = _blowup_anomaly(series, th, ctx) if len(series.train) >= th.min_train_points else None
    if blown is not None:
        return blown
    both = _both_rose(series, th, ctx)
    if both is not None:
        return both
    return _climbed_back(series, th, ctx)


def _climbed_back(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """The last window's median above the best running window median (or the untrained model's loss) by
    `diverge_min_rel_rise` and beyond the noise, or with gradients grown by an order of magnitude."""
    tr = trend_stats(series.train, th, _steps_known(series))
    if tr is None:
        return None
    values = [v for _, v in series.train]
    first, _ = windows(values, th)
    w = len(first)
    medians = running_medians(values, w)
    stride = max(1, (len(values) - w + 1) // 100)
    starts = [*range(0, len(values) - w + 1, stride), len(values) - w]
    best = min(medians)
    best_step = series.train[starts[medians.index(best)] + w // 2][0]
    start = head_level(values, th)  # the untrained model's loss, to the precision the noise allows
    if start < best:
        best, best_step = start, series.train[0][0]
    if best <= 0 or tr.last_median <= best * (1 + th.diverge_min_rel_rise):
        return None
    # a divergence gives back a real share of what the run had gained (every one in the corpora went back to
    # or above its start); a climb that undoes a few percent of it is the creep of a memorised or multi-epoch
    # run: near zero, 0.009 -> 0.014 after a fall from 4.3 (0.1%: rounding jitter), or a loss that stepped down
    # at an epoch boundary creeping 0.40 -> 0.44 through the last epoch after a fall from 1.1 (6%) while the
    # LR decays to 0; a ratio of the run's own changes, free of its scale. Unless the gradients grew by an
    # order of magnitude: that is independent evidence of the instability
    growth = _grad_growth(series, th)
    exploding = growth is not None and growth >= th.diverge_grad_growth
    undone = (tr.last_median - best) / (start - best) if start > best else math.inf
    if not exploding and undone < th.diverge_min_undone:
        return None
    # beyond the noise of a difference of two window medians (1.25 sigma sqrt(2 / w)), so the low points of an
    # oscillation or of batch-1 noise are not read as a rise; unless the gradients grew by an order of
    # magnitude, and a loss back above its best says the optimizer no longer reduces it
    se = 1.2533 * noise_sigma(values) * math.sqrt(2 / w)
    if not exploding and tr.last_median - best <= th.diverge_noise_multiple * se:
        return None
    evidence = {
        "best_window_median": round(best, 4),
        "best_window_step": best_step,
        "last_window_median": round(tr.last_median, 4),
        "rel_rise": round(tr.last_median / best - 1, 4),
        "share_of_fall_undone": round(undone, 3) if math.isfinite(undone) else None,
        "last_step": tr.last_step,
    }
    if exploding:
        evidence["grad_norm_growth"] = round(growth, 2)
    fix = fixes.diverging(ctx, _lr(series, ctx), _warmup_seen(series))
    msg = (
        f"train loss is rising: median {fmt_sig(tr.last_median)} over the last logs vs {fmt_sig(best)} "
        f"around step {best_step} (+{(tr.last_median / best - 1) * 100:.0f}%)"
        + (f" while the gradient norm grew x{growth:.0f}" if exploding else "") + ": the LR is too high."
    )
    return _anomaly("loss_diverging", "error", msg, evidence, fix, tr.last_step)


def _oscillates(train: Sequence[tuple[int, float]], th: Thresholds) -> OscillationStats | None:
    """The oscillation statistics of the latest points of `train` when they show one: a quarter of the jumps
    (and at least `osc_min_large_jumps`) large on the log scale, or a regular saw-tooth without progress."""
    os_ = oscillation_stats(train, th)
    if os_ is None or os_.level < th.osc_min_level:
        return None
    swinging = os_.log_jump >= th.osc_min_log_jump and os_.large_jumps >= th.osc_min_large_jumps
    sawtooth = (
        os_.rel_amplitude >= th.osc_min_rel_amplitude
        and os_.sign_change_fraction >= th.osc_min_sign_changes
        and os_.progress <= th.osc_max_progress
    )
    return os_ if swinging or sawtooth else None


def _oscillating(series: Series, os_: OscillationStats, ctx: FixContext, earlier: bool = False) -> Anomaly:
    evidence = {
        "steps": list(os_.steps),
        "points": os_.points,
        "log_jump_p75": round(os_.log_jump, 4),
        "large_jumps": os_.large_jumps,
        "rel_amplitude": round(os_.rel_amplitude, 4),
        "sign_change_fraction": round(os_.sign_change_fraction, 3),
        "progress": round(os_.progress, 4),
    }
    if os_.log_jump > 0:
        swing = (f"a quarter of the log points jump by {(math.exp(os_.log_jump) - 1) * 100:.0f}% or more from the "
                 "previous one (")
    else:
        swing = "the loss reaches zero or below, so its jumps are read against its mean level ("
    msg = (
        f"train loss {'oscillated' if earlier else 'oscillates'} between steps {os_.steps[0]} and {os_.steps[1]}: "
        f"{swing}median jump {os_.rel_amplitude * 100:.0f}% of its level, direction flips "
        f"{os_.sign_change_fraction * 100:.0f}% of the time)" + ("; the later logs no longer do" if earlier else "")
        + ": the LR is too high or the batch too small."
    )
    if earlier:
        evidence["until_step_then_calm"] = os_.steps[1]
    fix = fixes.lower_lr(ctx, _lr(series, ctx))
    return _anomaly("loss_oscillating", "warning", msg, evidence, replace(fix, text=fix.text + "."), os_.steps[1])


def rule_oscillating(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    os_ = _oscillates(series.train, th)
    return _oscillating(series, os_, ctx) if os_ is not None else None


def rule_oscillated(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """End of run: an oscillation the live rule would have raised at an earlier point, though the latest points
    are calm (a finetune run raised it then; a foreign log's report replays the live rule over the run). The
    stretch reported spans every window that oscillated; its statistics are those of the widest one."""
    n = len(series.train)
    if n <= th.min_train_points or _oscillates(series.train, th) is not None:
        return None  # the live rule judges the whole run (and says so itself)
    stride = max(1, (n - th.min_train_points) // 200)  # ~200 points of view: a stretch that oscillates is longer
    found = [os_ for end in range(th.min_train_points, n, stride) if (os_ := _oscillates(series.train[:end], th))]
    if not found:
        return None
    widest = max(found, key=lambda o: o.points)
    span = (min(o.steps[0] for o in found), max(o.steps[1] for o in found))
    return _oscillating(series, replace(widest, steps=span), ctx, earlier=True)


def _longest_run(values: Sequence[float], pred) -> tuple[int, int]:
    """(length, end index) of the longest run of consecutive values where pred(prev, cur) holds."""
    best, best_end, cur = 1 if values else 0, 0, 1
    for i in range(1, len(values)):
        cur = cur + 1 if pred(values[i - 1], values[i]) else 1
        if cur > best:
            best, best_end = cur, i
    return best, best_end


def _converged(series: Series, th: Thresholds) -> tuple[int, float, float] | None:
    """(step, loss, start) where the train loss reached near zero after a much higher start: a memorised training set
    (printed with 4 decimals, its losses then repeat exactly), which no flat or oscillation verdict describes.
    Judged on the lowest running median of `min_window` points, so a run that memorised and then crept back up
    at a constant high LR (0.025 -> 0.06-0.09) is still one that memorised."""
    values = [v for _, v in series.train]
    w = max(th.min_window, len(values) // 20)  # per-step losses swing to ~0 alone: a low must hold a while
    if len(values) < w * 2 or min(values) < -th.memorise_negative_tolerance or min(values) > th.flat_converged_loss:
        return None  # a loss below zero is no cross-entropy; no window's median lies below the run's minimum
    if _zero_at_once(values, th):
        return None
    # where it started: its first logged loss, or its first window's median if higher (with a log every 500
    # steps the first window already holds the memorised losses: 0.474, 0.026, 0.014, ...)
    head = max(values[0], statistics.median(values[:w]))
    stride = max(1, (len(values) - 2 * w) // 200)  # at most ~200 windows: the low of a smooth curve needs no more
    lows = [(statistics.median(values[i : i + w]), i) for i in range(w, len(values) - w + 1, stride)]
    low, i = min(lows)
    # the lowest of many window medians of a noisy curve can be its noise's low tail, not a level the loss holds
    # (4-example batches swinging 0.009-1.0 have a 5-point median of 0.03 and a median of 0.26 after it): a
    # memorised run stays near zero from its low on (`osc_min_level`), creeping back up or not, over two
    # windows at least (a low in the latest points of a run still going is judged with the points before it)
    if statistics.median(values[min(i, len(values) - 2 * w) :]) > th.osc_min_level:
        return None
    if low <= th.flat_converged_loss and head >= th.overfit_memorise_drop * max(low, 1e-4):
        return series.train[i + w // 2][0], low, head
    return None


def _zero_at_once(values: Sequence[float], th: Thresholds) -> bool:
    """The loss is exactly 0.0 at every log after its first: it went from its start to nothing with no log on
    the way down, which is no memorisation (that is a descent, and its printed digits keep moving: 0.0002,
    0.0001) but a loss that stopped measuring anything (no label tokens counted, non-finite losses dropped from
    the log): the model learns nothing from it (`rule_frozen` says so once `flat_identical_points` repeat)."""
    return len(values) > 2 and values[0] > th.flat_converged_loss and all(v == 0.0 for v in values[1:])


def _repeated_block(train: Sequence[tuple[int, float]], length: int) -> tuple[tuple[int, int], int] | None:
    """((first index, repeat index), length) of the longest stretch of `length` or more train losses that an
    earlier stretch repeats exactly, value for value (a later epoch that replays an earlier one: frozen
    weights on the same batches), or None. Stretches of few distinct values or of losses printed with fewer
    than 3 significant digits never count (a converged 0.0002, 0.0002 is not a replay)."""
    values = [v for _, v in train]
    first_seen: dict[float, int] = {}
    best = None
    for i, v in enumerate(values):
        j = first_seen.setdefault(v, i)
        if j == i or (values[i - 1] == values[j - 1] and j > 0):
            continue  # first sight of the value, or inside a stretch already measured from its start
        n = 0
        while i + n < len(values) and j + n < i and values[j + n] == values[i + n]:
            n += 1
        block = values[i : i + n]
        if n >= length and (best is None or n > best[1]) and len(set(block)) >= length // 2 \
                and all(len(f"{x:g}".replace(".", "").lstrip("0-")) >= 3 for x in block):
            best = ((j, i), n)
    return best


def rule_frozen(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """Exactly repeated losses or exactly zero gradients: no statistics needed, the model does not change."""
    n_same, end = _longest_run([v for _, v in series.train], lambda a, b: a == b)
    zero = list(series.grad_norm)
    n_zero, zend = _longest_run([v for _, v in zero], lambda a, b: a == 0.0 and b == 0.0)
    if _converged(series, th) is not None:
        return None  # 0.0002 repeated: memorised, not frozen (rule_overfitting says so)
    evals = [v for _, v in series.evals]
    n_eval, eend = _longest_run(evals, lambda a, b: a == b)
    repeat = _repeated_block(series.train, th.flat_identical_points)
    if n_same >= th.flat_identical_points:
        step, value = series.train[end]
        evidence = {"identical_losses": n_same, "value": value, "until_step": step}
        what = f"the train loss is exactly {fmt_sig(value)} at {n_same} log lines in a row (until step {step})"
    elif zero and n_zero >= max(2, th.flat_identical_points // 2):
        step = zero[zend][0]
        evidence = {"zero_grad_norms": n_zero, "until_step": step}
        what = f"the gradient norm is exactly 0 at {n_zero} log lines in a row (until step {step})"
    elif evals and n_eval >= max(3, th.flat_identical_points // 2):
        step, value = series.evals[eend]
        evidence = {"identical_eval_losses": n_eval, "value": value, "until_step": step}
        what = f"the eval loss is exactly {fmt_sig(value)} at {n_eval} evaluations in a row (until step {step})"
    elif repeat is not None:
        (a, b), length = repeat
        step = series.train[b + length - 1][0]
        evidence = {"repeated_losses": length, "first_from_step": series.train[a][0],
                    "repeat_from_step": series.train[b][0]}
        what = (f"the {length} train losses from step {series.train[b][0]} repeat those from step "
                f"{series.train[a][0]} exactly: the same batches give the same losses, the weights do not change")
    else:
        return None
    fix = fixes.frozen(ctx, _lr(series, ctx))
    return _anomaly("loss_flat", "error", f"{what}: the model is not learning.", evidence, fix, step)


def rule_flat_or_slow(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """The train loss does not move beyond its noise (`loss_flat`), or falls too little and still at its
    LR-limited pace at the end (`loss_slow`)."""
    frozen = rule_frozen(series, th, ctx)
    if frozen is not None:
        return frozen
    warm = _warmup(series, ctx)
    if warm is None and not series.ended:
        return None  # still warming up: a flat loss is expected while the LR climbs
    # a run that ended inside its warm-up was trained with that rising LR all run: the whole of it is judged
    whole_run_warmup, warm = warm is None, warm or 0
    # judged after the warm-up, on as much evidence as any trend (a warm-up's losses say nothing of the LR)
    tr = trend_stats(series.train[warm:], th)
    if tr is None or _converged(series, th) is not None:
        return None
    evidence = {"first_window_median": round(tr.first_median, 4), "last_window_median": round(tr.last_median, 4),
                "rel_drop": round(tr.rel_change, 4), "steps": [tr.first_step, tr.last_step], "points": tr.n,
                "noise": round(tr.noise, 5), **({"warmup_whole_run": True} if whole_run_warmup else {})}
    values = [v for _, v in series.train]
    post = values[warm:]
    sigma = noise_sigma(post)
    # standard error of the difference of two window medians (a median's SE is 1.25 sigma / sqrt(w))
    band = th.flat_noise_multiple * math.sqrt(2) * 1.2533 * sigma / math.sqrt(tr.window)
    evidence["noise_band"] = round(band, 5)
    # the end within `band` of the start, and no window on the way further than 1.5 `band` (many windows are
    # compared: the widest of them strays further by chance alone) ...
    within = abs(tr.first_median - tr.last_median) < band and all(
        abs(m - tr.first_median) < 1.5 * band for m in running_medians(post, tr.window))
    # ... and no steady trend either: the rank test of every pair of points sees a slow fall two windows miss
    z = trend_z(post)
    evidence["trend_z"] = round(z, 2)
    within = within and abs(z) < th.flat_noise_multiple
    # the first logged losses (the model before the updates) too: a fall at the very start, then a plateau in
    # wide noise, is learning that levelled off, not a model that never moved; judged against the standard
    # error of the difference of the first `min_window` losses' median and the last window's (1.25 sigma
    # sqrt(1 / min_window + 1 / w): three noisy first losses are no precise level)
    head = statistics.median(values[: th.min_window])
    head_band = th.flat_noise_multiple * 1.2533 * sigma * math.sqrt(1 / th.min_window + 1 / tr.window)
    moved = abs(head - tr.last_median) >= head_band and abs(head - tr.last_median) >= th.flat_max_rel_change * abs(head)
    # and only when the noise would have let a healthy fall be seen: within a band wider than
    # `slow_max_rel_drop` of the level, a run falling 10% looks the same as one that does not move; a run with
    # steps left by its plan has made only its share of that fall yet (so early in a run, only a quiet curve)
    left = _steps_left(series, ctx)
    share = left[0] / left[1] if left else 1.0
    resolved = band < th.slow_max_rel_drop * share * abs(tr.first_median)
    evidence["resolves_rel_change"] = round(band / abs(tr.first_median), 4) if tr.first_median else None
    if (abs(tr.rel_change) < th.flat_max_rel_change or within) and not moved and resolved:
        msg = (
            f"train loss is flat: {fmt_sig(tr.first_median)} -> {fmt_sig(tr.last_median)} over "
            f"steps {tr.first_step}-{tr.last_step} ({-tr.rel_change * 100:+.2f}%, within the noise of its first "
            "value all run): the model is not learning."
        )
        return _anomaly("loss_flat", "error", msg, evidence, fixes.flat(ctx, _lr(series, ctx)), tr.last_step)
    return _slow(series, th, ctx, warm, band, evidence)


def _eval_bottomed(series: Series, th: Thresholds) -> tuple[int, float] | None:
    """(step, loss) of the eval minimum when the eval loss has bottomed: its minimum lies before the last
    evaluation and the evaluations since stayed clearly above it."""
    evals = series.evals
    if len(evals) < 3:
        return None
    best_i = min(range(len(evals)), key=lambda i: evals[i][1])
    after = evals[best_i + 1 :]
    if not after or min(v for _, v in after) < evals[best_i][1] * (1 + th.overfit_min_rel_rise / 2):
        return None
    return evals[best_i]


def _levelled(evals: Sequence[tuple[int, float]], th: Thresholds) -> bool:
    """The eval loss fell in the first half of its evaluations and, per step, less than `slow_min_late_share` of
    that in the second half: it has levelled off (three evaluations at least)."""
    if len(evals) < 3:
        return False
    (s0, e0), (sm, em), (s1, e1) = evals[0], evals[len(evals) // 2], evals[-1]
    early = (e0 - em) / (sm - s0) if sm > s0 else 0.0
    late = (em - e1) / (s1 - sm) if s1 > sm else 0.0
    return early > 0 and late < th.slow_min_late_share * early


def _still_falling(series: Series, tr: TrendStats, th: Thresholds, band: float, mid_step: int) -> tuple[float, bool]:
    """(late share, still falling) of a post-warm-up curve: the second half's fall per unit of LR as a share of
    the first half's, and whether the second half still fell: beyond the noise; unless a decaying LR left it
    too little exposure for its pace to show (linear decay to 0: a third of the first half's), where a drop at
    the first half's pace per unit of LR would itself be inside the noise: then that pace (the share) decides."""
    exposure_early = lr_exposure(series.lr, tr.first_step, mid_step)
    exposure_late = lr_exposure(series.lr, mid_step, tr.last_step)
    early, late = tr.first_half_drop, tr.second_half_drop
    if exposure_early and exposure_late:
        early, late = early / exposure_early, late / exposure_late
    late_share = late / early if early > 0 else math.inf
    resolvable = th.slow_min_significance * band / th.flat_noise_multiple
    decayed = exposure_early is not None and exposure_late is not None and 0 < exposure_late < exposure_early
    expected_late = tr.first_half_drop * exposure_late / exposure_early if decayed else tr.first_half_drop
    still = tr.second_half_drop > resolvable or (
        decayed and tr.first_half_drop > resolvable and tr.second_half_drop > 0 and expected_late <= resolvable)
    return late_share, still


def _slow(series: Series, th: Thresholds, ctx: FixContext, warm: int, band: float,
          evidence: dict[str, Any]) -> Anomaly | None:
    """`loss_slow` of a train loss that moves beyond its noise `band` (`rule_flat_or_slow`): a small total drop
    from the first logged loss, still falling after warm-up at its LR-limited initial pace."""
    post = series.train[warm:]
    tr = trend_stats(post, th)
    if tr is None:
        return None
    head = head_level([v for _, v in series.train], th)
    total = (head - tr.last_median) / abs(head) if head else 0.0
    evidence.update(first_loss=round(head, 4), total_rel_drop=round(total, 4), warmup_points=warm)
    mid_step = post[len(post) // 2][0]
    late_share, still = _still_falling(series, tr, th, band, mid_step)
    evidence["late_share"] = round(late_share, 3) if math.isfinite(late_share) else None
    significant = head - tr.last_median > th.slow_min_significance * tr.noise / math.sqrt(tr.window)
    evals = series.evals
    eval_drop = (evals[0][1] - evals[-1][1]) / abs(evals[0][1]) if len(evals) >= 2 and evals[0][1] else None
    # an eval that barely moves says the LR is low only when it measures the training distribution: an eval
    # loss far above the train loss (another corpus) barely moves whatever the LR
    near = (train := train_loss_near(series.train, evals[-1][0])) is not None and evals[-1][1] - train < th.far_min_gap \
        if evals else False
    # ... and only while the eval loss still falls at its pace: one that fell, then levelled off, has found its
    # floor on this data (a plateau, not an LR-limited fall)
    eval_still = eval_drop is not None and eval_drop < th.slow_eval_max_rel_drop and near and not _levelled(evals, th)
    lrs = [v for step, v in series.lr if step >= post[0][0] and v > 0]
    lr_constant = len(lrs) >= 2 and max(lrs) / min(lrs) <= 1.05
    limit = th.slow_max_rel_drop * (th.slow_eval_still_factor if eval_still or lr_constant else 1.0)
    # what the run has left to gain: with steps left by its plan, the drop it reaches by its last step if it
    # keeps its latest pace (at most: a decaying LR slows it), not the drop so far
    reach = total
    left = _steps_left(series, ctx)
    if left and tr.last_step > mid_step and head:
        pace = tr.second_half_drop / (tr.last_step - mid_step)
        reach = total + max(0.0, pace) * (left[1] - left[0]) / abs(head)
        evidence["reach_by_planned_end"] = round(reach, 4)
    if not (
        total > 0 and reach < limit
        and significant
        and still
        and late_share >= th.slow_min_late_share
        and _eval_bottomed(series, th) is None
    ):
        return None
    per100 = total / max(1, tr.last_step - series.train[0][0]) * 100
    evidence["rel_drop_per_100_steps"] = round(per100, 5)
    if eval_drop is not None:
        evidence["eval_rel_drop"] = round(eval_drop, 4)
    lr = _lr(series, ctx)
    msg = (
        f"train loss falls too slowly: {fmt_sig(head)} -> {fmt_sig(tr.last_median)} by step {tr.last_step} "
        f"(-{total * 100:.1f}% in all) and still falling at its pace "
        + ("in a warm-up that lasted the whole run" if evidence.get("warmup_whole_run") else "after warm-up")
        + (" at a constant LR" if lr_constant else " per unit of LR")
        + (f", eval loss barely moved ({-eval_drop * 100:+.1f}%)" if eval_still else "")
        + (f": the LR ({fmt_lr(lr.value)}) is too low." if lr else ": the LR is too low.")
    )
    fix = fixes.raise_lr(ctx, lr)
    return _anomaly("loss_slow", "warning", msg, evidence, replace(fix, text=fix.text + "."), tr.last_step)


def rule_memorised(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """Train loss converged near zero (0.89 -> 0.0002): the model memorised its training text. Only for a
    language-model loss: a preference loss (DPO) near zero is a separated pair, not memorised text."""
    if not series.lm or _converged(series, th) is None:
        return None
    low_step, low, start = _converged(series, th)
    step, end = series.train[-1]
    evidence = {"train_loss_start": round(start, 4), "train_loss_end": end, "train_loss_low": round(low, 6),
                "low_step": low_step, "last_step": step, "points": len(series.train)}
    msg = (f"train loss fell from {fmt_sig(start)} to {fmt_sig(low)} by step {low_step}"
           + (f" (and ended at {fmt_sig(end)})" if abs(end - low) > 0.5 * th.flat_converged_loss else "")
           + ": near zero, the model has memorised its training text (overfitting), whatever the eval loss says.")
    return _anomaly("overfitting", "warning", msg, evidence, fixes.overfitting(ctx, None), step)


def rule_overfitting(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """The eval loss rose at consecutive evaluations after its minimum (or stayed clearly above it) while the
    train loss did not rise."""
    evals = series.evals
    k = th.overfit_consecutive_rises
    if len(evals) < max(th.overfit_min_evals, k + 1):
        return None
    best_i = min(range(len(evals)), key=lambda i: evals[i][1])
    best_step, best = evals[best_i]
    last_step, last = evals[-1]
    since = evals[best_i:]
    tail = evals[-(k + 1) :]
    rising = best_i <= len(evals) - k - 1 and all(b[1] > a[1] for a, b in zip(tail, tail[1:], strict=False))
    if not rising:
        # noisy evaluations: the best lies `k` or more evaluations back, none since came back near it, and the
        # last is clearly above it (a transient bump recovers to a new best and stays quiet)
        if len(since) - 1 < k or last < best * (1 + th.overfit_sustained_rel_rise) or \
                min(v for _, v in since[1:]) < best * (1 + th.overfit_min_rel_rise):
            return None  # every evaluation since the best stayed clearly above it, the last too
        tail = since
    if best <= 0 or last < best * (1 + th.overfit_min_rel_rise):
        return None
    # the train loss over the whole span since the eval's best, not just the last evaluations: with an eval at
    # every step the tail spans two steps, where the train loss moves only by its batch noise
    train_start = train_loss_near(series.train, best_step)
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
    rises = sum(1 for a, b in zip(since, since[1:], strict=False) if b[1] > a[1])
    msg = (
        (f"eval loss rose {k} evaluations in a row to {fmt_sig(last)} at step {last_step} " if rising else
         f"eval loss stayed above its best for {len(tail) - 1} evaluations, up to {fmt_sig(last)} at step {last_step} ")
        + f"(best {fmt_sig(best)} at step {best_step}, {rises} rises since) while train loss went "
        f"{fmt_sig(train_start)} -> {fmt_sig(train_end)}: the model is overfitting; its best checkpoint is step "
        f"{best_step}."
    )
    return _anomaly("overfitting", "warning", msg, evidence, fixes.overfitting(ctx, best_step), last_step)


def rule_far_above(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
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
        f"eval loss {fmt_sig(ev)} is far above train loss {fmt_sig(tr)} at step {step} "
        f"(gap {ev - tr:.2f} nats, perplexity x{math.exp(min(ev - tr, 50.0)):.2f})."
    )
    return _anomaly("eval_far_above_train", "warning", msg, evidence, fixes.eval_far_above_train(ctx), step)


def rule_no_eval(series: Series, th: Thresholds, ctx: FixContext) -> Anomaly | None:
    """A run that finished without a single evaluation (an interrupted one may simply not have reached its first;
    an excerpt of a log may have cut its evaluations: only a run whose end the records show is judged)."""
    if series.evals or not series.train or series.stopped or series.errors or not series.ended:
        return None
    if any(k == "eval_loss" for _, k, _ in series.nonfinite):
        return None
    last = series.train[-1][0]
    msg = (f"no evaluation in this run (it finished at step {last}): overfitting cannot be seen; set eval_steps to "
           "see it.")
    return _anomaly("no_eval", "info", msg, {"last_step": last, "train_points": len(series.train)},
                    fixes.no_eval(ctx, last), last)


LIVE_RULES: tuple[Rule, ...] = (
    rule_out_of_memory,
    rule_nan_inf,
    rule_diverging,
    rule_oscillating,
    rule_flat_or_slow,
    rule_memorised,
    rule_overfitting,
    rule_far_above,
)
EVAL_RULES: tuple[Rule, ...] = (rule_overfitting, rule_far_above)
"""Rules that judge one eval series: with several eval sets they run once per set."""
FINAL_RULES: tuple[Rule, ...] = (rule_oscillated, rule_no_eval)
"""End-of-run rules: what the live rules would have raised earlier in the run, and the notes."""

SUPPRESSES: dict[str, tuple[str, ...]] = {
    # after a NaN the finite losses left are the pre-divergence part of the run: trend verdicts on them would
    # only repeat the NaN story with a weaker word
    "nan_inf": ("loss_flat", "loss_slow", "no_eval"),
    "out_of_memory": ("no_eval",),  # the run died; the missing eval is not the story
    # a window median of a jumping series says nothing about progress; the LR story is the one to tell
    "loss_diverging": ("loss_slow", "loss_flat"),
    "loss_oscillating": ("loss_slow", "loss_flat"),
    # an overfitting run has learnt too much, not too little: never advise a higher LR beside it
    "overfitting": ("loss_slow",),
}
"""kind -> the kinds it explains away when both fire."""


def _for_eval_set(anomaly: Anomaly, name: str) -> Anomaly:
    return replace(anomaly, message=f"eval set `{name}`: {anomaly.message}",
                   evidence={**anomaly.evidence, "eval_set": name})


def judge(
    series: Series,
    thresholds: Thresholds = DEFAULTS,
    final: bool = False,
    context: FixContext | None = None,
    recorded: Sequence[Anomaly] = (),
) -> list[Anomaly]:
    """Every anomaly `series` shows, with the `recorded` ones (alerts the run raised itself) of kinds no rule
    found, most severe first (errors, warnings, then the `info` notes); the stories that explain others are kept,
    the weaker echoes dropped."""
    ctx = context or FixContext()
    found: list[Anomaly] = []
    named_sets = [name for name in series.eval_sets if name] if len(series.eval_sets) > 1 else []
    for rule in LIVE_RULES:
        if rule in EVAL_RULES and named_sets:
            found += [_for_eval_set(a, name) for name in series.eval_sets
                      if (a := rule(series.for_eval_set(name), thresholds, ctx)) is not None]
            continue
        anomaly = rule(series, thresholds, ctx)
        if anomaly is not None:
            found.append(anomaly)
    seen = {a.kind for a in found}
    found += [a for a in recorded if a.kind not in seen]
    kinds = {a.kind for a in found}
    dropped = {k for kind in kinds for k in SUPPRESSES.get(kind, ())}
    found = [a for a in found if a.kind not in dropped]
    # the end-of-run findings come last: what the live rules said earlier (an oscillation that calmed) never
    # explains away what the curve shows now, and a note never an alarm
    for rule in FINAL_RULES if final else ():
        anomaly = rule(series, thresholds, ctx)
        if anomaly is not None and anomaly.kind not in kinds | dropped:
            found.append(anomaly)
    found.sort(key=lambda a: (-SEVERITIES.index(a.severity), ANOMALY_KINDS.index(a.kind)))
    return found


def diagnose(
    records: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = DEFAULTS,
    final: bool = False,
    context: FixContext | None = None,
    recorded: bool = False,
) -> list[Anomaly]:
    """Every anomaly the records show, most severe first. `final=True` adds end-of-run rules (`no_eval`);
    `recorded=True` adds the `alert` records of kinds no rule found (what the run itself saw live, e.g.
    non-finite weights caught before a NaN loss was ever logged).

    `context` (`analysis.context.fix_context`) is what is known of the run's settings, each with its origin:
    the fixes quote those values and nothing else.
    """
    alerts = anomalies_from_alerts(records) if recorded else []
    return judge(extract_series(records), thresholds, final, context, alerts)


class LiveDiagnosis:
    """The same rules over a run in progress: call it with each new batch of records (`live(new)`); every
    record is scanned once, so judging after every log line stays cheap on a long run."""

    def __init__(self, thresholds: Thresholds = DEFAULTS, context: FixContext | None = None) -> None:
        self.thresholds = thresholds
        self.context = context
        self._builder = SeriesBuilder()

    def __call__(self, new_records: Sequence[Mapping[str, Any]], final: bool = False) -> list[Anomaly]:
        self._builder.add(new_records)
        return judge(self._builder.series(), self.thresholds, final, self.context)


__all__ = ["LIVE_RULES", "LiveDiagnosis", "Rule", "TrendStats", "diagnose", "judge"]
