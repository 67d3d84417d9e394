"""Every number a diagnosis rule compares against (`Thresholds`), and the NAME=VALUE flags that override them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from prunetune.errors import UserError


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against. Defaults are tuned on the labelled logs in `tests/fixtures/logs`."""

    min_train_points: int = 8
    """Finite train-loss log points needed before any train-loss trend rule (flat, slow, oscillating,
    diverging) may fire (each is also tested against the run's own noise); with logging every 10 steps that is
    80 steps ..."""
    min_train_steps: int = 40
    """... and the steps those points must span (per-step logging: 10 points are too few steps to judge a trend;
    a log that states no step, read by its line order, is judged on its points). Not for oscillation: a jump is
    between two consecutive logs whatever steps they span."""
    window_fraction: float = 0.2
    """Size of the first/last comparison windows as a fraction of the train-loss points."""
    min_window: int = 3
    """Smallest window (points) whose median is trusted; comparison windows are rounded up to an even count
    where the points allow, so a high/low alternation (batches of two kinds taking turns) puts as many highs as
    lows in each and window medians do not swing with the window's parity (the noise is read at lag 2 for the
    same reason)."""
    max_window: int = 100
    """Largest window (points): more adds no robustness, only cost (`diagnose` runs after every log line)."""
    flat_max_rel_change: float = 0.005
    """`loss_flat` when the median of the last window differs from the median of the first window by less
    than this fraction of the latter (0.5%: 6.2247 -> 6.2443 is flat) ..."""
    flat_noise_multiple: float = 2.0
    """... or by less than this many standard errors of the difference of two window medians
    (sqrt(2) x 1.25 sigma / sqrt(window), sigma the robust point-to-point noise) while no window on the way
    strayed more than 1.5 times that band, the rank test of every pair of points shows no trend (Mann-Kendall
    |z| below this: a slow steady fall that two windows in wide noise miss) and the first `min_window` losses
    lie within this many standard errors of the last window (their median's error is the larger): nothing
    stands out of the noise, whatever the noise level."""
    flat_identical_points: int = 6
    """`loss_flat` at once (no step span needed) when this many consecutive train losses are exactly equal, half
    as many consecutive grad norms are exactly 0 or evaluations exactly equal (at least 3), or a stretch of this
    many train losses repeats an earlier one value for value (a later epoch replaying an earlier one): a model
    that no batch changes is frozen or dead ..."""
    flat_converged_loss: float = 0.05
    """... unless the repeated value is at or below this loss (nats) after a much higher start: a run
    converged near zero and printed with 4 decimals (0.0002, 0.0002, ...) has memorised its data; the
    overfitting rule reports it."""
    slow_max_rel_drop: float = 0.1
    """`loss_slow` when the loss fell by less than this fraction from its first logged value (the median of
    the first `min_window` points, warm-up included: the drop a warm-up makes is progress) to the median of
    the last window (a run still going: the drop it reaches by its planned last step at its latest pace) ...
    Also the smallest fall a healthy run makes: `loss_flat` is only claimed when the noise band would have
    shown a fall of this size (a run still going: its share of it so far)."""
    slow_eval_still_factor: float = 1.6
    """... or by less than this many times `slow_max_rel_drop` (16%: a run ending 10-15% below its start)
    at a constant LR or when the eval loss barely moved as well (less than `slow_eval_max_rel_drop`) ..."""
    slow_eval_max_rel_drop: float = 0.05
    """... (first vs last evaluation, at least two) ..."""
    slow_min_late_share: float = 0.5
    """... after its warm-up, the second half of the run still fell by at least this share of the first
    half's drop per unit of learning rate (a decaying LR slows the fall without the curve levelling off):
    the curve is still going down at its initial, LR-limited pace (no plateau), so a larger LR would help,
    unless the eval loss has already bottomed ..."""
    slow_min_significance: float = 2.0
    """... and the drop exceeds this many standard errors of a window median (noise / sqrt(window)), its
    second half this many standard errors of a difference of two window medians (a late fall that is only
    noise does not count as still falling), unless a decaying LR left the second half so little of it that a
    fall at the first half's pace per unit of LR would itself lie inside that noise: then that pace decides."""
    verdict_min_rel_drop: float = 0.1
    """The train verdict says "decreasing" (and states the evidence that no other LR is called for) only when
    the loss fell at least this fraction from its first points to its last window; a smaller drop beyond the
    noise with no anomaly reads "decreasing a little"; no drop beyond the noise reads "not decreasing"."""
    osc_min_log_jump: float = 0.55
    """`loss_oscillating` when the 75th percentile of |change of log loss| between consecutive log points
    (the trend, their median change, taken out) reaches this: a quarter of the points jump by x1.73 or more
    from the previous one. Decided on the data's own relative scale: healthy batch-1 noise of +-10-20% per
    step gives 0.1-0.3; an LR too high jumping 1.3 <-> 3.4 gives ~0.9 ..."""
    osc_min_rel_amplitude: float = 0.25
    """... or, a regular saw-tooth, when the median |step-to-step change| of the recent losses exceeds this
    fraction of their mean level ..."""
    osc_min_sign_changes: float = 0.75
    """... the changes flip sign at least this often (fraction of consecutive pairs; pure noise flips 2/3 of
    the time, a saw-tooth nearly always) ..."""
    osc_max_progress: float = 0.03
    """... and the recent window is not lower than the window before it by more than this fraction."""
    osc_min_large_jumps: int = 3
    """... and at least this many of the jumps are that large: one outlying batch makes two large jumps (down and
    back up), so no single point can make an oscillation, however few the points (ten per-step logs of a frozen
    model with one easy batch among them jump x2 twice) ..."""
    osc_min_level: float = 0.1
    """No oscillation is judged on a loss level below this (nats): near zero, relative jumps mean nothing:
    4-decimal rounding turns 0.0001 -> 0.0002 into a x2 jump, and the few examples a confident classifier still
    gets wrong move its loss 0.05 <-> 0.09 from batch to batch (the ViT run at 0.05-0.09 late in training)."""
    osc_recent_points: int = 20
    """How many of the latest train-loss points the oscillation rule looks at (the latest half of the run,
    up to 500 points, once the run has twice this many)."""
    diverge_min_rel_rise: float = 0.1
    """`loss_diverging` when the last window's median exceeds by more than this fraction the lower of the
    first logged losses (the untrained model, read to the precision the noise allows) and the minimum of the
    running window medians ..."""
    diverge_noise_multiple: float = 3.0
    """... and by more than this many standard errors of a difference of two window medians (1.25 sigma
    sqrt(2 / window), sigma the robust point-to-point noise), so the low points of an oscillation or of batch-1
    noise are not read as a rise (the best window is the lowest of many: 3, not 2) ..."""
    diverge_min_undone: float = 0.1
    """... and gives back at least this share of the run's fall from its first logged loss to its best (every
    diverging run of the corpora went back to its start or above: a share of 1 or more; a memorised run creeping
    0.009 -> 0.014 after a fall from 4.3 gives back 0.1%, a multi-epoch run creeping through its last epoch
    0.40 -> 0.44 after a fall from 1.1 gives back 6%) ..."""
    diverge_grad_growth: float = 10.0
    """... or, whatever the noise, while the grad norm's last-window median is this many times its
    first-window median: gradients grown by an order of magnitude mean the optimizer has left its stable region
    (independent evidence of the instability), and a loss back above its best says it no longer reduces the
    loss (on the corpus of real logs, healthy and overfitting runs end within x4 of their first grad norms; the
    lr 5e-4 run that climbed back from 0.48 to 0.82 went from 0.27 to 14)."""
    blowup_factor: float = 1.5
    """`loss_diverging` (a blow-up) when, with `min_train_points` logged, at any point after the first log, the
    median of `blowup_points`
    consecutive train losses exceeds the level before them by this factor (the first logged loss, the model
    before the updates, while the climb starts within the first points; else the median of the points before
    it), however the curve drifts afterwards: a fine-tuning loss never climbs 50% above where it was ..."""
    blowup_points: int = 3
    """... sustained over this many consecutive log points (one bad batch is a spike, not a blow-up) ..."""
    blowup_noise_multiple: float = 4.0
    """... and by a factor beyond this many robust standard deviations of the point-to-point noise of the log
    loss (batch-1 noise of +-20% needs a rise of x2.2)."""
    overfit_memorise_loss: float = 0.05
    """`overfitting` (memorisation) when a language-model train loss reaches below this (nats; its lowest running
    median over a twentieth of the points) ...: a language model's cross-entropy on new text never gets near
    zero ..."""
    memorise_negative_tolerance: float = 0.001
    """A loss at most this far below zero still counts as a cross-entropy near zero (-0.0003: a fused kernel's
    rounding of a ~0 loss printed to 4 decimals); one further below is no cross-entropy (a DPO or reward loss)
    and never memorised."""
    overfit_memorise_drop: float = 10.0
    """... after starting at least this many times higher (0.89 -> 0.0002), the losses from that low on staying
    near zero (their median at most `osc_min_level`: the low of a noisy curve swinging 0.009-1.0 is its noise's
    low tail, not a level it holds)."""
    overfit_min_evals: int = 3
    """Evaluations needed before `overfitting` may fire."""
    overfit_consecutive_rises: int = 2
    """`overfitting` when the eval loss rose at this many consecutive evaluations ..."""
    overfit_min_rel_rise: float = 0.01
    """... ends at least this fraction above its best value ..."""
    overfit_sustained_rel_rise: float = 0.01
    """... or, with noisy evaluations, when every evaluation since the best (at least
    `overfit_consecutive_rises` of them) stayed above it by `overfit_min_rel_rise` and the last ends this
    fraction above it (a transient bump comes back to a new best and stays quiet) ..."""
    overfit_train_max_rel_change: float = 0.0
    """... while the train loss from the eval's best to its last evaluation changed by at most this fraction (0:
    did not rise; over the whole span, since with an evaluation at every step the last few span only batch noise)."""
    far_min_gap: float = 0.7
    """`eval_far_above_train` when eval loss exceeds the train loss at its step (median of the last 3 logged
    losses) by more than this many nats (perplexity x2) ...: a healthy LoRA run's train loss on its own text
    sits 0.3-0.6 nats under a held-out eval (the Wanda-fork run: train 1.39, eval 1.99) ..."""
    far_min_ratio: float = 1.3
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
        if self.blowup_points < 1:
            raise ValueError("Thresholds.blowup_points must be >= 1")
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


DEFAULTS = Thresholds()
"""The thresholds every rule uses unless told otherwise."""
