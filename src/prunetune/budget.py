"""Time budgets as step counts: how many steps fit, from a measured step time. Used by `finetune
--max-train-minutes` (optimizer steps, with the evaluations between them) and `prune
--block-reconstruct-minutes` (the block-wise stage's Adam steps per layer).

A budget is turned into a step count before the steps start, not enforced by stopping midway: a learning-rate
schedule is then sized to the steps that will run, the last step is a real end (best checkpoint, final
evaluation, saved model), every layer of the block-wise stage gets the same number of steps, and a resumed
fine-tuning keeps the first session's number so its schedule does not change under it. Pure arithmetic here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prunetune.errors import UserError


@dataclass(frozen=True)
class StepBudget:
    """The outcome of fitting `planned` steps into `budget_s` seconds."""

    budget_s: float
    planned: int
    """The steps `max_steps` (or the epochs) asked for."""
    steps: int
    """The steps that run: `planned`, or fewer when they would not fit."""
    s_per_step: float
    eval_s: float
    """Seconds of one evaluation (the baseline evaluation's runtime), paid every `eval_steps`."""
    eval_steps: int | None

    @property
    def cut(self) -> bool:
        return self.steps < self.planned

    def record(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "planned_steps": self.planned, "budget_steps": self.steps,
                "budget_cut": self.cut}


def fit_steps(budget_s: float, planned: int, s_per_step: float, eval_s: float = 0.0,
              eval_steps: int | None = None) -> StepBudget:
    """The most steps (at least 1, at most `planned`) whose training and in-training evaluations take no more
    than `budget_s`: steps x s_per_step + floor(steps / eval_steps) x eval_s <= budget_s."""
    if not (budget_s > 0 and s_per_step > 0):
        raise ValueError(f"budget {budget_s} s and step time {s_per_step} s must both be positive")
    # Evaluations spread over the steps never cost less than the ones that actually run (floor), so this fits;
    # then up to one evaluation interval more may fit before the next evaluation is due.
    per_step = s_per_step + (eval_s / eval_steps if eval_steps else 0.0)
    steps = max(1, min(planned, math.floor(budget_s / per_step)))
    while steps < planned and _cost(steps + 1, s_per_step, eval_s, eval_steps) <= budget_s:
        steps += 1
    return StepBudget(budget_s, planned, steps, s_per_step, eval_s, eval_steps)


def _cost(steps: int, s_per_step: float, eval_s: float, eval_steps: int | None) -> float:
    return steps * s_per_step + (steps // eval_steps if eval_steps else 0) * eval_s


def check_minutes(value: Any, flag: str) -> None:
    """A time budget option is None (no budget) or a positive, finite number of minutes; else a UserError."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} must be a positive number of minutes, got {value!r}")
