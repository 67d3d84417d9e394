"""Diagnosis accuracy on the real-log corpus (issue 20): per-kind precision and recall of `prunetune report` on
tests/fixtures/real, dev and test halves, written to its section of bench/RESULTS.md.

    .venv/bin/python bench/bench_corpus.py            # measure and write the section
    .venv/bin/python bench/bench_corpus.py --record   # also record corpus_scores.json (RULES.md, the regression test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prunetune.analysis import corpus
from results import machine_line, write_section

REAL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real"


def _lenient(cases, outcomes) -> dict:
    """The scores with `no_eval` read the way the corpus README defines it ("only ever allowed: a run without
    eval is a choice"): allowed on every log. The labels are not changed; this is a second reading beside the
    strict one."""
    relaxed = [corpus.Case(c.name, c.path, c.kinds, c.allowed | {"no_eval"}, c.status, c.facts) for c in cases]
    return corpus.scores(relaxed, outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"also write {corpus.SCORES.name}")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cases, outcomes = corpus.evaluate(REAL)
    strict = corpus.scores(cases, outcomes)
    lenient = _lenient(cases, outcomes)
    seconds = time.perf_counter() - t0
    if args.record:
        corpus.SCORES.write_text(json.dumps(strict, indent=1) + "\n", encoding="utf-8")
    refused = [c.name for c in cases if outcomes[c.name].error]
    forgot = sum(1 for c in cases if "no_eval" in outcomes[c.name].reported and "no_eval" not in c.allowed)
    misread = corpus.mismatches([c for c in cases if c.half == "dev"], outcomes)
    body = f"""{machine_line()}

{strict['cases']} real training logs written by other people (`tests/fixtures/real`, provenance in `SOURCES.md`),
labelled by hand and committed before any rule ran on them, read the way a user runs `prunetune report` on them
({seconds:.0f} s for all). The rules were tuned on the **dev** half only; the **test** half (split by a fixed hash of
each log's name, chosen before the corpus was seen: `prunetune.analysis.corpus.split`) was not looked at while tuning,
so its numbers are the estimate for logs nobody here has seen.

{corpus.markdown(strict).rstrip()}

`no_eval` is never a required label in this corpus (its README: "only ever allowed here: a run without eval is a
choice"), so its precision is 0 whenever it fires on a finished run without evaluations whose label forgot to allow
it ({forgot} logs). Read as the README defines it (allowed on every log), the summary becomes: {
'; '.join(f"{h}: {lenient[h]['correct']}/{lenient[h]['cases']} logs read right, {lenient[h]['healthy_false_alarms']} false alarms on {lenient[h]['healthy']} healthy runs" for h in corpus.HALVES)}.

Refused (one-line UserError, no curve read): {', '.join(refused) or 'none'}.

Dev-half logs still read differently from their label:

""" + "\n".join(f"- {line}" for line in misread) + "\n"
    write_section("corpus", "Diagnosis accuracy on the real-log corpus (`bench/bench_corpus.py`, issue 20)", body)
    print(corpus.markdown(strict), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
