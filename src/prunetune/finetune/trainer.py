"""The Trainer prunetune trains with: `PrunetuneTrainer` (the loss hook, complete-or-absent checkpoints),
its `TrainingArguments` built from a `FinetuneConfig`, the measured probe step, and where a process runs.

Extension points for recovery methods:
- the loss: `PrunetuneTrainer(loss=...)` takes any `TrainingLoss` (`build_loss` picks CE or logit KD today);
- after every micro-batch's backward, before gradients are clipped: a callback's `on_backward_end(args, state,
  control)` (`BackwardCallback`; the Trainer has no such event, this Trainer adds it);
- after every optimizer step: a `TrainerCallback.on_optimizer_step` (the method's callbacks, see
  `prunetune.recovery.base.Prepared.callbacks`) runs after `optimizer.step()`, before `zero_grad`.

Under FSDP2 (`accelerate launch` with `fsdp_version: 2`) the model is sharded before the first evaluation
(`shard`): accelerate shards a model only together with its optimizer, and the baseline evaluation and the probe
step run before `train()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from prunetune import phases
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.data import FinetuneData
from prunetune.finetune.distill import DistillSpec, distill_compute_loss
from prunetune.rundir import claim, publish_dir
from prunetune.runinfo import write_json, write_text

# A checkpoint is written here first and renamed to `checkpoint-N` only once every file is on disk, so a
# `checkpoint-N` directory is always complete (a kill -9 mid-save leaves only this staging dir behind).
CHECKPOINT_STAGING = ".checkpoint-staging"
# In each checkpoint: the training sessions up to it (steps, seconds, loss sum), so a resumed run reports the
# whole run's mean loss and time, not only its last session's.
SESSIONS = "prunetune_sessions.json"
OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


class TrainingLoss(Protocol):
    """`(model, inputs) -> (loss, outputs)` for a training micro-batch; evaluation always uses plain CE."""

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]: ...


class Distillation:
    """CE plus the teacher's terms (logit KL, layer-wise SquareHead) from a frozen teacher, per `DistillSpec`."""

    def __init__(self, teacher: nn.Module, spec: DistillSpec) -> None:
        self.teacher, self.spec = teacher, spec

    def __call__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        return distill_compute_loss(model, self.teacher, inputs, self.spec)


def build_loss(cfg: FinetuneConfig, teacher: nn.Module | None) -> TrainingLoss | None:
    """The training loss of `cfg`: None = the Trainer's own causal-LM cross-entropy."""
    if cfg.distilling and teacher is not None:
        return Distillation(teacher, DistillSpec.from_config(cfg))
    return None


@runtime_checkable
class BackwardCallback(Protocol):
    """A callback that acts on the gradients of each micro-batch, before they are accumulated into a step and
    clipped (sparse-ft masks the gradient shards FSDP2 reduce-scattered)."""

    def on_backward_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any: ...


class PrunetuneTrainer(Trainer):
    """The Trainer with two changes: the training loss is pluggable, and checkpoints are complete-or-absent."""

    def __init__(self, *args: Any, loss: TrainingLoss | None = None, sessions: list[dict[str, Any]] | None = None,
                 started: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_loss = loss
        self.sessions = list(sessions or [])
        """The earlier sessions of this run (from the checkpoint resumed from)."""
        self.started = time.perf_counter() if started is None else started
        self._flops_per_token: int | None = None

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP estimate (6 x tokens x non-embedding parameters), with the parameter count taken
        once: Transformers recounts every parameter tensor at every step (8 ms a step on the tiny test model,
        ~10% of its step time)."""
        if self._flops_per_token is None:
            count = getattr(self.model, "num_parameters", None)
            self._flops_per_token = 6 * count(exclude_embeddings=True) if count is not None else 0
        ids = inputs.get("input_ids")
        return self._flops_per_token * ids.numel() if ids is not None else 0

    def session(self, loss_sum: float | None = None) -> dict[str, Any]:
        """This session so far: steps from/to, wall seconds, and the sum of its per-step train losses (by
        default from the Trainer's running sums: the total logged so far plus what waits for the next log)."""
        first = getattr(self, "_initial_global_step", self.state.global_step)
        if loss_sum is None:
            pending = getattr(self, "_tr_loss", None)
            loss_sum = getattr(self, "_total_loss_scalar", 0.0) + (float(pending) if pending is not None else 0.0)
        return {"from_step": first, "to_step": self.state.global_step, "seconds": time.perf_counter() - self.started,
                "loss_sum": loss_sum}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BackwardCallback):
                callback.on_backward_end(self.args, self.state, self.control)
        return loss

    def shard(self) -> None:
        """Shard the model now, with its optimizer (FSDP2 through accelerate; nothing otherwise): evaluation and
        the probe then run on the sharded model, and `train()` finds it prepared (accelerate returns a model that
        is already sharded as it is, and an optimizer it prepared unchanged)."""
        if not (self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2):
            return
        self.create_optimizer()
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.training_loss is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = self.training_loss(model, inputs)
        return (loss, outputs) if return_outputs else loss

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save into `OUT/.checkpoint-staging/checkpoint-N`, then rename to `OUT/checkpoint-N` (atomic on one
        filesystem). The Trainer's own rotation runs on the staging dir (one entry: a no-op), ours after."""
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self.args.output_dir)
        staging_root = run_dir / CHECKPOINT_STAGING
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self._barrier()  # every rank writes its shards there (FSDP): none may start before the old one is gone
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                write_json(staging_root / name / SESSIONS, [*self.sessions, self.session()])
                _point_into(staging_root / name / "trainer_state.json", staging_root, run_dir)
        except BaseException:
            # A save that failed (a full disk, a signal) leaves no half checkpoint, and frees what it took.
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self.args.output_dir = str(run_dir)
        self._barrier()
        if self.args.should_save:
            phases.boundary("checkpoint-staged")
            claim(run_dir, [name], "prunetune finetune")  # listed before it appears
            publish_dir(staging_root / name, run_dir / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            phases.boundary("checkpoint")
            best = self.state.best_global_step
            if best and (run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}").is_dir():
                self.state.best_model_checkpoint = str(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best}")
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self._barrier()

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """The Trainer's `{split}_results.json` and `all_results.json`, written whole or not at all (the Trainer
        writes them in place, and reads all_results.json back: a file a full disk cut short would fail the rerun).
        An unreadable earlier all_results.json is replaced, not merged."""
        if not self.is_world_process_zero():
            return
        out = Path(self.args.output_dir)
        write_json(out / f"{split}_results.json", metrics)
        if combined:
            try:
                everything = json.loads((out / "all_results.json").read_text())
            except (OSError, ValueError):
                everything = {}
            everything = everything if isinstance(everything, dict) else {}
            write_json(out / "all_results.json", {**everything, **metrics})

    def save_state(self) -> None:
        """The Trainer's `trainer_state.json` in the run directory, written whole or not at all."""
        if self.is_world_process_zero():
            write_text(Path(self.args.output_dir) / "trainer_state.json",
                       json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n")

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def _point_into(state_file: Path, staging_root: Path, run_dir: Path) -> None:
    """The Trainer wrote the checkpoint's state while its output dir was the staging dir: its best-checkpoint path
    names the staging dir, which is gone once the checkpoint is published. Point it at the run directory."""
    state = json.loads(state_file.read_text())
    best = state.get("best_model_checkpoint")
    if isinstance(best, str) and best.startswith(str(staging_root)):
        state["best_model_checkpoint"] = str(run_dir) + best[len(str(staging_root)):]
        write_json(state_file, state)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_launched() -> bool:
    """Whether `accelerate launch` asked for FSDP (its config's `distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def fsdp_version() -> int:
    """The FSDP version `accelerate launch` asked for (its config's `fsdp_version`; accelerate's default is 1)."""
    return int(os.environ.get("FSDP_VERSION", "1") or 1)


def load_device(device: str) -> torch.device:
    """Where this process loads its models: under torchrun/accelerate each rank its own GPU, so eight ranks
    never stack eight copies of a 7B model on GPU 0 before the Trainer places them. Under FSDP the CPU: sharding
    moves each rank's shards to its GPU, and no GPU ever holds the whole model."""
    if fsdp_launched():
        return torch.device("cpu")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def training_args(cfg: FinetuneConfig, out: Path, device: str, bf16: bool, fp16: bool) -> TrainingArguments:
    """TrainingArguments of `cfg`; `bf16`/`fp16` are the resolved precision (`--dtype auto` or the flags)."""
    evaluating = cfg.eval_strategy != "no"
    try:
        return TrainingArguments(
            output_dir=str(out), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            per_device_eval_batch_size=cfg.per_device_eval_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=cfg.logging_first_step,
            # The Trainer's default hides NaN losses by averaging them away; divergence must be seen.
            logging_nan_inf_filter=False,
            eval_strategy=cfg.eval_strategy, eval_steps=cfg.eval_steps if cfg.eval_strategy == "steps" else None,
            save_strategy=cfg.save_strategy, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
            # Best-checkpoint loading is done by the engine, so save_steps need not be a multiple of eval_steps:
            # the callback checkpoints every new best evaluation.
            load_best_model_at_end=False,
            metric_for_best_model="eval_loss" if evaluating else None,
            greater_is_better=False if evaluating else None,
            activation_checkpointing=cfg.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            bf16=bf16, fp16=fp16, warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_scheduler_type,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
            dataloader_num_workers=cfg.dataloader_num_workers, report_to=list(cfg.report_to),
            use_cpu=device == "cpu", remove_unused_columns=False,
            disable_tqdm=True,  # the step lines replace the progress bar
            ddp_find_unused_parameters=False,
            save_only_model=False,  # optimizer, scheduler and RNG states make the resume exact
        )
    except (ValueError, ImportError) as err:
        raise UserError(f"invalid training arguments: {str(err).strip().splitlines()[0]}") from None


def probe_seconds(trainer: Trainer, model: nn.Module, data: FinetuneData, cfg: FinetuneConfig) -> float | None:
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
