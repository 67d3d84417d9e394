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
from dataclasses import replace
from typing import Any

from prunetune.analysis import fixes
from prunetune.analysis.anomaly import ANOMALY_KINDS, Anomaly, anomalies_from_alerts
from prunetune.analysis.series import (
    Series,
    SeriesBuilder,
    TrendStats,
    extract_series,
    noise_sigma,
    oscillation_stats,
    record_step,
    running_medians,
    train_loss_near,
    trend_stats,
    warmup_end_index,
    windows,
)
from prunetune.analysis.thresholds import DEFAULTS, Thresholds
from prunetune.fmt import fmt_sig
from prunetune.rundir.records import to_float


def _ctx(context: Mapping[str, Any] | None, key: str) -> Any:
    return None if context is None else context.get(key)


def _flavour(context: Mapping[str, Any] | None) -> str:
    """Whose flags the fixes name: prunetune's (its own runs, live alerts) or the Trainer's (foreign logs)."""
    return _ctx(context, "flavour") or "prunetune"


def _current_lr(series: Series, context: Mapping[str, Any] | None) -> float | None:
    lr = to_float(_ctx(context, "lr"))
    if lr is None and series.lr:
        lr = max(v for _, v in series.lr)
    return lr if lr is not None and lr > 0 and math.isfinite(lr) else None

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
    fix = fixes.nan_inf(step, _current_lr(series, context), _flavour(context), _ctx(context, "resume_command"))
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
    step = record_step(rec)
    evidence = {"step": step, "message": str(rec.get("message", ""))[:300]}
    fix = fixes.out_of_memory(
        to_float(_ctx(context, "block_size")), to_float(_ctx(context, "per_device_train_batch_size")),
        to_float(_ctx(context, "gradient_accumulation_steps")), flavour=_flavour(context),
        resume_command=_ctx(context, "resume_command"),
    )
    return Anomaly("out_of_memory", "error", f"out of memory at step {step}.", evidence, fix, step)


def rule_diverging(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    tr = trend_stats(series.train, th)
    if tr is None:
        return None
    values = [v for _, v in series.train]
    first, last = windows(values, th)
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
    fix = fixes.diverging(lr, to_float(_ctx(context, "gradient_accumulation_steps")), _flavour(context))
    msg = (
        f"train loss is rising: median {fmt_sig(tr.last_median)} over the last logs vs {fmt_sig(best)} "
        f"around step {best_step} (+{(tr.last_median / best - 1) * 100:.0f}%): the LR is too high."
    )
    return Anomaly("loss_diverging", "error", msg, evidence, fix, tr.last_step)


def rule_oscillating(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    os_ = oscillation_stats(series.train, th)
    if os_ is None or os_.level < th.osc_min_level:
        return None
    swinging = os_.log_jump >= th.osc_min_log_jump
    sawtooth = (
        os_.rel_amplitude >= th.osc_min_rel_amplitude
        and os_.sign_change_fraction >= th.osc_min_sign_changes
        and os_.progress <= th.osc_max_progress
    )
    if not (swinging or sawtooth):
        return None
    evidence = {
        "steps": list(os_.steps),
        "points": os_.points,
        "log_jump_p75": round(os_.log_jump, 4),
        "rel_amplitude": round(os_.rel_amplitude, 4),
        "sign_change_fraction": round(os_.sign_change_fraction, 3),
        "progress": round(os_.progress, 4),
    }
    lr = _current_lr(series, context)
    swing = (math.exp(os_.log_jump) - 1) * 100
    msg = (
        f"train loss oscillates between steps {os_.steps[0]} and {os_.steps[1]}: a quarter of the log points "
        f"jump by {swing:.0f}% or more from the previous one (median jump {os_.rel_amplitude * 100:.0f}% of its "
        f"level, direction flips {os_.sign_change_fraction * 100:.0f}% of the time): the LR is too high or the "
        "batch too small."
    )
    fix = fixes.lower_lr(lr, to_float(_ctx(context, "gradient_accumulation_steps")), _flavour(context)) + "."
    return Anomaly("loss_oscillating", "warning", msg, evidence, fix, os_.steps[1])


def _longest_run(values: Sequence[float], pred) -> tuple[int, int]:
    """(length, end index) of the longest run of consecutive values where pred(prev, cur) holds."""
    best, best_end, cur = 1 if values else 0, 0, 1
    for i in range(1, len(values)):
        cur = cur + 1 if pred(values[i - 1], values[i]) else 1
        if cur > best:
            best, best_end = cur, i
    return best, best_end


def _converged(series: Series, th: Thresholds) -> bool:
    """The train loss ends near zero after a much higher start: a memorised training set (printed with 4
    decimals, its last losses repeat exactly), which no flat or oscillation verdict describes."""
    if len(series.train) < th.min_window * 2:
        return False
    head = [v for _, v in series.train[: th.min_window]]
    tail = [v for _, v in series.train[-th.min_window :]]
    end = statistics.median(tail)
    return end <= th.flat_converged_loss and statistics.median(head) >= th.overfit_memorise_drop * max(end, 1e-4)


def rule_frozen(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    """Exactly repeated losses or exactly zero gradients: no statistics needed, the model does not change."""
    n_same, end = _longest_run([v for _, v in series.train], lambda a, b: a == b)
    zero = [(s, v) for s, v in series.grad_norm]
    n_zero, zend = _longest_run([v for _, v in zero], lambda a, b: a == 0.0 and b == 0.0)
    if _converged(series, th):
        return None  # 0.0002 repeated: memorised, not frozen (rule_overfitting says so)
    if n_same >= th.flat_identical_points:
        step, value = series.train[end]
        evidence = {"identical_losses": n_same, "value": value, "until_step": step}
        what = f"the train loss is exactly {fmt_sig(value)} at {n_same} log lines in a row (until step {step})"
    elif zero and n_zero >= max(2, th.flat_identical_points // 2):
        step = zero[zend][0]
        evidence = {"zero_grad_norms": n_zero, "until_step": step}
        what = f"the gradient norm is exactly 0 at {n_zero} log lines in a row (until step {step})"
    else:
        return None
    fix = fixes.frozen(_current_lr(series, context), _flavour(context))
    return Anomaly("loss_flat", "error", f"{what}: the model is not learning.", evidence, fix, step)


def rule_flat_or_slow(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    """The train loss does not move beyond its noise (`loss_flat`), or falls too little and still at the same
    pace at the end (`loss_slow`)."""
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
    evidence["noise"] = round(tr.noise, 5)
    if _converged(series, th):
        return None
    values = [v for _, v in series.train]
    sigma = noise_sigma(values)
    # standard error of the difference of two window medians (a median's SE is 1.25 sigma / sqrt(w))
    band = th.flat_noise_multiple * math.sqrt(2) * 1.2533 * sigma / math.sqrt(tr.window)
    evidence["noise_band"] = round(band, 5)
    # the end within `band` of the start, and no window on the way further than 1.5 `band` (many windows are
    # compared: the widest of them strays further by chance alone)
    within = abs(tr.first_median - tr.last_median) < band and all(
        abs(m - tr.first_median) < 1.5 * band for m in running_medians(values, tr.window))
    if abs(tr.rel_change) < th.flat_max_rel_change or within:
        msg = (
            f"train loss is flat: {fmt_sig(tr.first_median)} -> {fmt_sig(tr.last_median)} over "
            f"steps {tr.first_step}-{tr.last_step} ({tr.rel_change * 100:+.2f}%, within the noise of its first "
            "value all run): the model is not learning."
        )
        fix = fixes.flat(_current_lr(series, context), _flavour(context))
        return Anomaly("loss_flat", "error", msg, evidence, fix, tr.last_step)
    return _slow(series, th, context, tr, warm, band, evidence)


def _slow(series: Series, th: Thresholds, context: Mapping[str, Any] | None, tr: TrendStats, warm: int,
          band: float, evidence: dict[str, Any]) -> Anomaly | None:
    """`loss_slow` of a train loss that moves beyond its noise `band` (`rule_flat_or_slow`)."""
    late_share = tr.second_half_drop / tr.first_half_drop if tr.first_half_drop > 0 else math.inf
    evidence["late_share"] = round(late_share, 3) if math.isfinite(late_share) else None
    significant = tr.first_median - tr.last_median > th.slow_min_significance * tr.noise / math.sqrt(tr.window)
    evals = series.evals
    eval_drop = (evals[0][1] - evals[-1][1]) / abs(evals[0][1]) if len(evals) >= 2 and evals[0][1] else None
    eval_still = eval_drop is not None and eval_drop < th.slow_eval_max_rel_drop
    lrs = [v for _, v in series.lr[warm:]]
    lr_constant = len(lrs) >= 2 and min(lrs) > 0 and max(lrs) / min(lrs) <= 1.05
    limit = th.slow_max_rel_drop * (th.slow_eval_still_factor if eval_still or lr_constant else 1.0)
    if not (
        0 < tr.rel_change < limit
        and significant
        and tr.second_half_drop > th.slow_min_significance * band / th.flat_noise_multiple
        and late_share >= th.slow_min_late_share
    ):
        return None
    per100 = tr.rel_change / max(1, tr.last_step - tr.first_step) * 100
    evidence["rel_drop_per_100_steps"] = round(per100, 5)
    if eval_drop is not None:
        evidence["eval_rel_drop"] = round(eval_drop, 4)
    msg = (
        f"train loss falls too slowly: {fmt_sig(tr.first_median)} -> {fmt_sig(tr.last_median)} over steps "
        f"{tr.first_step}-{tr.last_step} (-{tr.rel_change * 100:.1f}%, {per100 * 100:.2f}% per 100 steps) and "
        "still falling at the same pace" + (" at a constant LR" if lr_constant else "")
        + (f", eval loss barely moved ({-eval_drop * 100:+.1f}%)" if eval_still else "")
        + ": the LR is too low."
    )
    fix = fixes.raise_lr(_current_lr(series, context), _flavour(context)) + "."
    return Anomaly("loss_slow", "warning", msg, evidence, fix, tr.last_step)


def rule_memorised(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    """Train loss converged near zero (0.89 -> 0.0002): the model memorised its training text."""
    if not _converged(series, th):
        return None
    start = statistics.median(v for _, v in series.train[: th.min_window])
    step, end = series.train[-1]
    evidence = {"train_loss_start": round(start, 4), "train_loss_end": end, "last_step": step,
                "points": len(series.train)}
    msg = (f"train loss fell from {fmt_sig(start)} to {fmt_sig(end)} by step {step}: near zero, the model has memorised "
           "its training text (overfitting), whatever the eval loss says.")
    fix = fixes.overfitting(to_float(_ctx(context, "lora_dropout")), to_float(_ctx(context, "epochs")), None,
                            _flavour(context))
    return Anomaly("overfitting", "warning", msg, evidence, fix, step)


def rule_overfitting(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    evals = series.evals
    k = th.overfit_consecutive_rises
    if len(evals) < max(th.overfit_min_evals, k + 1):
        return None
    best_i = min(range(len(evals)), key=lambda i: evals[i][1])
    best_step, best = evals[best_i]
    last_step, last = evals[-1]
    tail = evals[-(k + 1) :]
    rising = all(b[1] > a[1] for a, b in zip(tail, tail[1:], strict=False))
    if not rising:
        # noisy evaluations: the best lies `k` or more evaluations back, none since came back near it, and the
        # last is clearly above it (a transient bump recovers to a new best and stays quiet)
        since = evals[best_i + 1 :]
        if len(since) < k or last < best * (1 + th.overfit_sustained_rel_rise) or \
                min(v for _, v in since) < best * (1 + th.overfit_min_rel_rise):
            return None
        tail = evals[best_i:]
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
    fix = fixes.overfitting(to_float(_ctx(context, "lora_dropout")), to_float(_ctx(context, "epochs")), best_step,
                            _flavour(context))
    msg = (
        (f"eval loss rose {k} evaluations in a row to {fmt_sig(last)} at step {last_step} " if rising else
         f"eval loss stayed above its best for {len(tail) - 1} evaluations, up to {fmt_sig(last)} at step {last_step} ")
        + f"(best {fmt_sig(best)} at step {best_step}) while train loss went {fmt_sig(train_start)} -> {fmt_sig(train_end)}."
    )
    return Anomaly("overfitting", "warning", msg, evidence, fix, last_step)


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
        f"eval loss {fmt_sig(ev)} is far above train loss {fmt_sig(tr)} at step {step} "
        f"(gap {ev - tr:.2f} nats, perplexity x{math.exp(min(ev - tr, 50.0)):.2f})."
    )
    fix = fixes.eval_far_above_train(to_float(_ctx(context, "lora_dropout")), _flavour(context))
    return Anomaly("eval_far_above_train", "warning", msg, evidence, fix, step)


def rule_no_eval(series: Series, th: Thresholds, context: Mapping[str, Any] | None) -> Anomaly | None:
    if series.evals or not series.train:
        return None
    if any(k == "eval_loss" for _, k, _ in series.nonfinite):
        return None
    last = series.train[-1][0]
    msg = f"the run finished at step {last} without a single evaluation: overfitting cannot be seen."
    fix = fixes.no_eval(last, _flavour(context))
    return Anomaly("no_eval", "warning", msg, {"last_step": last, "train_points": len(series.train)}, fix, last)


LIVE_RULES = (
    rule_out_of_memory,
    rule_nan_inf,
    rule_diverging,
    rule_oscillating,
    rule_flat_or_slow,
    rule_memorised,
    rule_overfitting,
    rule_far_above,
)
EVAL_RULES = (rule_overfitting, rule_far_above)
"""Rules that judge one eval series: with several eval sets they run once per set."""


def _for_eval_set(anomaly: Anomaly, name: str) -> Anomaly:
    return replace(anomaly, message=f"eval set `{name}`: {anomaly.message}",
                   evidence={**anomaly.evidence, "eval_set": name})
FINAL_RULES = (rule_no_eval,)


def judge(
    series: Series,
    thresholds: Thresholds = DEFAULTS,
    final: bool = False,
    context: Mapping[str, Any] | None = None,
    recorded: Sequence[Anomaly] = (),
) -> list[Anomaly]:
    """Every anomaly `series` shows, with the `recorded` ones (alerts the run raised itself) of kinds no rule
    found, most severe first; the stories that explain others are kept, the weaker echoes dropped."""
    found: list[Anomaly] = []
    rules = LIVE_RULES + (FINAL_RULES if final else ())
    named_sets = [name for name in series.eval_sets if name] if len(series.eval_sets) > 1 else []
    for rule in rules:
        if rule in EVAL_RULES and named_sets:
            found += [_for_eval_set(a, name) for name in series.eval_sets
                      if (a := rule(series.for_eval_set(name), thresholds, context)) is not None]
            continue
        anomaly = rule(series, thresholds, context)
        if anomaly is not None:
            found.append(anomaly)
    seen = {a.kind for a in found}
    found += [a for a in recorded if a.kind not in seen]
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


def diagnose(
    records: Sequence[Mapping[str, Any]],
    thresholds: Thresholds = DEFAULTS,
    final: bool = False,
    context: Mapping[str, Any] | None = None,
    recorded: bool = False,
) -> list[Anomaly]:
    """Every anomaly the records show, most severe first. `final=True` adds end-of-run rules (`no_eval`);
    `recorded=True` adds the `alert` records of kinds no rule found (what the run itself saw live, e.g.
    non-finite weights caught before a NaN loss was ever logged).

    `context` (optional) carries the run's settings so fixes name values: lr, block_size,
    per_device_train_batch_size, gradient_accumulation_steps, lora_dropout, epochs, resume_command, and
    `flavour` (whose flags the fixes name, see `prunetune.analysis.fixes`).
    """
    alerts = anomalies_from_alerts(records) if recorded else []
    return judge(extract_series(records), thresholds, final, context, alerts)


class LiveDiagnosis:
    """The same rules over a run in progress: call it with each new batch of records (`live(new)`); every
    record is scanned once, so judging after every log line stays cheap on a long run."""

    def __init__(self, thresholds: Thresholds = DEFAULTS, context: Mapping[str, Any] | None = None) -> None:
        self.thresholds = thresholds
        self.context = context
        self._builder = SeriesBuilder()

    def __call__(self, new_records: Sequence[Mapping[str, Any]], final: bool = False) -> list[Anomaly]:
        self._builder.add(new_records)
        return judge(self._builder.series(), self.thresholds, final, self.context)
