"""The training console: every line a person reads is rendered here from a metrics record, and the same
record goes to `metrics.jsonl`, so the log a script reads and the text a person reads never disagree.
`train.log` receives the rendered text exactly (no `tee` needed)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from prunetune.fmt import fmt_num, fmt_ppl, hms
from prunetune.recovery import registry as recovery_methods
from prunetune.recovery.base import RecoveryMethod
from prunetune.rundir.records import JsonlWriter, make_record, to_float

BAR_WIDTH = 20
RULE = "=" * 78


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "[" + " " * width + "]"
    filled = min(width, int(width * done / total))
    if filled >= width:
        return "[" + "=" * width + "]"
    return "[" + "=" * filled + ">" + " " * (width - filled - 1) + "]"


def fmt_memory(mb: Any, kind: str | None) -> str:
    number = to_float(mb)
    if number is None:
        return "mem n/a"
    label = "GPU max" if kind == "gpu" else "RSS"
    return f"{label} {number / 1024:.1f} GiB"


def _header(title: str) -> list[str]:
    return ["", RULE, title, RULE]


def _prune_ppl(r: Mapping[str, Any]) -> str:
    parts = [f"{name} {fmt_ppl(r[key])}" for name, key in (("dense", "dense_perplexity"),
                                                            ("pruned", "pruned_perplexity")) if r.get(key)]
    return f"; perplexity measured by prune --eval: {', '.join(parts)}" if parts else ""


def _config(r: Mapping[str, Any]) -> list[str]:
    lora = r.get("lora", {})
    lines = [
        RULE,
        f"prunetune finetune {r.get('version', '')}: recovery of a pruned model "
        f"({r.get('method_reason') or r.get('method')})",
        RULE,
        f"Pruned model:      {r.get('pruned')}",
        f"Base model:        {r.get('base_model') or 'unknown (no prune.json)'}",
        f"Pruning:           {r.get('pruning') or 'unknown'}{_prune_ppl(r)}",
        f"Output directory:  {r.get('out')}",
        f"Dataset:           {r.get('dataset')} = {r.get('dataset_config')} (train split 'train', "
        "eval split 'validation')",
        f"Training samples:  {r.get('max_train_samples') or 'all'} sequences; eval samples: "
        f"{r.get('max_eval_samples') or 'all'} sequences",
        f"Learning rate:     {r.get('lr'):g}   Block size: {r.get('block_size')}   Epochs: {r.get('epochs'):g}"
        + (f"   Max steps: {r['max_steps']}" if r.get("max_steps", -1) > 0 else ""),
        *([f"LoRA:              r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
           f"targets={','.join(lora.get('targets', []))}"] if getattr(_method(r), "makes_adapter", True) else []),
        f"Precision/device:  {r.get('precision')} on {r.get('device')}"
        + (f" ({r['precision_reason']})" if r.get("precision_reason") else ""),
    ]
    if r.get("distill"):
        d = r["distill"]
        lines.append(f"Distillation:      {d.get('mode', 'logits')} from teacher {d.get('teacher')}, "
                     f"alpha={d.get('alpha')}, T={d.get('temperature')}")
    if r.get("resume_from"):
        lines.append(f"Resuming from:     {r['resume_from']}")
    return lines


def _preflight(r: Mapping[str, Any]) -> list[str]:
    lines = ["", "Pre-flight checks:"]
    for check in r.get("checks", []):
        mark = "✅" if check.get("ok") else "❌"
        lines.append(f"  {mark} {check.get('name')}: {check.get('detail')}")
        if not check.get("ok") and check.get("fix"):
            lines.append(f"     fix: {check['fix']}")
    return lines


def _model(r: Mapping[str, Any]) -> list[str]:
    return [
        "",
        f"Loading model: {r.get('path')} ... done in {r.get('seconds', 0):.1f}s "
        f"({r.get('params', 0):,} params, {r.get('dtype')}, {r.get('device')})",
        f"Sparsity of the base weights: {100 * r.get('sparsity', 0):.2f}% (mask from {r.get('mask_source')})",
    ]


def _method(r: Mapping[str, Any]) -> RecoveryMethod | None:
    """The recovery method a record names (None for one this version does not know: an old or foreign run)."""
    name = str(r.get("method") or "")
    return recovery_methods.get(name) if name in recovery_methods.names() else None


def _lora(r: Mapping[str, Any]) -> list[str]:
    """What trains and what it costs: the method renders its own banner record."""
    method = _method(r)
    if method is None:
        return [f"{r.get('method')}: trainable params {r.get('trainable', 0):,}"]
    return method.banner_lines(dict(r))


def _dataset(r: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        f"Dataset: {r.get('dataset')} from {r.get('origin')}",
        f"  tokens cache: {'hit' if r.get('cache_hit') else 'miss (tokenised now, cached for next time)'}",
        f"  train: {r.get('train_sequences')} sequences of {r.get('block_size')} tokens "
        f"({r.get('train_tokens'):,} tokens in the split)",
        f"  eval:  {r.get('eval_sequences')} sequences of {r.get('block_size')} tokens",
    ]
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return lines


def _baseline(r: Mapping[str, Any]) -> list[str]:
    source = " (from the interrupted run)" if r.get("reused") else ""
    return [
        "",
        f"Pruned model before training{source}: eval loss {fmt_num(r.get('eval_loss'))} | "
        f"perplexity {fmt_ppl(r.get('perplexity'))} | runtime {fmt_num(r.get('eval_runtime'), '.1f')}s",
    ]


def _estimate(r: Mapping[str, Any]) -> list[str]:
    return [
        "",
        *_budget(r),
        f"Expected training time: {hms(r.get('expected_s'))} "
        f"({r.get('max_steps')} steps x {fmt_num(r.get('s_per_step'), '.3f')} s/step measured on "
        f"{r.get('probe_steps')} probe steps, + {r.get('evals')} evaluations x {fmt_num(r.get('eval_s'), '.1f')}s)"
        + (f"; the probe took {fmt_num(r['probe_total_s'], '.1f')}s" if r.get("probe_total_s") else ""),
    ]


def _budget(r: Mapping[str, Any]) -> list[str]:
    if not r.get("budget_s"):
        return []
    budget = f"Time budget {fmt_num(r['budget_s'] / 60, 'g')} min (--max-train-minutes)"
    if r.get("reused"):
        return [f"{budget}: {r.get('budget_steps')} steps, as fitted by the first session (the schedule is kept)"]
    if r.get("budget_cut"):
        return [f"{budget}: {r.get('planned_steps')} planned steps do not fit; training runs "
                f"{r.get('budget_steps')} (the learning-rate schedule is sized to them)"]
    return [f"{budget}: all {r.get('planned_steps')} planned steps fit"]


def _train_start(r: Mapping[str, Any]) -> list[str]:
    lines = _header("Training")
    lines += [
        f"  Num examples = {r.get('examples'):,}",
        f"  Num epochs = {fmt_num(r.get('epochs'), 'g')}",
        f"  Per-device batch size = {r.get('per_device_batch')}",
        f"  Total batch size (devices x accumulation x per-device) = {r.get('total_batch')} "
        f"({r.get('devices')} x {r.get('accumulation')} x {r.get('per_device_batch')})",
        f"  Gradient accumulation steps = {r.get('accumulation')}",
        f"  Total optimization steps = {r.get('max_steps'):,}",
        f"  Trainable parameters = {r.get('trainable'):,}",
    ]
    if r.get("resume_from"):
        lines.append(f"  Resuming from {r['resume_from']} (step {r.get('resume_step')})")
    return lines


def _log(r: Mapping[str, Any]) -> list[str]:
    step, total = int(r.get("step") or 0), int(r.get("max_steps") or 0)
    pct = 100.0 * step / total if total else 0.0
    lr = to_float(r.get("lr"))
    return [
        f"Step {step}/{total} {progress_bar(step, total)} {pct:.1f}% | Loss: {fmt_num(r.get('loss'))} | "
        f"LR: {lr:.0e} | Grad norm: {fmt_num(r.get('grad_norm'), '.3f')} | Elapsed {hms(r.get('elapsed'))} | "
        f"ETA {hms(r.get('eta_s'))} | {fmt_num(r.get('tokens_per_s'), '.0f')} tok/s | "
        f"{fmt_memory(r.get('memory_mb'), r.get('memory_kind'))}"
        if lr is not None
        else f"Step {step}/{total} | Loss: {fmt_num(r.get('loss'))}"
    ]


def _best_line(r: Mapping[str, Any]) -> str:
    if r.get("is_best"):
        before = to_float(r.get("best_before"))
        if before is None:
            return "Best so far: Yes ✅ (first evaluation)"
        return f"Best so far: Yes ✅ (improved from {fmt_num(before)})"
    return f"Best so far: No (best {fmt_num(r.get('best_before'))} at step {r.get('best_step')})"


def _eval(r: Mapping[str, Any]) -> list[str]:
    return [
        f"--- Evaluation at step {r.get('step')} (epoch {fmt_num(r.get('epoch'), '.2f')}) ---",
        f"  eval loss: {fmt_num(r.get('eval_loss'))} | perplexity: {fmt_ppl(r.get('perplexity'))} | "
        f"runtime {fmt_num(r.get('eval_runtime'), '.2f')}s | {fmt_num(r.get('eval_samples_per_second'), '.2f')} "
        f"samples/s | {fmt_num(r.get('eval_steps_per_second'), '.2f')} steps/s",
        f"  {_best_line(r)}",
    ]


def _checkpoint(r: Mapping[str, Any]) -> list[str]:
    if r.get("ok"):
        why = " (new best)" if r.get("reason") == "best" else ""
        return [f"Checkpoint saved{why}: {r.get('path')} ✅"]
    return [f"Checkpoint {r.get('path')} is incomplete ❌: missing {', '.join(r.get('missing', []))}"]


def _alert(r: Mapping[str, Any]) -> list[str]:
    mark, what = {"error": ("❌", "ALERT"), "info": ("ℹ️", "NOTE")}.get(str(r.get("severity")), ("⚠️", "ALERT"))
    lines = [f"{mark} {what} [{r.get('kind')}] at step {r.get('step')}: {r.get('message')}"]
    if r.get("evidence"):
        lines.append(f"   evidence: {r['evidence']}")
    if r.get("fix"):
        lines.append(f"   fix: {r['fix']}")
    if r.get("basis"):
        lines.append(f"   based on: {'; '.join(str(b) for b in r['basis'])}")
    return lines


def _error(r: Mapping[str, Any]) -> list[str]:
    lines = ["", f"❌ {r.get('message')}"]
    for fix in r.get("fixes", []):
        lines.append(f"   - {fix}")
    if r.get("resume_command"):
        lines.append(f"   Resume with: {r['resume_command']}")
    return lines


def _stopped(r: Mapping[str, Any]) -> list[str]:
    lines = ["", f"⏹  {r.get('message')}"]
    if r.get("checkpoint"):
        lines.append(f"   Last good checkpoint: {r['checkpoint']}")
    if r.get("resume_command"):
        lines.append(f"   Resume with: {r['resume_command']}")
    return lines


def _train_end(r: Mapping[str, Any]) -> list[str]:
    lines = ["", f"Training completed in {hms(r.get('runtime_s'))} ({r.get('step')} steps, "
                 f"train loss {fmt_num(r.get('train_loss'))})."]
    ranks = r.get("rank_memory") or []
    if len(ranks) > 1:
        per_rank = [sum(v for v in rank.values() if isinstance(v, (int, float))) for rank in ranks]
        how = "sharded (FSDP2)" if r.get("sharded") else "replicated"
        lines.append(f"Trained state per process, {how} over {len(ranks)} ranks (weights, optimizer state, masks): "
                     + ", ".join(f"{b / 2**20:.2f} MiB" for b in per_rank)
                     + f" (all ranks together: {sum(per_rank) / 2**20:.2f} MiB)")
    return lines


def _best_loaded(r: Mapping[str, Any]) -> list[str]:
    if not r.get("checkpoint"):
        return ["No best checkpoint recorded; keeping the weights of the last step."]
    return [f"Loaded the best checkpoint: {r['checkpoint']} (eval loss {fmt_num(r.get('eval_loss'))}, "
            f"step {r.get('best_step')}) ✅"]


def _final_eval(r: Mapping[str, Any]) -> list[str]:
    lines = _header("Final evaluation")
    lines.append(
        f"  eval loss: {fmt_num(r.get('eval_loss'))} | runtime {fmt_num(r.get('eval_runtime'), '.2f')}s | "
        f"{fmt_num(r.get('eval_samples_per_second'), '.2f')} samples/s | perplexity: {fmt_ppl(r.get('perplexity'))}"
    )
    before = to_float(r.get("baseline_perplexity"))
    if before is not None:
        lines.append(
            f"  Improved from {fmt_ppl(before)} → {fmt_ppl(r.get('perplexity'))}, reduction "
            f"{fmt_num(r.get('reduction_pct'), '.2f')}%"
            if (to_float(r.get("reduction_pct")) or 0) > 0
            else f"  Not improved: {fmt_ppl(before)} → {fmt_ppl(r.get('perplexity'))}"
        )
    if r.get("reused_eval_of_step") is not None:
        lines.append(f"  (the evaluation of step {r['reused_eval_of_step']}: the same weights, not evaluated again)")
    if r.get("describes"):
        lines.append(f"  This is the perplexity of the {r['describes']}.")
    if r.get("adapter_perplexity") is not None:
        lines.append(f"  With the adapter unmasked: perplexity {fmt_ppl(r['adapter_perplexity'])} "
                     f"({r.get('adapter_describes')})")
    return lines


def _sparsity(r: Mapping[str, Any]) -> list[str]:
    if r.get("ok"):
        return [f"Sparsity kept: all {r.get('matrices')} pruned base matrices still zero at every masked "
                f"position ({100 * r.get('sparsity', 0):.2f}% zeros) ✅"]
    return [f"❌ Sparsity broken in {len(r.get('violations', []))} matrices: {', '.join(r.get('violations', []))}"]


def _adapter(r: Mapping[str, Any]) -> list[str]:
    lines = ["", f"Saving the adapter to {r.get('dir')}:"]
    lines += [f"  {path}" for path in r.get("files", [])]
    return lines


def _summary(r: Mapping[str, Any]) -> list[str]:
    lines = _header("Training summary")
    lines += [
        f"  Total steps:      {r.get('total_steps')}",
        f"  Total time:       {hms(r.get('total_time_s'))}" + _sessions(r.get("sessions")),
        f"  Final train loss: {fmt_num(r.get('final_train_loss'))} (mean over the run "
        f"{fmt_num(r.get('mean_train_loss'))})",
        f"  Final eval loss:  {fmt_num(r.get('final_eval_loss'))}",
        f"  Final perplexity: {fmt_ppl(r.get('final_perplexity'))}",
        f"  Best checkpoint:  {r.get('best_checkpoint') or 'none'}",
        "",
        "Next steps:",
    ]
    for text, command in r.get("next_steps", []):
        lines += [f"  # {text}", f"  {command}"]
    return lines


def _sessions(sessions: Any) -> str:
    """` over 2 sessions: steps 0-6 0:00:41, steps 6-12 0:00:38` for a resumed run; empty for one session."""
    if not isinstance(sessions, list) or len(sessions) < 2:
        return ""
    parts = [f"steps {s.get('from_step')}-{s.get('to_step')} {hms(s.get('seconds'))}" for s in sessions]
    return f" over {len(sessions)} sessions: {', '.join(parts)}"


def _resume(r: Mapping[str, Any]) -> list[str]:
    lines = [f"Skipped {line}" for line in r.get("skipped") or []]
    return ["", *lines, f"Resuming from {r.get('checkpoint')} at step {r.get('step')}; "
                        f"{r.get('dropped', 0)} records after it were superseded."]


def _plain(r: Mapping[str, Any]) -> list[str]:
    return [str(r.get("message", r))]


RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "config": _config,
    "preflight": _preflight,
    "model": _model,
    "lora": _lora,
    "dataset": _dataset,
    "baseline_eval": _baseline,
    "estimate": _estimate,
    "train_start": _train_start,
    "log": _log,
    "eval": _eval,
    "checkpoint": _checkpoint,
    "alert": _alert,
    "error": _error,
    "stopped": _stopped,
    "train_end": _train_end,
    "best_loaded": _best_loaded,
    "final_eval": _final_eval,
    "sparsity_check": _sparsity,
    "adapter_saved": _adapter,
    "summary": _summary,
    "resume": _resume,
    "message": _plain,
}


def render(record: Mapping[str, Any]) -> str:
    """The console text of one record (may be several lines)."""
    return "\n".join(RENDERERS.get(record.get("event", ""), _plain)(record))


class RunLog:
    """Emits records: appended to `metrics.jsonl`, rendered to the console and to `train.log`.

    On ranks other than 0 it is silent (`enabled=False`): one console, one log, one metrics file.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.stream: IO[str] | None = stream if stream is not None else sys.stdout
        self.records: list[dict[str, Any]] = []
        self._metrics: JsonlWriter | None = None
        self._log: IO[str] | None = None
        self._held: list[dict[str, Any]] = []

    def open(self) -> None:
        if self.enabled and self._metrics is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = JsonlWriter(self.out_dir / "metrics.jsonl")
            self._log = (self.out_dir / "train.log").open("a", encoding="utf-8")

    def emit(self, event: str, step: int | None = None, *, persist: bool = True, **fields: Any) -> dict[str, Any]:
        """Make, store, print and log one record. `persist=False` prints without writing files (pre-flight
        failures, before the output directory is known to be safe)."""
        record = make_record(event, step, **fields)
        self.records.append(record)
        if not self.enabled:
            return record
        if persist:
            self.open()
            assert self._metrics is not None
            self._metrics.write(record)
        else:
            self._held.append(record)
        self.print_text(render(record), persist=persist)
        return record

    def release(self) -> None:
        """Write the records printed with `persist=False` to the files (already on the console)."""
        if not self.enabled:
            return
        self.open()
        assert self._metrics is not None and self._log is not None
        for record in self._held:
            self._metrics.write(record)
            self._log.write(render(record) + "\n")
        self._log.flush()
        self._held.clear()

    def print_text(self, text: str, persist: bool = True) -> None:
        if not self.enabled:
            return
        if self.stream is not None:
            try:
                print(text, file=self.stream, flush=True)
            except (BrokenPipeError, ValueError, OSError):
                # The console went away (`| head` exited, terminal closed): training and the files carry on.
                self.stream = None
        if persist and self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()

    def record_error(self, message: str) -> None:
        """A user error that ends the run, into train.log and metrics.jsonl when they are open (the console
        shows it from the CLI); nothing when the run never opened them, or already recorded its error."""
        if not self.enabled or self._metrics is None or (self.records and self.records[-1]["event"] == "error"):
            return
        record = make_record("error", None, kind="user_error", message=message)
        self.records.append(record)
        # The error may be the full disk itself: the one-line error reaches the user whatever happens here.
        with contextlib.suppress(OSError):
            self._metrics.write(record)
            if self._log is not None:
                self._log.write(f"Error: {message}\n")
                self._log.flush()

    def close(self) -> None:
        """Close the files; a flush that fails (a full disk) loses nothing more than it already lost."""
        if self._metrics is not None:
            with contextlib.suppress(OSError):
                self._metrics.close()
            self._metrics = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
