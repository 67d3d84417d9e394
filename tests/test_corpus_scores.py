"""The rules on the real-log corpora (tests/fixtures/real and tests/fixtures/heldout: logs written by other
people, labelled by hand before any rule ran on them): on each corpus, no kind's precision or recall, on either
half, may drop below what
`src/prunetune/analysis/corpus_scores.json` recorded, no log may be read worse than it was, and the live alerts
(the rules replayed over each log as finetune raises them) may raise no more false alarms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunetune.analysis import corpus

REAL = Path(__file__).parent / "fixtures" / "real"


@pytest.fixture(scope="module", params=sorted(corpus.CORPORA))
def corpus_now(request):
    """(name, scores now) of one labelled corpus."""
    cases, outcomes = corpus.evaluate(corpus.CORPORA[request.param])
    return request.param, corpus.scores(cases, outcomes)


def test_both_corpora_are_the_fixtures():
    assert corpus.CORPORA["real"] == REAL.resolve() and corpus.CORPORA["heldout"] == REAL.parent.resolve() / "heldout"


def test_no_kind_drops_below_its_recorded_precision_and_recall(corpus_now):
    name, now = corpus_now
    recorded = json.loads(corpus.SCORES.read_text(encoding="utf-8"))[name]
    assert now["cases"] == recorded["cases"]
    drops = []
    for half in corpus.HALVES:
        for group in ("kinds", "status"):
            for kind, was in recorded[half][group].items():
                for metric in ("precision", "recall"):
                    before, after = was[metric], now[half][group][kind][metric]
                    if before is not None and (after is None or after < before - 1e-9):
                        drops.append(f"{half} {kind} {metric}: {before:.2f} -> {after}")
        if now[half]["healthy_false_alarms"] > recorded[half]["healthy_false_alarms"]:
            drops.append(f"{half}: false alarms on healthy runs {recorded[half]['healthy_false_alarms']} -> "
                         f"{now[half]['healthy_false_alarms']}")
        for key in ("live_healthy_false_alarms", "live_extra"):  # the live alerts replayed over each log
            if now[half][key] > recorded[half][key]:
                drops.append(f"{half}: {key} {recorded[half][key]} -> {now[half][key]}")
        if now[half]["correct"] < recorded[half]["correct"]:
            drops.append(f"{half}: logs read right {recorded[half]['correct']} -> {now[half]['correct']}")
    assert not drops, "\n".join(drops)


def test_the_split_is_fixed_by_the_name():
    """The halves never move: a changed split would let the test half's logs into the tuning."""
    names = json.loads((REAL / "labels.json").read_text(encoding="utf-8"))
    dev = [n for n in names if corpus.split(n) == "dev"]
    assert 0.35 < len(dev) / len(names) < 0.65
    assert corpus.split("llama3_8b_lora_3epochs_dir") == "test" and corpus.split("qwen7b_medical_llamafactory_dir") == "dev"


def test_a_fact_agrees_to_the_digits_its_label_was_written_with():
    assert corpus._same(0.0022, 0.0021693608723580837, "final_eval_loss")  # written to 2 significant digits
    assert not corpus._same(0.0022, 0.0023, "final_eval_loss")
    assert not corpus._same(0.5, 0.46, "final_eval_loss")  # one digit says too little
    assert not corpus._same(2e-05, 1.79e-05, "lr")  # the configured LR, not a rounding of the logged one
