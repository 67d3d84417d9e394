"""The anomaly vocabulary: kinds, severities, the `Anomaly` a rule returns, and alerts read back from records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prunetune.analysis import fixes
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

SEVERITIES: tuple[str, ...] = ("warning", "error")

KIND_DOCS: dict[str, str] = {  # what each kind means; the fix is `prunetune.analysis.fixes`' one text of it
    "loss_flat": "error: train loss does not move (or repeats exactly / zero gradients): data or configuration "
                 f"broken. Fix: {fixes.flat(None)}",
    "loss_slow": f"warning: train loss falls, too little and still at its initial pace: LR too low. Fix: "
                 f"{fixes.raise_lr(None)}.",
    "loss_oscillating": "warning: train loss jumps by a large fraction of its level: LR too high or batch too "
                        f"small. Fix: {fixes.lower_lr(None)}.",
    "loss_diverging": "error: train loss ends clearly above its start or its best: LR too high. Fix: "
                      f"{fixes.diverging(None)}",
    "overfitting": "warning: eval loss rises at consecutive evaluations while train loss falls, or the train loss "
                   f"converged near zero (memorised). Fix: {fixes.overfitting(None, None, None)}",
    "eval_far_above_train": f"warning: eval loss far above the train loss at the same step. Fix: "
                            f"{fixes.eval_far_above_train(None)}",
    "nan_inf": "error: a NaN/Inf loss, grad norm or eval loss (or non-finite weights, alerted by finetune). "
               f"Fix: {fixes.nan_inf(None, None)}",
    "out_of_memory": f"error: the run died of an out-of-memory error. Fix: {fixes.out_of_memory()}",
    "no_eval": "warning (end of run only): no evaluation at all. Fix: "
               + fixes.no_eval(100).replace("--eval_steps 10 ", "--eval_steps N "),
}


@dataclass(frozen=True)
class Anomaly:
    """One diagnosis: what, how bad, the evidence (steps and values) and the concrete fix."""

    kind: str
    """One of `ANOMALY_KINDS`."""
    severity: str
    """`warning` or `error`."""
    message: str
    """One sentence a person reads in the console."""
    evidence: dict = field(default_factory=dict)
    """JSON-able numbers behind the verdict (steps, values, statistics)."""
    fix: str = ""
    """What to change: flags and values."""
    step: int | None = None
    """The step at which the evidence was conclusive (or where the problem began)."""

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"Anomaly.kind={self.kind!r}; choose one of {ANOMALY_KINDS}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Anomaly.severity={self.severity!r}; choose one of {SEVERITIES}")

    def to_record(self) -> dict[str, Any]:
        return {
            "event": "alert",
            "step": self.step,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "evidence": self.evidence,
            "fix": self.fix,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        out.append(Anomaly(
            kind, severity if severity in SEVERITIES else "warning", str(rec.get("message", "")),
            dict(evidence) if isinstance(evidence, Mapping) else {"recorded": evidence} if evidence else {},
            str(rec.get("fix", "")), record_step(rec),
        ))
    return out
