"""The rules measured on labelled corpora of real logs (one directory per log, hand labels in `labels.json`
frozen before any rule ran on them): per-kind precision and recall, on a dev half (to tune on) and a test half
(to check that the tuning generalises), split by a fixed hash of each case's name chosen before the corpus was
seen. Two corpora (`CORPORA`): `real` (`tests/fixtures/real/`, the one rounds 1-2 were tuned on) and `heldout`
(`tests/fixtures/heldout/`, collected apart; its first use is the held-out estimate of round 2's rules).

A case is read the way a user runs it (`load_source` + `report.analyse` on the labelled file or directory).
For each alarm kind: a case labelled with it and reported is a true positive, labelled and not reported a
false negative, reported while neither required (`kinds`) nor `allowed` a false positive. Notes (`no_eval`,
information and not an alarm) are counted, never scored as alarms.

    python -m prunetune.analysis.corpus --corpus heldout       # per-case mismatches and the scores
    python -m prunetune.analysis.corpus --corpus both --record # write corpus_scores.json (RULES.md reads it)
    python -m prunetune.analysis.corpus --markdown             # the per-kind table (bench/RESULTS.md)

Each case is also replayed live: the same rules fed its records in order, as `prunetune finetune` judges a run
while it trains (an alert once raised is kept and printed; a finetune run's report carries it), so an alarm
the evidence of a partial run raises and the full log would not is counted too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunetune.analysis.anomaly import ALARM_KINDS, NOTE_KINDS
from prunetune.analysis.report import ReportConfig, analyse, run_context
from prunetune.analysis.rules import LiveDiagnosis
from prunetune.analysis.sources import load_source
from prunetune.analysis.thresholds import parse_threshold_flags
from prunetune.errors import UserError

SCORES = Path(__file__).with_name("corpus_scores.json")
"""The recorded scores, per corpus name: RULES.md shows them, a test fails when a kind drops below them."""
FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"
CORPORA = {"real": FIXTURES / "real", "heldout": FIXTURES / "heldout"}
"""The labelled corpora by name (a source checkout's test fixtures: the corpora are not installed)."""
HALVES = ("dev", "test", "all")
STATUSES = ("finished", "interrupted", "crashed")


def split(name: str) -> str:
    """`dev` or `test`: the first byte of the SHA-256 of the case name, even -> dev, odd -> test. Fixed before
    the corpus was looked at, so neither half was picked by how the rules do on it."""
    return "dev" if hashlib.sha256(name.encode("utf-8")).digest()[0] % 2 == 0 else "test"


@dataclass(frozen=True)
class Case:
    """One labelled log."""

    name: str
    path: Path
    kinds: frozenset[str]
    allowed: frozenset[str]
    status: str
    facts: Mapping[str, Any]

    @property
    def half(self) -> str:
        return split(self.name)


@dataclass
class Outcome:
    """What the report said about one case."""

    name: str
    reported: set[str] = field(default_factory=set)
    """The alarm kinds the report raised."""
    notes: set[str] = field(default_factory=set)
    """The note kinds it gave (information, not alarms)."""
    status: str = "unknown"
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """The one-line UserError when the log was refused."""
    live: set[str] = field(default_factory=set)
    """The alarm kinds the live rules raised at some point of the replayed run."""


def load_cases(root: Path) -> list[Case]:
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    cases = []
    for name, label in sorted(labels.items()):
        file = label.get("file") or "."
        cases.append(Case(name, root / name if file == "." else root / name / file, frozenset(label["kinds"]),
                          frozenset(label.get("allowed", ())), label.get("status", "unknown"),
                          dict(label.get("facts") or {})))
    return cases


def _status(summary: Mapping[str, Any]) -> str:
    """The report's status in the labels' vocabulary: a run that failed or stopped on a traceback crashed."""
    status, reason = summary.get("status"), str(summary.get("stopped_reason") or "")
    if status == "failed" or (status == "interrupted" and reason.startswith("crash")):
        return "crashed"
    return status if status in STATUSES else "unknown"


def run_case(case: Case, thresholds: Mapping[str, float] | None = None) -> Outcome:
    """The report's reading of one case, as `prunetune report` reads it (with `thresholds` overridden)."""
    out = Outcome(case.name)
    cfg = ReportConfig(source=case.path, thresholds=dict(thresholds or {}))
    try:
        source = load_source(case.path)
        data = analyse(source, cfg)
    except UserError as err:
        out.error = str(err)
        return out
    out.live = replay(source, cfg)
    out.reported = {a["kind"] for a in data["anomalies"]}
    out.notes = {a["kind"] for a in data["information"]}
    s = data["summary"]
    out.status = _status(s)
    steps = {a["kind"]: a["step"] for a in data["anomalies"]}
    context = data["context"]
    out.facts = {
        "max_steps": s.get("max_steps"),
        "final_eval_loss": s.get("final_eval_loss"),
        "best_eval_step": s.get("best_step"),
        "event_step": next((steps[k] for k in ("nan_inf", "out_of_memory") if k in steps), None)
        if steps.keys() & {"nan_inf", "out_of_memory"} else s.get("steps") if out.status != "finished" else None,
        "lr": (context.get("lr") or {}).get("value") or _peak(data["series"]["lr"]["lr"]),
        "gradient_accumulation_steps": (context.get("gradient_accumulation_steps") or {}).get("value"),
    }
    return out


def replay(source: Any, cfg: ReportConfig, batches: int = 100) -> set[str]:
    """The alarm kinds the live rules raise on `source` fed in order, in about `batches` slices of its records
    (finetune judges after every few log lines; each kind, once raised, is kept)."""
    live = LiveDiagnosis(cfg.thresholds, run_context(source))
    records, raised = source.records, set()
    size = max(1, len(records) // batches)
    for i in range(0, len(records), size):
        raised |= {a.kind for a in live(records[i : i + size]) if a.alarm}
    return raised


def _peak(values: Sequence[float]) -> float | None:
    return max(values) if values else None


@dataclass(frozen=True)
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall}


def kind_scores(cases: Sequence[Case], outcomes: Mapping[str, Outcome]) -> dict[str, Score]:
    """Per alarm kind: true positives, false positives (reported, neither required nor allowed), false
    negatives (required, not reported)."""
    out = {}
    for kind in ALARM_KINDS:
        tp = fp = fn = 0
        for case in cases:
            said = kind in outcomes[case.name].reported
            if kind in case.kinds:
                tp, fn = tp + said, fn + (not said)
            elif said and kind not in case.allowed:
                fp += 1
        out[kind] = Score(tp, fp, fn)
    return out


def status_scores(cases: Sequence[Case], outcomes: Mapping[str, Outcome]) -> dict[str, Score]:
    """Per run status (labelled cases whose status is known): reported vs labelled."""
    out = {}
    for status in STATUSES:
        known = [c for c in cases if c.status in STATUSES]
        tp = sum(1 for c in known if c.status == status and outcomes[c.name].status == status)
        fp = sum(1 for c in known if c.status != status and outcomes[c.name].status == status)
        fn = sum(1 for c in known if c.status == status and outcomes[c.name].status != status)
        out[status] = Score(tp, fp, fn)
    return out


def _same(label: Any, got: Any, name: str = "") -> bool:
    """A labelled fact and the report's value agree: numbers to 0.1% (the LR to 5%: a log that states no
    configured LR is read at its logged peak, which a warm-up or a decay may leave just under it), or to the
    significant digits the label was written with, two at least (a reader who wrote 0.0022 for 0.0021694 read it
    right; one digit, 0.5, says too little, and an LR's label is the configured value, not a rounding)."""
    if isinstance(label, (int, float)) and not isinstance(label, bool) and isinstance(got, (int, float)):
        return math.isclose(float(label), float(got), rel_tol=0.05 if name == "lr" else 1e-3, abs_tol=1e-12) \
            or (isinstance(label, float) and name != "lr" and _digits(label) >= 2
                and float(f"{float(got):.{_digits(label)}g}") == label)
    return label == got


def _digits(value: float) -> int:
    """The significant digits `value` is written with (0.0022 -> 2, 1.5523 -> 5)."""
    mantissa = f"{value:.15g}".split("e")[0].replace("-", "").replace(".", "").lstrip("0")
    return max(1, len(mantissa))


FACTS_CHECKED = ("max_steps", "final_eval_loss", "best_eval_step", "event_step", "lr", "gradient_accumulation_steps")


def fact_checks(cases: Sequence[Case], outcomes: Mapping[str, Outcome]) -> dict[str, tuple[int, int]]:
    """Per labelled fact the report also states: (right, labelled)."""
    out = {}
    for name in FACTS_CHECKED:
        labelled = [c for c in cases if name in c.facts and c.facts[name] is not None]
        right = sum(1 for c in labelled if _same(c.facts[name], outcomes[c.name].facts.get(name), name))
        out[name] = (right, len(labelled))
    return out


def correct(case: Case, outcome: Outcome) -> bool:
    """The case is read right: every required kind reported, nothing outside required + allowed."""
    return case.kinds <= outcome.reported <= case.kinds | case.allowed


def evaluate(root: Path, thresholds: Mapping[str, float] | None = None,
             half: str = "all") -> tuple[list[Case], dict[str, Outcome]]:
    cases = [c for c in load_cases(root) if half == "all" or c.half == half]
    return cases, {c.name: run_case(c, thresholds) for c in cases}


def scores(cases: Sequence[Case], outcomes: Mapping[str, Outcome]) -> dict[str, Any]:
    """The numbers `corpus_scores.json` records: per half, per kind and per status, and the case counts."""
    out: dict[str, Any] = {"cases": len(cases)}
    for half in HALVES:
        mine = [c for c in cases if half == "all" or c.half == half]
        healthy = [c for c in mine if not c.kinds]
        out[half] = {
            "cases": len(mine),
            "correct": sum(1 for c in mine if correct(c, outcomes[c.name])),
            "healthy": len(healthy),
            "healthy_false_alarms": sum(1 for c in healthy if outcomes[c.name].reported - c.allowed),
            "live_healthy_false_alarms": sum(1 for c in healthy if outcomes[c.name].live - c.allowed),
            "live_extra": sum(1 for c in mine if outcomes[c.name].live - c.kinds - c.allowed),
            "kinds": {k: s.to_dict() for k, s in kind_scores(mine, outcomes).items()},
            "status": {k: s.to_dict() for k, s in status_scores(mine, outcomes).items()},
            "facts": {k: list(v) for k, v in fact_checks(mine, outcomes).items()},
            "notes": {k: sum(1 for c in mine if k in outcomes[c.name].notes) for k in NOTE_KINDS},
        }
    return out


def fmt_score(value: float | None) -> str:
    """A precision or recall as RULES.md and bench/RESULTS.md print it (`-` where nothing was counted)."""
    return "-" if value is None else f"{value:.2f}"


def markdown(recorded: Mapping[str, Any]) -> str:
    """The per-kind precision/recall table (dev / test / all) of recorded scores, for RULES.md and RESULTS.md."""
    lines = [
        "| kind | labelled (dev/test) | precision dev | recall dev | precision test | recall test | precision all "
        "| recall all |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in [*ALARM_KINDS, *(f"status:{s}" for s in STATUSES)]:
        group, key = ("status", kind.split(":")[1]) if kind.startswith("status:") else ("kinds", kind)
        cells = {h: recorded[h][group][key] for h in HALVES}
        labelled = f"{cells['dev']['tp'] + cells['dev']['fn']}/{cells['test']['tp'] + cells['test']['fn']}"
        row = [f"`{kind}`", labelled]
        for h in HALVES:
            row += [fmt_score(cells[h]["precision"]), fmt_score(cells[h]["recall"])]
        lines.append("| " + " | ".join(row) + " |")
    summary, live = [], []
    for h in HALVES:
        r = recorded[h]
        summary.append(f"{h}: {r['correct']}/{r['cases']} logs read right, {r['healthy_false_alarms']} false alarms "
                       f"on {r['healthy']} healthy runs")
        if "live_extra" in r:
            live.append(f"{h}: {r['live_extra']} logs with a live alarm outside their labels, "
                        f"{r['live_healthy_false_alarms']} of them healthy runs")
    facts = recorded["all"]["facts"]
    fact_line = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in facts.items() if v[1])
    notes = recorded["all"].get("notes") or {}
    note_line = ", ".join(f"`{k}` on {n} logs" for k, n in notes.items())
    live_line = ("\nLive (each log replayed through the rules in order, as `finetune` raises alerts while it trains; "
                 "an alert once raised stays, and a finetune run's report carries it): " + "; ".join(live) + ".\n"
                 if live else "")
    return "\n".join(lines) + "\n\n" + "; ".join(summary) + f".\n\nFacts the report states, right of labelled: " \
        f"{fact_line}.\n" + (f"\nNotes given (information, not alarms; not scored): {note_line}.\n" if note_line else "") \
        + live_line


def _half_table(half: Mapping[str, Any]) -> str:
    """One half's per-kind table (when tuning on dev, the test half stays unseen)."""
    lines = ["| kind | tp | fp | fn | precision | recall |", "|---|---:|---:|---:|---:|---:|"]
    for group in ("kinds", "status"):
        for kind, sc in half[group].items():
            lines.append(f"| {kind} | {sc['tp']} | {sc['fp']} | {sc['fn']} | {fmt_score(sc['precision'])} | "
                         f"{fmt_score(sc['recall'])} |")
    return "\n".join(lines) + (f"\n\n{half['correct']}/{half['cases']} read right, {half['healthy_false_alarms']} "
                               f"false alarms on {half['healthy']} healthy runs\n")


def mismatches(cases: Iterable[Case], outcomes: Mapping[str, Outcome]) -> list[str]:
    out = []
    for c in cases:
        o = outcomes[c.name]
        missing, extra = c.kinds - o.reported, o.reported - c.kinds - c.allowed
        status = c.status in STATUSES and c.status != o.status
        live = o.live - o.reported - c.kinds - c.allowed
        facts = [f"{k}: label {c.facts[k]} got {o.facts.get(k)}" for k in FACTS_CHECKED
                 if c.facts.get(k) is not None and not _same(c.facts[k], o.facts.get(k), k)]
        if missing or extra or status or facts or o.error or live:
            out.append(f"[{c.half}] {c.name}: " + "; ".join(filter(None, [
                f"missing {sorted(missing)}" if missing else "", f"extra {sorted(extra)}" if extra else "",
                f"status label {c.status} got {o.status}" if status else "", *facts,
                f"live extra {sorted(live)}" if live else "",
                f"refused: {o.error}" if o.error else ""])))
    return out


def _roots(root: Path | None, which: str) -> dict[str, Path]:
    """The corpora to run, by name: an explicit directory (named after itself), else `--corpus`."""
    if root is not None:
        return {root.name: root}
    return dict(CORPORA) if which == "both" else {which: CORPORA[which]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=None, help="a labelled corpus directory")
    parser.add_argument("--corpus", choices=[*CORPORA, "both"], default="real", help="which labelled corpus")
    parser.add_argument("--record", action="store_true", help=f"write {SCORES.name} (both corpora)")
    parser.add_argument("--markdown", action="store_true", help="print the per-kind tables")
    parser.add_argument("--half", choices=HALVES, default="all", help="which cases to run (tune on dev)")
    parser.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                        help="override a rule threshold (as `prunetune report --threshold`)")
    args = parser.parse_args(argv)
    thresholds = parse_threshold_flags(args.threshold, "--threshold")
    roots = dict(CORPORA) if args.record else _roots(args.root, args.corpus)
    recorded = {}
    for name, root in roots.items():
        cases, outcomes = evaluate(root, thresholds, "all" if args.record or args.markdown else args.half)
        recorded[name] = result = scores(cases, outcomes)
        print(f"## {name} ({root})")
        if not args.markdown:
            for line in mismatches(cases, outcomes):
                print(line)
        print(_half_table(result["all"]) if args.half != "all" else markdown(result), end="")
    if args.record:
        SCORES.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
