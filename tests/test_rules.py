"""Diagnosis rules on synthetic series: each rule fires on its pattern, stays silent on healthy runs, and needs
enough evidence."""

from __future__ import annotations

import json
import math
import random

import pytest

from prunetune.analysis.anomaly import ANOMALY_KINDS, NOTE_KINDS, Anomaly
from prunetune.analysis.context import fix_context
from prunetune.analysis.rules import diagnose
from prunetune.analysis.series import oscillation_stats, trend_stats, trend_z, warmup_end_index, windows
from prunetune.analysis.thresholds import Thresholds, thresholds_from_mapping
from prunetune.analysis.verdicts import rate_perplexity, verdicts
from prunetune.fmt import fmt_lr


def logs(values, every=10, lr=1e-4, start=1):
    return [{"event": "log", "step": start + i * every, "loss": v, "lr": lr, "grad_norm": 1.0}
            for i, v in enumerate(values)]


def evals(pairs):
    return [{"event": "eval", "step": s, "eval_loss": v} for s, v in pairs]


def healthy_curve(n=60, noise=0.03, seed=0):
    rng = random.Random(seed)
    return [4.0 * math.exp(-i / 12) + 2.0 + rng.gauss(0, noise) for i in range(n)]


def ctx(settings):
    """The FixContext of settings given as a mapping (a run_config-style dict)."""
    return fix_context([("the test's settings", settings)], flavour=settings.get("flavour", "prunetune"),
                       resume_command=settings.get("resume_command"))


def kinds(records, **kw):
    return [a.kind for a in diagnose(records, **kw)]


def test_vocabulary_and_record_shape():
    for k in ("loss_flat", "loss_slow", "loss_oscillating", "overfitting", "eval_far_above_train", "nan_inf",
              "out_of_memory", "no_eval"):
        assert k in ANOMALY_KINDS
    rec = Anomaly("nan_inf", "error", "m", {"a": 1}, "f", 7, ("lr 1e-4 (run_config.json)",)).to_record()
    assert rec == {"event": "alert", "step": 7, "kind": "nan_inf", "severity": "error", "message": "m",
                   "evidence": {"a": 1}, "fix": "f", "basis": ["lr 1e-4 (run_config.json)"]}
    json.dumps(rec)
    with pytest.raises(ValueError):
        Anomaly("made_up", "error", "m")
    with pytest.raises(ValueError):
        Anomaly("nan_inf", "fatal", "m")
    # `info` is the severity of the notes and of them only: a note is never an alarm, an alarm never a note
    assert NOTE_KINDS == ("no_eval",) and not Anomaly("no_eval", "info", "m").alarm
    for kind, severity in (("no_eval", "warning"), ("nan_inf", "info")):
        with pytest.raises(ValueError):
            Anomaly(kind, severity, "m")


def test_thresholds_from_flags_and_yaml():
    # NAME=VALUE flags give floats, YAML gives lists: counts become ints, bands tuples
    th = thresholds_from_mapping({"min_train_points": 20.0, "ppl_relative_bands": [1.2, 2.0, 5.0]})
    assert th.min_train_points == 20 and isinstance(th.min_train_points, int)
    assert th.ppl_relative_bands == (1.2, 2.0, 5.0)
    quiet = [2.5 + 0.001 * (i % 3) for i in range(15)]
    assert kinds(logs(quiet)) == ["loss_flat"] and kinds(logs(quiet), thresholds=th) == []
    with pytest.raises(ValueError, match="valid: min_train_points"):
        thresholds_from_mapping({"bogus": 1})
    with pytest.raises(ValueError, match="whole number"):
        Thresholds(min_window=2.5)


def test_thresholds_validated():
    with pytest.raises(ValueError):
        Thresholds(window_fraction=0.9)
    with pytest.raises(ValueError):
        Thresholds(flat_max_rel_change=-1)
    with pytest.raises(ValueError):
        Thresholds(min_train_points=3, min_window=3)


def test_healthy_run_raises_nothing_at_any_prefix():
    train = logs(healthy_curve())
    ev = evals([(s, 4.0 * math.exp(-(s / 10) / 12) + 2.1) for s in range(100, 601, 100)])
    records = sorted(train + ev, key=lambda r: (r["step"], r["event"] == "eval"))
    for n in range(1, len(records) + 1):
        assert diagnose(records[:n]) == [], f"false alarm after {n} records"
    assert diagnose(records, final=True) == []
    v = verdicts(records)
    assert v["train_loss"].status == "ok" and v["train_loss"].symbol == "✅"
    assert v["eval_loss"].label == "improving"


def test_flat_loss_is_an_error_with_config_fix():
    rng = random.Random(1)
    records = logs([5.0 + rng.gauss(0, 0.02) for _ in range(30)])
    found = diagnose(records)
    assert [a.kind for a in found] == ["loss_flat"]
    assert found[0].severity == "error"
    assert "labels" in found[0].fix
    assert verdicts(records)["train_loss"].label == "flat"


def test_exactly_constant_loss_is_flat():
    assert kinds(logs([2.5] * 20)) == ["loss_flat"]


def test_slow_linear_decline_names_a_higher_lr():
    rng = random.Random(2)
    records = logs([6.0 - 0.004 * i + rng.gauss(0, 0.004) for i in range(40)])
    found = diagnose(records, context=ctx({"lr": 1e-4}))
    assert [a.kind for a in found] == ["loss_slow"]
    assert "raise --lr from 1e-4 to 3e-4" in found[0].fix
    assert found[0].evidence["rel_drop"] > 0
    assert verdicts(records)["train_loss"].reason == "LR too low"


def test_small_drop_that_plateaued_is_not_slow():
    # converged fine-tuning: 8% drop, all of it early -> healthy, not "LR too low"
    values = [2.0 - 0.16 * (1 - math.exp(-i / 3)) for i in range(40)]
    assert kinds(logs(values)) == []


def test_oscillating_loss_names_lower_lr_or_more_accumulation():
    rng = random.Random(3)
    values = [4.0 + (0.8 if i % 2 else -0.8) * rng.uniform(0.6, 1.0) for i in range(30)]
    found = diagnose(logs(values), context=ctx({"lr": 3e-4, "gradient_accumulation_steps": 2}))
    assert [a.kind for a in found] == ["loss_oscillating"]
    assert "lower --lr from 3e-4 to 1e-4" in found[0].fix
    assert "--gradient_accumulation_steps from 2 to 8" in found[0].fix
    assert verdicts(logs(values))["train_loss"].label == "oscillating"


def test_noisy_but_decreasing_is_not_oscillating():
    assert kinds(logs(healthy_curve(noise=0.08, seed=4))) == []


def test_diverging_loss():
    values = [6.0 - 0.05 * i for i in range(10)] + [5.5 + 0.5 * i for i in range(15)]
    found = diagnose(logs(values), context=ctx({"lr": 1e-3}))
    assert found[0].kind == "loss_diverging"
    assert "lower --lr from 1e-3" in found[0].fix
    assert "loss_slow" not in kinds(logs(values))


def test_spike_then_plateau_far_above_start_is_diverging():
    # what a 300x LR does to a tiny model: one jump far above the untrained loss, noisy there
    rng = random.Random(5)
    values = [6.2, 20.0, 50.0] + [45 + rng.gauss(0, 8) for _ in range(25)]
    assert "loss_diverging" in kinds(logs(values))


def test_nan_loss_is_an_error_with_step_and_last_good_value():
    values = healthy_curve(20)
    records = logs(values) + [{"event": "log", "step": 300, "loss": "nan", "lr": 1e-4, "grad_norm": "nan"}]
    found = diagnose(records, context=ctx({"lr": 1e-4}))
    assert found[0].kind == "nan_inf" and found[0].severity == "error"
    assert found[0].step == 300
    assert found[0].evidence["last_finite_loss_step"] == records[19]["step"]
    assert "--lr 1e-5" in found[0].fix and "learning rate 1e-4 (the test's settings)" in found[0].basis
    foreign = diagnose(records, context=ctx({"learning_rate": 1e-4, "flavour": "trainer"}))[0]
    assert "--learning_rate 1e-5" in foreign.fix and "logging_nan_inf_filter false" in foreign.fix


def test_inf_grad_norm_alone_is_caught():
    records = logs(healthy_curve(5))
    records[3]["grad_norm"] = float("inf")
    assert kinds(records) == ["nan_inf"]


def test_nan_as_first_record_does_not_crash():
    assert kinds([{"event": "log", "step": 1, "loss": "nan"}]) == ["nan_inf"]


def test_out_of_memory_fix_names_flags_and_resume():
    settings = {"block_size": 1024, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                "resume_command": "prunetune finetune --resume_from_checkpoint auto --out run"}
    # at its first step nothing fits: the memory levers, from the run's own values
    at_start = [{"event": "error", "step": None, "kind": "out_of_memory", "message": "CUDA"}]
    found = diagnose(at_start, context=ctx(settings))
    assert found[0].kind == "out_of_memory"
    fix = found[0].fix
    assert "--block-size 512" in fix and "--gradient_checkpointing" in fix
    assert "--per_device_train_batch_size 2 with --gradient_accumulation_steps 4" in fix
    assert settings["resume_command"] in fix
    assert "block size 1024 (the test's settings)" in found[0].basis
    bare = diagnose(at_start)[0].fix
    assert "--per_device_train_batch_size 1" in bare
    # after 25 steps that fit: not "the model does not fit", but what grows during a run
    later = logs(healthy_curve(3)) + [{"event": "error", "step": 25, "kind": "out_of_memory", "message": "CUDA"}]
    (oom,) = diagnose(later, context=ctx(settings))
    assert oom.step == 25 and "the first 25 steps fit" in oom.fix and "expandable_segments" in oom.fix
    assert "now 1024" in oom.fix
    during_eval = later[:-1] + [{**later[-1], "during": "evaluation"}]
    assert "--per_device_eval_batch_size 1" in diagnose(during_eval)[0].fix


def test_overfitting_eval_rising_while_train_falls():
    train = logs([3.0 - 0.04 * i for i in range(40)])
    ev = evals([(100, 2.9), (200, 2.7), (300, 2.75), (400, 2.85)])
    found = diagnose(train + ev, context=ctx({"lora_dropout": 0.05, "epochs": 4}))
    assert "overfitting" in [a.kind for a in found]
    a = next(a for a in found if a.kind == "overfitting")
    assert a.evidence["best_eval_step"] == 200
    assert "--lora_dropout from 0.05 to 0.1" in a.fix and "--epochs 2" in a.fix
    assert verdicts(train + ev)["eval_loss"].label == "rising"


def test_one_eval_rise_is_not_overfitting():
    train = logs([3.0 - 0.04 * i for i in range(40)])
    ev = evals([(100, 2.9), (200, 2.7), (300, 2.6), (400, 2.65)])
    assert "overfitting" not in kinds(train + ev)


def test_eval_and_train_rising_together_is_not_overfitting():
    train = logs([3.0 - 0.04 * i for i in range(20)] + [2.2 + 0.1 * i for i in range(20)])
    ev = evals([(100, 2.9), (200, 2.7), (300, 2.9), (400, 3.4)])
    assert "overfitting" not in kinds(train + ev)


def test_eval_far_above_train_needs_two_evals():
    train = logs(healthy_curve(40, noise=0.0))
    one = evals([(200, 4.0)])
    assert "eval_far_above_train" not in kinds(train + one)
    two = evals([(200, 4.0), (390, 3.9)])
    found = diagnose(train + two)
    assert [a.kind for a in found] == ["eval_far_above_train"]
    assert found[0].evidence["gap_nats"] > 0.5


def test_no_eval_only_at_the_end():
    records = logs(healthy_curve(30))
    assert kinds(records) == []
    # an excerpt, or a run that stopped before its first evaluation was due: nothing to say about evaluation
    assert diagnose(records, final=True) == []
    finished = records + [{"event": "train_end", "step": 291}]
    found = diagnose(finished, final=True)
    assert [(a.kind, a.severity) for a in found] == [("no_eval", "info")]
    assert "set eval_steps" in found[0].message and "--eval_strategy steps" in found[0].fix
    # an older run that recorded the note as a warning alert reads back as the note it is
    old = [*finished, {"event": "alert", "step": 291, "kind": "no_eval", "severity": "warning", "message": "m"}]
    assert [(a.kind, a.severity) for a in diagnose(old, recorded=True)] == [("no_eval", "info")]


def test_too_few_steps_say_nothing():
    # per-step logging: 20 points over 20 steps is not enough to judge a trend
    rng = random.Random(7)
    assert kinds(logs([2.5 + rng.gauss(0, 0.001) for _ in range(20)], every=1)) == []
    assert kinds(logs([2.5 + rng.gauss(0, 0.001) for _ in range(60)], every=1)) == ["loss_flat"]


def test_frozen_model_is_flat_at_once():
    # what lr=1e30 does: a saturated network, the same loss to the last digit and a zero gradient
    records = logs([6.27] + [6.2383] * 6, every=1)
    found = diagnose(records, context=ctx({"lr": 1e30}))
    assert [a.kind for a in found] == ["loss_flat"]
    assert found[0].evidence["identical_losses"] == 6 and "an absurd LR" in found[0].fix
    zero = logs([6.3, 6.2, 6.25, 6.22], every=1)
    for r in zero[1:]:
        r["grad_norm"] = 0.0
    assert kinds(zero) == ["loss_flat"]
    assert kinds(logs([6.2383] * 5, every=1)) == []


def test_noisy_per_step_logging_is_healthy():
    # batch-1 fine-tuning logged every step: 10% noise around a falling curve is not oscillation
    for seed in range(5):
        rng = random.Random(seed)
        values = [(1.6 * math.exp(-i / 50) + 1.2) * (1 + rng.gauss(0, 0.1)) for i in range(300)]
        records = logs(values, every=1)
        for n in range(10, len(records) + 1, 10):
            assert diagnose(records[:n]) == [], (seed, n)


def test_too_few_points_say_nothing():
    assert kinds(logs([6.0, 6.0, 6.0])) == []
    assert kinds(logs([6.0, 9.0, 3.0, 12.0])) == []
    assert kinds([]) == []
    assert verdicts(logs([6.0, 5.0]))["train_loss"].status == "unknown"


def test_warmup_defers_flat_and_slow():
    rng = random.Random(6)
    flat = [5.0 + rng.gauss(0, 0.01) for _ in range(20)]
    warming = [{"event": "log", "step": i * 10, "loss": v, "lr": 1e-5 * (i + 1)} for i, v in enumerate(flat)]
    assert kinds(warming) == []
    assert warmup_end_index([(1, 1.0), (2, 2.0), (3, 2.0)]) == 1
    assert warmup_end_index([(1, 1.0), (2, 2.0)]) is None


def test_string_values_and_unknown_events_are_tolerated():
    records = [{"event": "config", "lr": "x"}, {"event": "log", "step": "5", "loss": "6.2"}, {"event": "log"}]
    records += logs(healthy_curve(20), start=10)
    assert kinds(records) == []


def test_statistics_helpers():
    th = Thresholds()
    pts = [(i * 10, 10.0 - i * 0.1) for i in range(20)]
    tr = trend_stats(pts, th)
    assert tr is not None and tr.rel_change > 0 and tr.first_median > tr.last_median
    osc = oscillation_stats([(i * 10, 5.0 + (1 if i % 2 else -1)) for i in range(20)], th)
    assert osc is not None and osc.sign_change_fraction == 1.0 and osc.rel_amplitude == pytest.approx(0.4, rel=0.05)
    assert trend_stats(pts[:3], th) is None
    # Mann-Kendall by hand: n=5 strictly rising has S=10 and variance 5*4*15/18; continuity-corrected z=9/sd
    assert trend_z([1, 2, 3, 4, 5]) == pytest.approx(9 / math.sqrt(5 * 4 * 15 / 18))
    assert trend_z([3, 2, 1]) < 0 and trend_z([2.5] * 20) == 0.0
    # ties carry no order: 1,1,2,2,3,3 has S=12 and variance (6*5*17 - 3*(2*1*9)) / 18
    assert trend_z([1, 1, 2, 2, 3, 3]) == pytest.approx(11 / math.sqrt((6 * 5 * 17 - 3 * 18) / 18))
    windows_even = windows([1.0] * 9, th)
    assert len(windows_even[0]) == 4  # rounded up to an even count: an alternation never swings a median


def test_fmt_lr():
    assert fmt_lr(1e-4) == "1e-4"
    assert fmt_lr(3e-4) == "3e-4"
    assert fmt_lr(2.5e-5) == "2.5e-5"


@pytest.mark.parametrize(
    ("ppl", "dense", "band"),
    [(12.0, 10.0, "ideal"), (13.0, 10.0, "ideal"), (15.0, 10.0, "good"), (20.0, 10.0, "good"),
     (99.0, 10.0, "fair"), (101.0, 10.0, "poor")],
)
def test_relative_bands(ppl, dense, band):
    r = rate_perplexity(ppl, dense)
    assert r.band == band and r.ratio == pytest.approx(ppl / dense)


@pytest.mark.parametrize(("ppl", "band"), [(6.8, "ideal"), (8.0, "good"), (30.0, "fair"), (51.0, "poor")])
def test_llama2_bands(ppl, band):
    assert rate_perplexity(ppl, bands="llama2-7b").band == band


def test_rating_edge_cases():
    assert rate_perplexity(12.0).band == "unrated"
    assert "--dense-ppl" in rate_perplexity(12.0).text
    assert rate_perplexity(None, 10.0).band == "unrated"
    assert rate_perplexity(float("nan"), 10.0).band == "poor"
    with pytest.raises(ValueError):
        rate_perplexity(10.0, bands="gpt2")


def test_eval_verdict_of_a_run_that_ends_worse_than_it_started():
    train = logs([6.0, 30.0, 50.0] + [40.0] * 20)
    ev = evals([(50, 56.0), (150, 30.0), (220, 20.0)])
    v = verdicts(train + ev)
    assert v["eval_loss"].label == "worse than the start" and v["eval_loss"].status == "warning"
    assert fmt_lr(1.0) == "1" and fmt_lr(0.3333) == "0.33"


def test_growing_list_gives_the_same_answer_as_a_fresh_one():
    # the trainer passes one list that grows; diagnose scans only the new records of it
    records = logs(healthy_curve(30))
    live: list = []
    for rec in records:
        live.append(rec)
        assert diagnose(live) == diagnose(list(live))
    live.append({"event": "log", "step": 999, "loss": "nan", "lr": 1e-4})
    assert [a.kind for a in diagnose(live)] == ["nan_inf"]
    other = logs(healthy_curve(30))
    assert diagnose(other) == []
    live[0] = {"event": "log", "step": 1, "loss": "inf"}  # rewritten, not appended: scanned afresh
    assert "nan_inf" in [a.kind for a in diagnose(live)] and diagnose(live)[0].step == 1


def test_rules_documentation_is_the_code():
    from pathlib import Path

    from prunetune.analysis import anomaly, rules_doc

    assert set(anomaly.KIND_DOCS) == set(ANOMALY_KINDS)
    doc = (Path(rules_doc.__file__).parent / "RULES.md").read_text(encoding="utf-8")
    assert doc == rules_doc.describe(), "regenerate: python -m prunetune.analysis.rules_doc > src/prunetune/analysis/RULES.md"
    from dataclasses import fields

    for f in fields(Thresholds):
        assert f"| `{f.name}` |" in doc


def test_live_diagnosis_matches_diagnose_record_by_record():
    from prunetune.analysis.rules import LiveDiagnosis

    records = logs(healthy_curve(30)) + evals([(100, 4.0), (200, 3.0)])
    records.append({"event": "log", "step": 999, "loss": "nan", "lr": 1e-4})
    live = LiveDiagnosis(context=ctx({"lr": 1e-4}))
    for n, rec in enumerate(records, 1):
        assert live([rec]) == diagnose(records[:n], context=ctx({"lr": 1e-4}))
    assert [a.kind for a in live([], final=True)] == ["nan_inf"]


def test_noisy_evaluations_that_stay_above_their_best_are_overfitting():
    train = logs([3.0 - 0.04 * i for i in range(40)])
    noisy = evals([(100, 2.9), (150, 2.7), (200, 2.86), (250, 2.84), (300, 2.95), (350, 2.93), (400, 3.0)])
    found = diagnose(train + noisy, context=ctx({"flavour": "trainer"}))
    over = next(a for a in found if a.kind == "overfitting")
    assert over.evidence["best_eval_step"] == 150 and "stayed above its best" in over.message
    assert "--lora_dropout (LoraConfig)" in over.fix
    recovered = evals([(100, 2.9), (150, 2.7), (200, 2.86), (250, 2.84), (300, 2.69), (400, 2.66)])
    assert "overfitting" not in kinds(train + recovered)


def test_slow_at_a_constant_lr_up_to_16_percent():
    rng = random.Random(21)
    values = [2.4 - 0.32 * i / 100 + rng.gauss(0, 0.01) for i in range(100)]  # -13%, still linear
    assert kinds(logs(values, lr=1e-6)) == ["loss_slow"]
    decaying = [{**r, "lr": 1e-6 * (1 - i / 100)} for i, r in enumerate(logs(values))]
    assert kinds(decaying) == []  # a decaying LR gives the 13% run the benefit of the doubt


# ---------------------------------------------------------------------------------------------------------
# Round 2 (issue 20): each rule's class, not the logs it was found on


def test_per_step_jumps_are_an_oscillation_however_few_the_steps():
    # a tqdm "Running loss" every step: 13 points over 12 steps, jumps of 50-250% around a level of ~0.8
    values = [0.50, 0.61, 0.98, 0.56, 0.81, 0.50, 0.88, 0.94, 1.03, 0.40, 1.00, 1.74, 0.49]
    assert "loss_oscillating" in kinds(logs(values, every=1, start=1321))


def test_one_outlying_batch_is_never_an_oscillation():
    # a frozen model's per-step losses with one easy batch: the dip makes two x2 jumps, a quarter of 8 jumps
    values = [2.94, 2.84, 2.75, 2.90, 2.81, 1.34, 2.95, 2.83, 2.74, 2.92]
    assert oscillation_stats(list(enumerate(values)), Thresholds()).large_jumps == 2
    assert "loss_oscillating" not in kinds(logs(values, every=1))


def test_an_early_oscillation_is_reported_at_the_end_of_the_run():
    rng = random.Random(11)
    swinging = [rng.choice((0.3, 1.0, 3.0, 6.0)) for _ in range(60)]
    calm = [2.0 - 0.002 * i + rng.gauss(0, 0.01) for i in range(240)]
    records = logs(swinging + calm, every=1) + [{"event": "train_end", "step": 300}]
    assert "loss_oscillating" not in kinds(records)  # the latest points are calm: the live rule is quiet now
    found = [a for a in diagnose(records, final=True) if a.kind == "loss_oscillating"]
    assert found and "oscillated between steps" in found[0].message and found[0].step <= 100
    assert found[0].evidence["until_step_then_calm"] == found[0].step


def test_a_loss_below_zero_has_no_log_scale():
    # a custom objective that runs away below zero: ratios of losses mean nothing, no x-fold "jump" is read
    values = [-10.0 * i - 5 + (3 if i % 3 else -3) for i in range(40)]
    assert oscillation_stats([(i, v) for i, v in enumerate(values)], Thresholds()).log_jump == 0.0


def test_a_confident_classifier_near_zero_does_not_oscillate():
    rng = random.Random(12)
    values = [0.07 * math.exp(rng.gauss(0, 0.5)) for _ in range(200)]  # +-50% batch to batch around 0.07
    assert "loss_oscillating" not in kinds(logs(values))


def test_a_loss_that_goes_to_inf_and_never_comes_back_diverged():
    records = logs([240023.775]) + [{"event": "log", "step": 11, "loss": "inf", "lr": 1e-4},
                                    {"event": "log", "step": 21, "loss": "nan", "lr": 1e-4}]
    found = {a.kind: a for a in diagnose(records)}
    assert {"nan_inf", "loss_diverging"} <= set(found)
    assert "went from 2.4e+05 at step 1 to inf at step 11" in found["loss_diverging"].message
    # one overflowing batch the run came back from is a numerical event, not a divergence
    back = logs(healthy_curve(20)) + [{"event": "log", "step": 205, "loss": "inf", "lr": 1e-4}] \
        + logs(healthy_curve(20)[-5:], start=211)
    assert "loss_diverging" not in kinds(back)


def test_a_climb_back_above_the_best_with_exploding_gradients_is_a_divergence():
    values = [1.36, 0.48, 0.58, 0.70, 0.66, 1.04, 0.66, 0.68, 0.86, 0.82]
    quiet = [0.24, 0.27, 0.31, 0.28, 0.25, 0.3, 0.26, 0.27, 0.29, 0.28]
    exploding = [0.24, 0.27, 1.36, 1.28, 17.2, 7.1, 21.8, 23.0, 3.8, 14.4]

    def run(norms):
        return [{**r, "grad_norm": g} for r, g in zip(logs(values, every=10), norms, strict=True)]
    assert "loss_diverging" not in kinds(run(quiet))  # within the noise of a jumpy 10-point curve
    found = [a for a in diagnose(run(exploding)) if a.kind == "loss_diverging"]
    assert found and found[0].evidence["grad_norm_growth"] >= 10 and "gradient norm grew" in found[0].message


def test_a_memorised_loss_creeping_near_zero_is_not_a_divergence():
    rng = random.Random(13)
    values = [2.0 * math.exp(-i / 5) + 0.005 for i in range(40)] + [0.009 + 0.0002 * i + rng.gauss(0, 0.001)
                                                                   for i in range(40)]
    assert "loss_diverging" not in kinds(logs(values))


def test_flat_needs_no_steady_trend_and_the_noise_to_resolve_a_healthy_fall():
    rng = random.Random(14)
    flat = [2.14 + rng.gauss(0, 0.1) for _ in range(100)]
    assert kinds(logs(flat)) == ["loss_flat"]
    # a slow steady fall inside wide noise: the windows cannot tell, every pair of points can (Mann-Kendall)
    falling = [2.4 - 0.004 * i + rng.gauss(0, 0.1) for i in range(100)]
    assert "loss_flat" not in kinds(logs(falling))
    # 3% into a planned run, +-5% noise cannot show the 0.3% a healthy run has made of its fall by then
    planned = [{**r, "max_steps": 30000} for r in logs(flat)]
    assert "loss_flat" not in kinds(planned)


def test_flat_is_judged_after_the_warm_up():
    rng = random.Random(15)
    records = [{"event": "log", "step": 10 * (i + 1), "loss": 1.2 + rng.gauss(0, 0.05),
                "lr": 1e-5 * min(1.0, (i + 1) / 10)} for i in range(16)]
    assert "loss_flat" not in kinds(records)  # 6 points after a 10-log warm-up are too few


def test_slow_is_judged_on_what_the_run_reaches_by_its_planned_end():
    rng = random.Random(16)
    values = [2.8 - 0.004 * i + rng.gauss(0, 0.01) for i in range(40)]  # -6% over 400 steps
    assert kinds(logs(values)) == ["loss_slow"]  # the run ended there: too slow
    early = [{**r, "max_steps": 3000} for r in logs(values)]
    assert kinds(early) == []  # at this pace it reaches -40% by step 3000


def test_an_eval_loss_that_levelled_off_is_a_plateau_not_an_lr_limited_fall():
    rng = random.Random(17)
    # train -13% at a decaying LR (falling as fast per unit of LR all along), the eval -3%: slow (up to 16%)
    # while the eval loss still falls at its pace ...
    lrs = [1e-4 * (1 - 0.8 * i / 400) for i in range(400)]
    exposure = [sum(lrs[:i]) for i in range(400)]
    train = [{**r, "lr": lr} for r, lr in zip(logs([1.95 - 0.25 * e / exposure[-1] + rng.gauss(0, 0.01)
                                                    for e in exposure]), lrs, strict=True)]
    still = evals([(500 * (k + 1), 1.60 - 0.007 * k) for k in range(8)])
    assert "loss_slow" in kinds(sorted(train + still, key=lambda r: r["step"]))
    # ... not once the eval loss levelled off at its floor on this data
    levelled = evals([(500 * (k + 1), 1.55 + 0.05 * math.exp(-k / 1.2)) for k in range(8)])
    assert "loss_slow" not in kinds(sorted(train + levelled, key=lambda r: r["step"]))


def test_memorised_with_a_log_every_500_steps():
    records = logs([0.474, 0.0261, 0.0141, 0.0109, 0.0089, 0.0081], every=500, start=500)
    found = [a for a in diagnose(records) if a.kind == "overfitting"]
    assert found and found[0].evidence["train_loss_start"] == 0.474


def test_window_medians_do_not_swing_with_an_alternation():
    # batches of two kinds taking turns (a saw-tooth), falling slowly: never "rising"
    values = [2.25, 1.09, 1.45, 0.98, 1.29, 0.99, 1.29, 1.02, 1.25]
    assert "loss_diverging" not in kinds(logs(values, every=25, start=25))
