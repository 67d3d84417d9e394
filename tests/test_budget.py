"""Time budgets as step counts: the pure fitting of steps (and evaluations between them) into a budget."""

import pytest

from prunetune.budget import fit_steps


def _cost(steps, s_per_step, eval_s, eval_steps):
    return steps * s_per_step + (steps // eval_steps if eval_steps else 0) * eval_s


@pytest.mark.parametrize("budget,planned,step,eval_s,every", [
    (300, 120, 2.0, 0.0, None), (300, 120, 2.0, 30.0, 40), (300, 1000, 0.7, 12.0, 10), (61, 1000, 1.0, 5.0, 20),
    (10, 5, 1.0, 0.0, None), (0.5, 100, 1.0, 0.0, None), (100, 100, 0.9, 100.0, 7),
])
def test_fit_is_the_most_steps_whose_exact_cost_fits(budget, planned, step, eval_s, every):
    fit = fit_steps(budget, planned, step, eval_s, every)
    assert 1 <= fit.steps <= planned
    if fit.steps > 1:
        assert _cost(fit.steps, step, eval_s, every) <= budget
    if fit.steps < planned:  # one more step would not fit
        assert _cost(fit.steps + 1, step, eval_s, every) > budget
    assert fit.cut == (fit.steps < planned)
    assert fit.record() == {"budget_s": budget, "planned_steps": planned, "budget_steps": fit.steps,
                            "budget_cut": fit.cut}


def test_evaluations_count_only_when_they_run():
    # 40 steps x 2 s = 80 s, plus the evaluation due at step 40 (30 s): 110 s does not fit 100 s, 39 steps do.
    assert fit_steps(100, 120, 2.0, 30.0, 40).steps == 39
    assert fit_steps(110, 120, 2.0, 30.0, 40).steps == 40
    assert fit_steps(1e9, 120, 2.0, 30.0, 40).steps == 120  # nothing cut: the plan stands


def test_bad_measurements_are_refused():
    with pytest.raises(ValueError):
        fit_steps(100, 10, 0.0)
    with pytest.raises(ValueError):
        fit_steps(0, 10, 1.0)
