"""The end of a run that trained to its last step: best checkpoint loaded, final evaluation, the sparsity
assertion, the adapter saved (complete-or-absent, with its base digest), and the summary over the whole run
(all sessions when it was resumed).

`final_eval` is the one final-evaluation path: every perplexity it reports as the result is the deployable
sparse model's (issue 10).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from prunetune import phases, rundir
from prunetune.analysis import fixes
from prunetune.errors import UserError
from prunetune.finetune import checkpoint_layout
from prunetune.finetune.callbacks import MonitorCallback
from prunetune.finetune.run import Run
from prunetune.finetune.trainer import OOM_ERRORS, PrunetuneTrainer
from prunetune.rundir.records import to_float
from prunetune.sparsity.violations import pattern_violations


def base_result(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, baseline: dict[str, Any],
                train_metrics: dict[str, Any]) -> dict[str, Any]:
    """The fields every ending of a run returns."""
    return {
        "status": "completed", "out": str(run.out), "pruned": str(run.pruned.path),
        "base_model": run.pruned.base_model, "total_steps": trainer.state.global_step,
        "train_loss": train_metrics.get("train_loss"), "baseline_eval_loss": baseline.get("eval_loss"),
        "baseline_perplexity": baseline.get("perplexity"), "last_checkpoint": monitor.state.last_checkpoint,
    }


def oom_error(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, err: BaseException,
              stage: str) -> UserError:
    """The `error` record (with the fixes and the resume command) and the one-line error of an OOM."""
    cfg = run.cfg
    ways = fixes.oom_fixes(cfg.block_size, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                           cfg.gradient_checkpointing, run.precision.name != "fp32")
    run.runlog.emit("error", trainer.state.global_step, kind="out_of_memory", stage=stage,
                    message=f"Out of memory during {stage} ({type(err).__name__}).", fixes=ways,
                    fix="; ".join(ways), resume_command=run.resume_command(),
                    checkpoint=monitor.state.last_checkpoint)
    return UserError(f"out of memory during {stage}; apply one of the fixes above, then resume with: "
                     f"{run.resume_command()}")


def finish(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, baseline: dict[str, Any],
           train_metrics: dict[str, Any]) -> dict[str, Any]:
    best_ckpt, loaded_step = load_best(run, trainer, monitor)
    model_step = trainer.state.global_step if loaded_step is None else loaded_step
    final = final_eval(run, trainer, monitor, baseline, model_step)
    whole = whole_run(trainer, train_metrics)
    train_metrics = train_metrics | {"train_loss": whole["mean_train_loss"],
                                     "train_loss_this_session": train_metrics.get("train_loss"),
                                     "total_time_s": whole["total_time_s"], "sessions": whole["sessions"]}
    if run.is_main:
        trainer.save_metrics("train", train_metrics)
    violations = check_sparsity(run, trainer)
    adapter_dir = save_result(run, trainer, best_ckpt, baseline, final)
    state = monitor.state
    run.runlog.emit("summary", trainer.state.global_step, total_steps=trainer.state.global_step,
                    total_time_s=whole["total_time_s"], sessions=whole["sessions"],
                    final_train_loss=state.last_train_loss, mean_train_loss=whole["mean_train_loss"],
                    final_eval_loss=final.get("eval_loss"), final_perplexity=final.get("perplexity"),
                    best_checkpoint=best_ckpt, next_steps=next_steps(run, adapter_dir))
    phases.boundary("finished")
    return base_result(run, trainer, monitor, baseline, train_metrics) | {
        "adapter": str(adapter_dir), "final_eval_loss": final.get("eval_loss"),
        "final_perplexity": final.get("perplexity"), "best_checkpoint": best_ckpt,
        "total_time_s": whole["total_time_s"], "sessions": whole["sessions"], "sparsity_ok": not violations,
        "last_train_loss": state.last_train_loss,
    }


def load_best(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback) -> tuple[str | None, int | None]:
    """Load the best checkpoint's weights (load_best_model_at_end); returns (that checkpoint, the step whose
    weights the model now holds, None when it still holds the last step's)."""
    state = monitor.state
    best_ckpt = state.best_checkpoint or trainer.state.best_model_checkpoint
    if not run.cfg.load_best_model_at_end:
        return best_ckpt, None
    if not (best_ckpt and _load_weights(run, trainer, Path(best_ckpt))):
        run.runlog.emit("best_loaded", None, checkpoint=None)
        return best_ckpt, None
    run.runlog.emit("best_loaded", state.best_step, checkpoint=best_ckpt, eval_loss=state.best_loss,
                    best_step=state.best_step)
    return best_ckpt, state.best_step


def _load_weights(run: Run, trainer: PrunetuneTrainer, checkpoint: Path) -> bool:
    """The trained weights of `checkpoint` into the model: FSDP's sharded checkpoint by accelerate (every rank
    reads its own shards), a whole one by the method."""
    if checkpoint_layout.is_sharded(checkpoint) and trainer.is_fsdp_enabled:
        from accelerate.utils import load_fsdp_model

        # adapter_only: what the Trainer saved for a PEFT model (the adapter); ignored for a plain model
        load_fsdp_model(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.model, str(checkpoint),
                        adapter_only=True)
        return True
    return run.method.load_checkpoint(trainer.model, checkpoint)


def final_eval(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, baseline: dict[str, Any],
               model_step: int | None = None) -> dict[str, Any]:
    """The fine-tuned model on the same tokenised eval set as the baseline. Its `perplexity` is always the
    deployable sparse model's: for plain LoRA (dense update) a second pass with the update masked by the
    keep-mask, and the adapter's own number beside it as `adapter_perplexity`. `model_step`: the step whose
    weights the model holds; when it was evaluated during training, those metrics are reused (never the same
    model twice)."""
    cfg = run.cfg
    if cfg.eval_strategy == "no" and not cfg.load_best_model_at_end:
        return {}
    evaluated = monitor.state.evals.get(model_step) if model_step is not None else None
    if evaluated is not None:
        evaluated = {k: v for k, v in evaluated.items() if k.startswith("eval_") or k == "perplexity"}
    method = run.method
    passes = method.evaluations()  # the deployable-evaluation policy: `deployable` last
    measured: dict[str, dict[str, Any]] = {}
    try:
        for i, ev in enumerate(passes):
            if i == 0 and evaluated is not None:
                measured[ev.key] = evaluated  # the model as it stands was evaluated during training
                continue
            with ev.context(trainer.model):
                measured[ev.key] = evaluate_phase(trainer, monitor, "final" if i == 0 else ev.key)
    except OOM_ERRORS as err:
        raise oom_error(run, trainer, monitor, err, "the final evaluation") from None
    final = measured["deployable"]
    adapter = measured.get("adapter")
    before, after = to_float(baseline.get("perplexity")), to_float(final.get("perplexity"))
    reduction = 100 * (before - after) / before if before and after is not None and math.isfinite(before) else None
    run.runlog.emit("final_eval", trainer.state.global_step, eval_loss=final.get("eval_loss"),
                    perplexity=after, eval_runtime=final.get("eval_runtime"),
                    eval_samples_per_second=final.get("eval_samples_per_second"),
                    eval_steps_per_second=final.get("eval_steps_per_second"),
                    baseline_perplexity=before, baseline_eval_loss=baseline.get("eval_loss"), reduction_pct=reduction,
                    describes=method.describes(True),
                    adapter_perplexity=adapter.get("perplexity") if adapter else None,
                    adapter_eval_loss=adapter.get("eval_loss") if adapter else None,
                    adapter_describes=method.describes(False) if adapter else None,
                    reused_eval_of_step=model_step if evaluated is not None else None)
    if run.is_main:
        trainer.save_metrics("eval", {k: v for k, v in final.items() if k != "perplexity"} |
                             {"eval_perplexity": after})
    return final


def evaluate_phase(trainer: PrunetuneTrainer, monitor: MonitorCallback, phase: str) -> dict[str, Any]:
    """One evaluation outside training (`baseline`, `final`, `deployable`) on the shared tokenised eval set."""
    monitor.phase = phase
    trainer.evaluate()
    return monitor.state.phase_metrics[phase]


def whole_run(trainer: PrunetuneTrainer, train_metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean train loss, time and steps over every session of the run, and each session's share."""
    this = trainer.session()
    steps_now = this["to_step"] - this["from_step"]
    this["loss_sum"] = (to_float(train_metrics.get("train_loss")) or 0.0) * steps_now
    sessions = [*trainer.sessions, this]
    steps = sum(s["to_step"] - s["from_step"] for s in sessions)
    loss_sum = sum(s["loss_sum"] for s in sessions)
    shares = [{"from_step": s["from_step"], "to_step": s["to_step"], "seconds": s["seconds"],
               "train_loss": s["loss_sum"] / max(s["to_step"] - s["from_step"], 1)} for s in sessions]
    return {"mean_train_loss": loss_sum / steps if steps else to_float(train_metrics.get("train_loss")),
            "total_time_s": sum(s["seconds"] for s in sessions), "sessions": shares}


def check_sparsity(run: Run, trainer: PrunetuneTrainer) -> list[str]:
    """Assert, not assume, that every pruned position of the base is still zero."""
    violations = sorted(pattern_violations(trainer.model, run.masks))
    kept = sum(int(m.sum()) for m in run.masks.values())
    total = sum(m.numel() for m in run.masks.values())
    run.runlog.emit("sparsity_check", trainer.state.global_step, ok=not violations, violations=violations,
                    matrices=len(run.masks), sparsity=1 - kept / max(total, 1))
    if violations:
        raise RuntimeError(f"pruned base weights became non-zero in {violations}: this is a bug in prunetune")
    return violations


def save_result(run: Run, trainer: PrunetuneTrainer, best_ckpt: str | None, baseline: dict[str, Any],
                final: dict[str, Any]) -> Path:
    """The trained result where the method keeps it (`OUT/adapter`, `OUT/model`, ...), written beside its place
    and published whole (`rundir.publish_dir`)."""
    method = run.method
    final_dir = run.out / method.result_dir
    staging = run.out / f"{rundir.STAGING_PREFIX}{final_dir.name}-{os.getpid()}"
    record = {"method": method.name, "run_dir": str(run.out.resolve()), "best_checkpoint": best_ckpt,
              "final_perplexity": to_float(final.get("perplexity")),
              "baseline_perplexity": to_float(baseline.get("perplexity")), "mask_source": run.mask_source}
    try:
        method.save_result(trainer, staging, run.pruned.path, run.pruned.base_model, record, run.base_digest,
                           run.is_main)
    except BaseException:
        if run.is_main:  # a save a full disk cut short leaves nothing behind (and frees what it took)
            shutil.rmtree(staging, ignore_errors=True)
        raise
    files = []
    if run.is_main:
        phases.boundary("result-staged")
        rundir.publish_dir(staging, final_dir)
        files = sorted(str(p) for p in final_dir.iterdir() if p.is_file() and p.name != "training_args.bin")
        phases.boundary("result")
    run.runlog.emit("adapter_saved", None, dir=str(final_dir), result=final_dir.name, files=files, method=method.name)
    return final_dir


def next_steps(run: Run, result_dir: Path) -> list[tuple[str, str]]:
    """The method's next steps, with the report of this run after the first."""
    cfg = run.cfg
    data_flag = f" --dataset {cfg.dataset}" + (f" --data-dir {shlex.quote(cfg.data_dir)}" if cfg.data_dir else "")
    steps = run.method.next_steps(result_dir, run.pruned.path, run.out, data_flag)
    report = ("plots and diagnosis of this run", f"prunetune report {shlex.quote(str(run.out))}")
    return [*steps[:1], report, *steps[1:]]
