"""The summary numbers of a run, computed from records alone (so every source gives the same numbers)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from prunetune.analysis.series import NOT_LM
from prunetune.fmt import fmt_sig, perplexity_from_loss
from prunetune.rundir.records import to_float


@dataclass(frozen=True)
class Summary:
    """What a run achieved. None where the records do not say."""

    steps: int | None
    """Last optimizer step of a log, eval or train_end record."""
    max_steps: int | None
    """Planned steps (from `log` records' `max_steps`), if known."""
    time_s: float | None
    """Training time: `train_end.train_runtime`, else the last `elapsed`, else the span of record times."""
    log_points: int
    eval_points: int
    final_train_loss: float | None
    """Last finite train loss."""
    final_eval_loss: float | None
    """The `final_eval` record's eval loss (the evaluation after training), else the last finite eval loss
    during training; `final_eval_of` says which."""
    best_eval_loss: float | None
    """The lowest of every evaluation, the final one included."""
    best_step: int | None
    """Step of the lowest eval loss (for the final evaluation: the step of the checkpoint it evaluated, when
    known)."""
    final_perplexity: float | None
    """Perplexity after training: the `final_eval` record's, else exp(final eval loss)."""
    best_perplexity: float | None
    tokens_per_s: float | None
    """Median training throughput, when the records carry it."""
    pruned_perplexity: float | None
    """Perplexity of the pruned model before recovery (final_eval record or --pruned-ppl)."""
    dense_perplexity: float | None
    """Perplexity of the dense model (final_eval record or --dense-ppl)."""
    improvement_pct: float | None
    """Perplexity reduction from pruned to final, in percent."""
    status: str = "unknown"
    """`finished` (end-of-run records), `interrupted` (a `stopped` record: signal, NaN stop, traceback, or a
    log that ends before its last step), `failed` (an `error` record) or `unknown`."""
    stopped_reason: str | None = None
    """Why an interrupted run stopped, as the log says."""
    final_eval_set: str | None = None
    """The eval set the final/best eval numbers belong to, when the run evaluates named sets."""
    eval_sets: dict[str, dict[str, Any]] | None = None
    """Per eval set (`eval_<name>_loss`): final_eval_loss, best_eval_loss, best_step, evaluations."""
    loss_kind: str = "lm"
    """`lm` (token-level language-model cross-entropy: perplexity = exp(loss)) or `other` (the log carries
    accuracy / rewards / generation metrics: the loss is not a perplexity's log)."""
    loss_kind_evidence: str | None = None
    """The log keys that made the loss `other`."""
    final_eval_of: str | None = None
    """What the final numbers describe: `the final evaluation of the reloaded best checkpoint (checkpoint-1800,
    step 1800)`, `the evaluation after training`, `the last evaluation during training (step 2000)`."""
    final_eval_step: int | None = None
    """The step of the model the final numbers describe, when known."""
    last_eval_loss: float | None = None
    """The last evaluation during training (before any reload of the best checkpoint)."""
    last_eval_step: int | None = None
    best_is_final: bool = False
    """The lowest eval loss is the final evaluation's."""
    steps_estimated: bool = False
    """Some steps are estimates (the log states none for them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best_text(self) -> str:
        """`1.988 at step 1800 (the final evaluation)`, or `no evaluation`."""
        if self.best_eval_loss is None:
            return "no evaluation"
        where = f" at step {self.best_step}" if self.best_step is not None else ""
        return f"{fmt_sig(self.best_eval_loss)}{where}" + (" (the final evaluation)" if self.best_is_final else "")


def _finite(value: Any) -> float | None:
    f = to_float(value)
    return f if f is not None and math.isfinite(f) else None




def loss_kind(records: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(`lm` | `other`, evidence): the loss is a token-level LM cross-entropy unless the log reports
    preference, generation or classification metrics beside it. A logged `perplexity` settles it as `lm`;
    `accuracy` alone does not decide (run_clm logs token accuracy) unless it is high at a loss below 1 nat, as
    a classifier's is."""
    scored = [r for r in records if r.get("event") in ("log", "eval", "final_eval")]
    if any("perplexity" in r and not r.get("perplexity_derived") for r in scored if r.get("event") == "final_eval"):
        return "lm", None
    keys = sorted({k for r in scored for k in r if NOT_LM.search(k)})
    if keys:
        return "other", ", ".join(keys[:4])
    for r in scored:
        acc, loss = _finite(r.get("eval_accuracy")), _finite(r.get("eval_loss"))
        if acc is not None and loss is not None and acc > 0.7 and loss < 1.0:
            return "other", f"eval_accuracy {acc:.3g} at eval_loss {loss:.3g} (a classifier)"
    return "lm", None


def run_status(records: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(status, reason) of a run from its records (see `Summary.status`)."""
    events = [r.get("event") for r in records]
    errors = [r for r in records if r.get("event") == "error" and not r.get("after_training")]
    if errors:
        err = errors[0]
        return "failed", str(err.get("kind") or err.get("message") or "error")
    stopped = next((r for r in reversed(records) if r.get("event") == "stopped"), None)
    if stopped is not None:
        return "interrupted", str(stopped.get("reason") or "stopped")
    if any(e in ("train_end", "summary", "final_eval") for e in events):
        return "finished", None
    return "unknown", None


def summarize(
    records: Sequence[Mapping[str, Any]],
    dense_ppl: float | None = None,
    pruned_ppl: float | None = None,
) -> Summary:
    """The summary of a run from its records; `dense_ppl` / `pruned_ppl` override what the records state."""
    logs = [r for r in records if r.get("event") == "log"]
    steps, max_steps = _step_counts(records, logs)
    main_set, per_set = _eval_losses(records)
    evals = [(s, v, None) for s, v in per_set.get(main_set, [])]
    train = [v for r in logs if (v := _finite(r.get("loss"))) is not None]
    time_s = _training_time(records, logs)

    final_rec = next((r for r in reversed(records) if r.get("event") == "final_eval"
                      and str(r.get("eval_set") or "") == main_set), None)
    last_eval = evals[-1] if evals else None
    final_eval, final_ppl = _final_result(final_rec, last_eval[1] if last_eval else None)
    dense_ppl, pruned_ppl = _reference_perplexities(records, final_rec, dense_ppl, pruned_ppl)
    final_of, final_step = _final_of(records, final_rec, evals)
    best_eval, best_step, best_is_final = None, None, False
    if evals:
        best_step, best_eval, _ = min(evals, key=lambda e: e[1])
    fin = _finite(final_rec.get("eval_loss")) if final_rec is not None else None
    if fin is not None and (best_eval is None or fin <= best_eval):
        best_eval, best_step, best_is_final = fin, final_step, True

    throughput = [v for r in logs if (v := _finite(r.get("tokens_per_s"))) is not None]
    improvement = None
    if pruned_ppl and final_ppl is not None and math.isfinite(final_ppl):
        improvement = (1 - final_ppl / pruned_ppl) * 100

    kind, kind_evidence = loss_kind(records)
    if kind != "lm":
        final_ppl = pruned_ppl = dense_ppl = improvement = None
    status, reason = run_status(records)
    return Summary(
        steps=steps,
        max_steps=max_steps,
        time_s=time_s,
        log_points=len(logs),
        eval_points=len(evals),
        final_train_loss=train[-1] if train else None,
        final_eval_loss=final_eval,
        best_eval_loss=best_eval,
        best_step=best_step,
        final_perplexity=final_ppl,
        best_perplexity=perplexity_from_loss(best_eval) if kind == "lm" else None,
        tokens_per_s=statistics.median(throughput) if throughput else None,
        pruned_perplexity=pruned_ppl,
        dense_perplexity=dense_ppl,
        improvement_pct=improvement,
        status=status,
        stopped_reason=reason,
        final_eval_set=main_set or None,
        eval_sets=_eval_sets(records, per_set) if len(per_set) > 1 else None,
        loss_kind=kind,
        loss_kind_evidence=kind_evidence,
        final_eval_of=final_of,
        final_eval_step=final_step,
        last_eval_loss=last_eval[1] if last_eval else None,
        last_eval_step=last_eval[0] if last_eval else None,
        best_is_final=best_is_final,
        steps_estimated=any(r.get("step_estimated") for r in records),
    )


def _final_of(records: Sequence[Mapping[str, Any]], final_rec: Mapping[str, Any] | None,
              evals: Sequence[tuple[int, float, Any]]) -> tuple[str | None, int | None]:
    """(what the final numbers describe, the step of that model). A `best_loaded` record before the final
    evaluation (the log printed the reload or names the checkpoint), or a final loss equal to an earlier evaluation's (the checkpoint
    of that step was reloaded, load_best_model_at_end), makes it the final evaluation of the reloaded best
    checkpoint."""
    if final_rec is None:
        if not evals:
            return None, None
        return f"the last evaluation during training (step {evals[-1][0]})", evals[-1][0]
    # the reload is printed before the final evaluation (the Trainer, prunetune) or named in a summary after it
    loaded = next((r for r in reversed(records) if r.get("event") == "best_loaded" and r.get("checkpoint")), None)
    if loaded is not None:
        step = record_step_of(loaded)
        where = str(loaded["checkpoint"]) + (f", step {step}" if step is not None else "")
        return f"the final evaluation of the reloaded best checkpoint ({where})", step
    final = _finite(final_rec.get("eval_loss"))
    if final is not None and len(evals) >= 2:
        best_step, best, _ = min(evals, key=lambda e: e[1])
        if best_step != evals[-1][0] and abs(final - best) <= 1e-4 * max(1.0, abs(best)):
            return (f"the final evaluation of the best checkpoint (step {best_step}: its eval loss equals that "
                    "evaluation's, so the best checkpoint was reloaded)"), best_step
    step = record_step_of(final_rec)
    return "the evaluation after training" + (f" (step {step})" if step is not None else ""), step


def record_step_of(record: Mapping[str, Any]) -> int | None:
    step = _finite(record.get("step"))
    return int(step) if step is not None and step >= 0 else None


def _step_counts(
    records: Sequence[Mapping[str, Any]], logs: Sequence[Mapping[str, Any]]
) -> tuple[int | None, int | None]:
    """(the last step a log, eval, train_end or stopped record names; the planned steps, if a record says)."""
    steps = [int(s) for r in records
             if r.get("event") in ("log", "eval", "train_end", "stopped") and (s := _finite(r.get("step"))) is not None]
    max_steps = next((int(m) for r in reversed([*logs, *(r for r in records if r.get("event") in ("stopped", "error"))])
                      if (m := _finite(r.get("max_steps")))), None)
    return (max(steps) if steps else None), max_steps


def _eval_losses(records: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(the first eval set named, every eval set's finite (step, eval loss) points)."""
    set_names = list(dict.fromkeys(str(r.get("eval_set") or "") for r in records if r.get("event") == "eval"))
    main_set = set_names[0] if set_names else ""
    per_set: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("event") == "eval" and (v := _finite(r.get("eval_loss"))) is not None:
            per_set.setdefault(str(r.get("eval_set") or ""), []).append((int(_finite(r.get("step")) or 0), v))
    return main_set, per_set


def _training_time(records: Sequence[Mapping[str, Any]], logs: Sequence[Mapping[str, Any]]) -> float | None:
    time_s = None
    # training time proper: the Trainer's train_runtime or finetune's train_end.runtime_s; the summary's
    # total_time_s (loading and final evaluation included) only when no train_end says it
    for event, keys in (("train_end", ("train_runtime", "runtime_s")), ("summary", ("train_runtime", "total_time_s"))):
        for r in records:
            if r.get("event") == event:
                for key in keys:
                    if (t := _finite(r.get(key))) is not None:
                        time_s = t
                        break
        if time_s is not None:
            break
    if time_s is None:
        elapsed = [v for r in logs if (v := _finite(r.get("elapsed"))) is not None]
        if elapsed:
            time_s = elapsed[-1]
    if time_s is None:
        times = [v for r in records if r.get("event") in ("log", "eval") and (v := _finite(r.get("time"))) is not None]
        if len(times) >= 2:
            time_s = max(times) - min(times)
    return time_s


def _final_result(final_rec: Mapping[str, Any] | None, final_eval: float | None) -> tuple[float | None, float | None]:
    """(final eval loss, final perplexity): the `final_eval` record's where it has them, else the last eval's."""
    final_ppl = None
    if final_rec is not None:
        final_ppl = _finite(final_rec.get("perplexity"))
        if final_ppl is None:
            final_ppl = perplexity_from_loss(_finite(final_rec.get("eval_loss")))
    if final_rec is not None and (fl := _finite(final_rec.get("eval_loss"))) is not None:
        final_eval = fl  # the evaluation after training (best checkpoint loaded) is the run's result
    if final_ppl is None:
        final_ppl = perplexity_from_loss(final_eval)
    return final_eval, final_ppl


def _reference_perplexities(
    records: Sequence[Mapping[str, Any]],
    final_rec: Mapping[str, Any] | None,
    dense_ppl: float | None,
    pruned_ppl: float | None,
) -> tuple[float | None, float | None]:
    """(dense, pruned) perplexity: the ones given, else the latest the records state."""
    # the pruned model's perplexity measured on the same eval set before training beats the one from prune
    if pruned_ppl is None and final_rec is not None:
        pruned_ppl = _finite(final_rec.get("pruned_perplexity")) or _finite(final_rec.get("baseline_perplexity"))
    if pruned_ppl is None:
        base = next((r for r in reversed(records) if r.get("event") == "baseline_eval"), None)
        if base is not None:
            pruned_ppl = _finite(base.get("pruned_perplexity")) or _finite(base.get("perplexity"))
    if dense_ppl is None:
        for r in reversed(records):
            if (d := _finite(r.get("dense_perplexity"))) is not None:
                dense_ppl = d
                break
    if pruned_ppl is None:
        for r in reversed(records):
            if (p := _finite(r.get("pruned_perplexity"))) is not None:
                pruned_ppl = p
                break
    return dense_ppl, pruned_ppl


def _eval_sets(
    records: Sequence[Mapping[str, Any]], per_set: Mapping[str, list[tuple[int, float]]]
) -> dict[str, dict[str, Any]]:
    """`Summary.eval_sets`: per set, its `final_eval` loss (else its last eval) and its best eval."""
    sets: dict[str, dict[str, Any]] = {}
    for name, points in per_set.items():
        final = next((f for r in reversed(records) if r.get("event") == "final_eval"
                      and str(r.get("eval_set") or "") == name and (f := _finite(r.get("eval_loss"))) is not None),
                     points[-1][1])
        best_s, best_v = min(points, key=lambda p: p[1])
        sets[name or "eval"] = {"final_eval_loss": final, "best_eval_loss": best_v, "best_step": best_s,
                                "evaluations": len(points)}
    return sets
