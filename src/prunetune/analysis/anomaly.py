"""The anomaly vocabulary: kinds, severities, the `Anomaly` a rule returns, and alerts read back from records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prunetune.analysis import fixes
from prunetune.analysis.context import FixContext
from prunetune.analysis.series import record_step

ANOMALY_KINDS: tuple[str, ...] = (
    "loss_flat",
    "loss_slow",
    "loss_oscillating",
    "loss_diverging",
    "overfitting",
    "eval_far_above_train",
    "nan_inf",
    "out_of_memory",
    "no_eval",
)

NOTE_KINDS: tuple[str, ...] = ("no_eval",)
"""Kinds reported as information (severity `info`), never as an alarm: what the reader should know about the
run (it had no evaluation), not a fault in it."""
ALARM_KINDS: tuple[str, ...] = tuple(k for k in ANOMALY_KINDS if k not in NOTE_KINDS)
"""Kinds that are alarms (severity `warning` or `error`): the ones precision and recall are measured on."""

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
"""`info`: a note (only `NOTE_KINDS`); `warning` and `error`: alarms, `error` the run is broken."""

_GENERIC = FixContext()
KIND_DOCS: dict[str, str] = {  # what each kind means; the fix is `prunetune.analysis.fixes`' one text of it
    "loss_flat": "error: train loss does not move (or repeats exactly / zero gradients): data or configuration "
                 f"broken. Fix: {fixes.flat(_GENERIC).text}",
    "loss_slow": "warning: train loss falls too little, still at its LR-limited pace after warm-up, the eval loss "
                 f"not bottomed: LR too low. Fix: {fixes.raise_lr(_GENERIC).text}.",
    "loss_oscillating": "warning: train loss jumps by a large fraction of its level: LR too high or batch too "
                        f"small. Fix: {fixes.lower_lr(_GENERIC).text}.",
    "loss_diverging": "error: train loss blew up above its first value (however it drifts later), or ends clearly "
                      f"above its best: LR too high. Fix: {fixes.diverging(_GENERIC).text}",
    "overfitting": "warning: eval loss rises at consecutive evaluations after its minimum while train loss does not "
                   f"rise, or the train loss converged near zero (memorised). Fix: {fixes.overfitting(_GENERIC).text}",
    "eval_far_above_train": f"warning: eval loss far above the train loss at the same step. Fix: "
                            f"{fixes.eval_far_above_train(_GENERIC).text}",
    "nan_inf": "error: a NaN/Inf loss, grad norm or eval loss (or non-finite weights, alerted by finetune); a loss "
               "of 0.0 beside NaN gradients or fp16 precision names the precision first. "
               f"Fix: {fixes.nan_inf(_GENERIC).text}",
    "out_of_memory": "error: the run died of an out-of-memory error (at its start: the memory levers; after steps "
                     f"that fit: what grows during a run). Fix: {fixes.out_of_memory(_GENERIC).text}",
    "no_eval": "info, a note and not an alarm (end of run only): no evaluation in this run, so overfitting cannot be "
               "seen (a run without evaluation is a choice, not a fault). Fix: "
               + fixes.no_eval(_GENERIC, 100).text.replace("--eval_steps 10 ", "--eval_steps N "),
}


@dataclass(frozen=True)
class Anomaly:
    """One diagnosis: what, how bad, the evidence (steps and values) and the concrete fix."""

    kind: str
    """One of `ANOMALY_KINDS`."""
    severity: str
    """`info` (a note, `NOTE_KINDS`), `warning` or `error`."""
    message: str
    """One sentence a person reads in the console."""
    evidence: dict = field(default_factory=dict)
    """JSON-able numbers behind the verdict (steps, values, statistics)."""
    fix: str = ""
    """What to change: flags and values."""
    step: int | None = None
    """The step at which the evidence was conclusive (or where the problem began)."""
    basis: tuple[str, ...] = ()
    """The facts the fix rests on, each with where it came from (`fixes.Fix.basis`)."""

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"Anomaly.kind={self.kind!r}; choose one of {ANOMALY_KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Anomaly.severity={self.severity!r}; choose one of {SEVERITIES}")
        if (self.severity == "info") != (self.kind in NOTE_KINDS):
            raise ValueError(f"Anomaly {self.kind}: severity 'info' is for the notes {NOTE_KINDS} and only them")
        object.__setattr__(self, "basis", tuple(self.basis))

    @property
    def alarm(self) -> bool:
        """An alarm (`warning`/`error`), not a note (`info`)."""
        return self.severity != "info"

    def to_record(self) -> dict[str, Any]:
        return {
            "event": "alert",
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "evidence": self.evidence,
            "fix": self.fix,
            "basis": list(self.basis),
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["basis"] = list(self.basis)
        return out


def anomalies_from_alerts(records: Sequence[Mapping[str, Any]], known: Sequence[Anomaly] = ()) -> list[Anomaly]:
    """`alert` records of kinds not in `known`, as Anomalies (first of each kind): what the run itself saw
    live, e.g. non-finite weights caught before a NaN loss was ever logged."""
    seen = {a.kind for a in known}
    out = []
    for rec in records:
        kind, severity = rec.get("kind"), rec.get("severity")
        if rec.get("event") != "alert" or kind not in ANOMALY_KINDS or kind in seen:
            continue
        seen.add(kind)
        evidence = rec.get("evidence")
        # a note recorded as a warning by an older version is still a note; an alarm is never demoted to one
        severity = "info" if kind in NOTE_KINDS else severity if severity in ("warning", "error") else "warning"
        out.append(Anomaly(
            kind, severity, str(rec.get("message", "")),
            dict(evidence) if isinstance(evidence, Mapping) else {"recorded": evidence} if evidence else {},
            str(rec.get("fix", "")), record_step(rec),
            tuple(str(b) for b in rec.get("basis") or () if isinstance(rec.get("basis"), list)),
        ))
    return out
