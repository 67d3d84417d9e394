"""Diagnosis accuracy on the real-log corpora (issue 20): per-kind precision and recall of `prunetune report` on
tests/fixtures/real and tests/fixtures/heldout, dev and test halves, before round 3 (the rules of round 2,
bench/corpus_scores_round2.json) and now, written to its section of bench/RESULTS.md.

    .venv/bin/python bench/bench_corpus.py            # measure and write the section
    .venv/bin/python bench/bench_corpus.py --record   # also record corpus_scores.json (RULES.md, the regression test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunetune.analysis import corpus
from results import machine_line, write_section

ROUND2 = Path(__file__).with_name("corpus_scores_round2.json")
"""The scores of round 2's rules (7635426) per corpus: on `heldout` that is its first use, the held-out estimate."""


def _cell(before: float | None, after: float | None) -> str:
    fmt = corpus.fmt_score
    return fmt(after) if before == after else f"{fmt(before)} → {fmt(after)}"


def before_after(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Per kind and status: precision and recall on each half, `before → after` where they differ."""
    lines = ["| kind | labelled (dev/test) | precision dev | recall dev | precision test | recall test | precision all "
             "| recall all |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [*(("kinds", k) for k in before["all"]["kinds"]), *(("status", s) for s in corpus.STATUSES)]
    for group, key in rows:
        name = f"status:{key}" if group == "status" else key
        now = {h: after[h][group].get(key) for h in corpus.HALVES}
        if now["all"] is None:  # a kind that is a note now: information, not scored
            lines.append(f"| `{name}` | - | {corpus.fmt_score(before['dev'][group][key]['precision'])} → note | - | "
                         f"{corpus.fmt_score(before['test'][group][key]['precision'])} → note | - | "
                         f"{corpus.fmt_score(before['all'][group][key]['precision'])} → note (not scored) | - |")
            continue
        labelled = f"{now['dev']['tp'] + now['dev']['fn']}/{now['test']['tp'] + now['test']['fn']}"
        cells = [_cell(before[h][group][key][m], now[h][m]) for h in corpus.HALVES for m in ("precision", "recall")]
        lines.append(f"| `{name}` | {labelled} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(scores: Mapping[str, Any]) -> str:
    return "; ".join(
        f"{h}: {scores[h]['correct']}/{scores[h]['cases']} logs read right, {scores[h]['healthy_false_alarms']} false "
        f"alarms on {scores[h]['healthy']} healthy runs, live: {scores[h]['live_extra']} logs with an alarm outside "
        f"their labels ({scores[h]['live_healthy_false_alarms']} healthy)" for h in corpus.HALVES)


INTRO = """Two corpora of real training logs written by other people, labelled by hand and committed before any
rule ran on them, read the way a user runs `prunetune report` on them ({seconds:.0f} s for both, the live replay
included). Each is split into a dev and a test half by a fixed hash of each log's name
(`prunetune.analysis.corpus.split`).

- `real` (`tests/fixtures/real`, {real} logs): round 1 tuned on its dev half (its test half, unseen then, gave the
  first estimate, `bench/corpus_scores_round1.json`); round 2 studied every miss of both halves.
- `heldout` (`tests/fixtures/heldout`, {heldout} logs): collected apart; the rules of round 2 ran on it once,
  unchanged: that run (the section below this one, and the "before" column here) is **the honest
  generalisation estimate**. Round 3 then studied each of its misses and fixed the classes of defect they showed
  (RULES.md gives each rule's reason), so the numbers after the arrow are **dev numbers for both corpora**: no
  held-out estimate of round 3's rules exists until a third corpus is collected apart.

Leave one corpus out, honestly: rules tuned on `real` (rounds 1-2) and measured on `heldout` gave 34/46 logs
read right, 2 false alarms on 20 healthy runs (the first-use table below): that is the only out-of-corpus
estimate there is. Round 3 was tuned on `heldout` and only checked against `real` (which rounds 1-2 had tuned
on): an unchanged `real` score is a regression check, not a generalisation estimate in either direction.

Before → after: the rules of round 2 (7635426, `bench/corpus_scores_round2.json`) → now."""


ROUND3 = """Round 3: the 12 logs the first held-out run read wrong, each classified (a class of defect fixed,
never a per-log case or a threshold moved to fit one file):

| log | first use | class | outcome |
|---|---|---|---|
| `qa_unsloth_eval_every_step_rises_state` | missed overfitting | rule: train loss judged over the last two evaluations (2 steps of batch noise with an eval every step) | judged since the eval's best: fixed |
| `entrenar_qwen3_qlora_diverge_after_220_issue` | missed diverging | rule: a climb back from the run's low was only seen above the first log, and window medians of 8 points average fall and rise | climb at every log since the low, 1.5x beyond the noise: fixed |
| `text_simplification_end_rise_state` | missed diverging | rule: no divergence was ever judged near zero | near zero as anywhere: a rise must give back >= 10% of the run's fall: fixed |
| `stanford_alpaca_full_ft_staircase_state` | false diverging | rule: a multi-epoch creep through the last epoch (6% of the fall given back, LR decaying to 0) read as LR too high | same share rule: fixed |
| `insightface_fp16_scale_zero_loss_nan_issue` | refused | reader: a log line a paste wrapped in two; `LearningRate` without separator | lines joined: fixed |
| `graduate_agent_llamafactory_loss_zero_jsonl` | flat missed, false overfitting | rule: 122 -> exactly 0.0 from the second log read as memorisation | exact zero with no descent is frozen: fixed |
| `unsloth_60_steps_loss_to_zero_nan_grad_state` | missed overfitting | rule: losses of -0.0003 (rounding of ~0) disqualified memorisation | a hair below zero counts as zero: fixed |
| `qwen25vl_chartqa_string_dicts_notebook` | false overfitting | rule: the low tail of a noisy curve (5-point median 0.03, 0.26 after it) read as memorised | the low must hold (median from it on near zero): fixed |
| `cas4133_lr1e-5_2ep_slow_state` | missed slow | rule: a second half with a third of the LR exposure must fall beyond the noise, which its pace cannot reach | pace per unit of LR decides there: fixed |
| `codette_50steps_warmup_whole_run_state` | missed slow | rule: a finished run whose warm-up never ended was never judged | judged on its whole curve: fixed |
| `creative_generation_unsloth_60_flat_state` | missed flat | none found: the first three losses sit 2.4 sigma above the plateau, which the rules read as a fall that levelled off; the label reads noise | left alone (moving the band would fit this file) |
| `guanaco_qlora_25ep_sawtooth_memorise_state` | missed overfitting | threshold: memorised at 0.07, above `overfit_memorise_loss` 0.05 | left alone (raising it would fit this file) |

Also fixed on the way, from the held-out fact and status misses: a checkpoint's trainer_state one logging interval
short of max_steps is interrupted (`tweets_...`); an end-of-run line (`Training time:`) means finished (`cs336_...`);
a console dict's own `global_step/max_steps` (`msswift_...`); a log with a sanity run before the real one is read
from its last run (`paligemma_...`); a Colab bar without blocks keeps its description (`gemma4_...`); a printed
training command states its settings (`qwen25vl_...`). One label corrected (schema, not judgement; README says
why): `gemma4_...` best_eval_step `"epoch 1.895"` -> 100. The scorer now also accepts a fact at the significant
digits its label was written with (two at least, never the LR): `smolvlm_...` 0.0022 for 0.0021694."""


def _corpus_body(name: str, before: Mapping[str, Any], now: Mapping[str, Any], cases: list, outcomes: dict) -> str:
    """One corpus: its table, summaries, facts and the logs still read differently from their label."""
    refused = [c.name for c in cases if outcomes[c.name].error]
    misread = corpus.mismatches(cases, outcomes)
    facts = ", ".join(f"{k} {before['all']['facts'][k][0]} → {v[0]}/{v[1]}" for k, v in now["all"]["facts"].items()
                      if v[1])
    return f"""### `{name}`

{before_after(before, now)}

Before: {summary(before)}.

After: {summary(now)}.

Facts the report states, right (before → after) of labelled: {facts}.

Refused (one-line UserError, no curve read): {', '.join(refused) or 'none'}.

Logs still read differently from their label (all of them, both halves):

""" + "\n".join(f"- {line}" for line in misread) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"also write {corpus.SCORES.name}")
    args = parser.parse_args()
    t0 = time.perf_counter()
    runs = {name: corpus.evaluate(root) for name, root in corpus.CORPORA.items()}
    now = {name: corpus.scores(*run) for name, run in runs.items()}
    seconds = time.perf_counter() - t0
    if args.record:
        corpus.SCORES.write_text(json.dumps(now, indent=1) + "\n", encoding="utf-8")
    before = json.loads(ROUND2.read_text(encoding="utf-8"))
    live = ("Live: each log is also replayed through the same rules in order, as `prunetune finetune` raises alerts "
            "while a run trains (an alert, once raised, stays, and the run's report carries it); an alarm a partial "
            "run raised and the full log would not is counted.")
    body = "\n\n".join([machine_line(), INTRO.format(seconds=seconds, real=now["real"]["cases"],
                                                      heldout=now["heldout"]["cases"]), live, ROUND3,
                         *(_corpus_body(name, before[name], now[name], *runs[name]) for name in runs)])
    write_section("corpus", "Diagnosis accuracy on the real-log corpora (`bench/bench_corpus.py`, issue 20)", body)
    for name in runs:
        print(name, before_after(before[name], now[name]), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
