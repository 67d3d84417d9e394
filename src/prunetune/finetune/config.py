"""`FinetuneConfig`: every setting of a LoRA recovery run, typed, documented and validated in one place.

Defaults follow the recipe our users come from (the Wanda `lora_ft` script on Llama-2-7B):
LoRA r=8, alpha=16, dropout 0.05 on q_proj/v_proj, lr 1e-4, block size 1024, 1 epoch,
logging every 10 steps, eval every 200, save every 500, the best checkpoint by eval loss loaded at the end.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from prunetune.budget import check_minutes
from prunetune.errors import UserError
from prunetune.recovery import registry as recovery_methods

EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)
BEST_METRICS = ("eval_loss", "loss")
DISTILL_MODES = ("none", "logits", "layerwise", "both")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class FinetuneConfig:
    """One recovery fine-tuning run. Library code takes this, never an argparse namespace."""

    pruned: str
    """A `prunetune prune` output directory (its `prune.json` names the dense base), or any model directory."""
    out: str
    """Run directory: console log, metrics, checkpoints, the final adapter."""
    dataset: str = "wikitext2"
    """`wikitext2` | `c4` | `wikipedia-vital` | a local text file (see prunetune.data)."""
    data_dir: str | None = None
    """Where local copies of the corpora live (`--data-dir`); None: `$PRUNETUNE_DATA_DIR` or the hub."""
    block_size: int = 1024
    """Tokens per training sequence; text is concatenated and cut into blocks of this size (run_clm)."""
    epochs: float = 1.0
    """Passes over the training sequences (ignored when max_steps > 0)."""
    lr: float = 1e-4
    """Peak learning rate of the LoRA parameters."""
    max_train_samples: int | None = None
    """Use only the first N grouped training sequences (None: all)."""
    max_eval_samples: int | None = 128
    """Use only the first N grouped validation sequences; the same set gives the before/after perplexity."""
    method: str = "auto"
    """The recovery method (prunetune.recovery): `lora` (adapter, dense update), `masked-lora` (adapter whose
    update keeps the pruned pattern: merging is exact) or `sparse-ft` (the kept weights themselves; no adapter).
    `auto`: chosen from the pruned model by `prunetune.recovery.auto` (the banner says which and why)."""
    sparse_ft_targets: tuple[str, ...] = ("all-linear",)
    """Module types whose kept weights `sparse-ft` trains (`all-linear` for every pruned linear)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Module types that get adapters (`all-linear` for every decoder linear)."""
    per_device_train_batch_size: int = 1
    """Sequences per device per micro-batch (the recipe uses 1 with 1024-token blocks)."""
    per_device_eval_batch_size: int = 8
    """Sequences per device per evaluation batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    max_train_minutes: float | None = None
    """Time budget for training: after the probe step, the steps (max_steps or epochs) are cut to what fits,
    evaluations included, and the learning-rate schedule is sized to them. None: no budget."""
    logging_steps: int = 10
    """A step line and a `log` record every N optimizer steps."""
    logging_first_step: bool = True
    """Also log step 1, so a broken run shows itself at once."""
    eval_strategy: str = "steps"
    """When to evaluate: no | steps | epoch."""
    eval_steps: int = 200
    """Evaluate every N optimizer steps (eval_strategy=steps)."""
    save_strategy: str = "steps"
    """When to checkpoint: no | steps | epoch."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (save_strategy=steps); a new best eval is always checkpointed too."""
    save_total_limit: int | None = None
    """Keep at most N checkpoints (the best one is always kept)."""
    load_best_model_at_end: bool = True
    """After training, load the checkpoint with the best `metric_for_best_model` before the final evaluation."""
    metric_for_best_model: str = "eval_loss"
    """The metric that picks the best checkpoint (lower is better)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    bf16: bool = False
    """bfloat16 mixed precision (CUDA: AMP; CPU: autocast, fast on AVX-512 bf16 CPUs)."""
    fp16: bool = False
    """float16 mixed precision with loss scaling (CUDA only)."""
    warmup_steps: float = 0
    """Linear warmup: integer steps, or a fraction of the total steps when in [0, 1)."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    seed: int = 42
    """Seed of the LoRA initialisation, dropout and data order; a resumed run continues its RNG state."""
    dataloader_num_workers: int = 0
    """Data-loading worker processes (0: in the main process, required for exact CPU resume)."""
    report_to: tuple[str, ...] = ("none",)
    """Extra trackers the Trainer reports to (tensorboard, wandb, ...); `none` for only our own files."""
    resume_from_checkpoint: str | None = None
    """`auto` (the latest checkpoint in `out`) or a checkpoint directory."""
    overwrite: bool = False
    """Replace an existing run in `out` (otherwise it is refused, never silently overwritten)."""
    distill: str | bool = "none"
    """Teacher signal from the dense model: `none`, `logits` (CE + alpha * T^2 * KL(teacher || student)),
    `layerwise` (CE + weight * SquareHead over decoder hidden states) or `both`. true/false = logits/none."""
    distill_alpha: float = 0.5
    """Weight of the distillation term."""
    distill_temperature: float = 2.0
    """Softmax temperature of teacher and student in the KL term."""
    distill_layerwise_weight: float = 1.0
    """Weight of the layer-wise (SquareHead) distillation term."""
    teacher: str | None = None
    """Teacher model spec; None: the dense model named in the pruned dir's `prune.json`."""
    alert_thresholds: dict[str, Any] = field(default_factory=dict)
    """Overrides of `prunetune.analysis.rules.Thresholds` fields for the live alerts."""
    probe_steps: int = 2
    """Forward+backward passes timed before training for the expected-time estimate (the last one counts)."""
    device: str | None = None
    """`cpu` or `cuda`; None: CUDA when available."""
    dtype: str = "auto"
    """Training precision: `auto` = bf16 autocast where the device computes bf16 natively, float32 elsewhere
    (the choice and its reason go to the banner and run_config.json); `--bf16`/`--fp16` override it."""

    def __post_init__(self) -> None:
        self.lora_targets = _names(self.lora_targets)
        self.sparse_ft_targets = _names(self.sparse_ft_targets)
        self.report_to = _names(self.report_to)
        self.distill = distill_mode(self.distill)
        if self.metric_for_best_model == "loss":
            self.metric_for_best_model = "eval_loss"
        self._check_numbers()
        self._check_choices()
        self._check_combinations()

    def _check_numbers(self) -> None:
        positive_ints = ("block_size", "lora_r", "per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps")
        optional_ints = ("max_train_samples", "max_eval_samples", "save_total_limit")
        for name in positive_ints + optional_ints:
            value = getattr(self, name)
            if value is None and name in optional_ints:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr!r}; the recipe uses 1e-4")
        if self.max_steps <= 0 and not self.epochs > 0:
            raise UserError(f"--epochs must be > 0 (or give --max_steps), got {self.epochs!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max_steps must be a positive integer or -1 (use --epochs), got {self.max_steps}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.distilling and not (self.distill_alpha >= 0 and self.distill_temperature > 0
                                    and self.distill_layerwise_weight >= 0):
            raise UserError("--distill-alpha and --distill-layerwise-weight must be >= 0 and --distill-temperature > 0")
        if self.probe_steps < 0:
            raise UserError(f"probe_steps must be >= 0, got {self.probe_steps}")
        check_minutes(self.max_train_minutes, "--max-train-minutes")
        if self.max_train_minutes is not None and self.probe_steps < 1:
            raise UserError("--max-train-minutes needs probe_steps >= 1: the steps that fit come from the "
                            "measured step time")

    def _check_choices(self) -> None:
        if not self.lora_targets:
            raise UserError("--lora-targets is empty; give module types such as q_proj,v_proj or all-linear")
        choices = {"eval_strategy": EVAL_STRATEGIES, "save_strategy": SAVE_STRATEGIES,
                   "lr_scheduler_type": SCHEDULERS, "dtype": DTYPES}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise UserError(f"unknown --{name} {getattr(self, name)!r}; choose one of: {', '.join(valid)}")
        recovery_methods.check(self.method)
        if self.metric_for_best_model not in BEST_METRICS:
            raise UserError(f"--metric_for_best_model {self.metric_for_best_model!r} is not supported; use eval_loss")
        if self.device not in (None, "cpu", "cuda"):
            raise UserError(f"unknown --device {self.device!r}; choose cpu or cuda")

    def _check_combinations(self) -> None:
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise UserError("--load_best_model_at_end needs evaluations; set --eval_strategy steps or drop it")
        if self.bf16 and self.fp16:
            raise UserError("--bf16 and --fp16 are exclusive; choose one")
        if self.resume_from_checkpoint is not None and self.overwrite:
            raise UserError("--overwrite and --resume_from_checkpoint contradict each other; choose one")

    @property
    def distilling(self) -> bool:
        return self.distill != "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A comma-separated string or a sequence -> a tuple of stripped names."""
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return tuple(value)


def distill_mode(value: str | bool | None) -> str:
    """`--distill` value -> one of DISTILL_MODES; booleans of older configs: true = logits, false = none."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "logits"
    mode = str(value).strip().lower()
    mode = {"true": "logits", "yes": "logits", "1": "logits", "false": "none", "no": "none", "0": "none",
            "": "none"}.get(mode, mode)
    if mode not in DISTILL_MODES:
        raise UserError(f"unknown --distill {value!r}; choose one of: {', '.join(DISTILL_MODES)}")
    return mode


def config_from_mapping(mapping: dict[str, Any], source: str = "config") -> FinetuneConfig:
    """A FinetuneConfig from a mapping with user spellings (pipeline YAML, --config files): `prunetune.configfile`
    normalises the keys (aliases such as `learning_rate`) and converts the values."""
    from prunetune import configfile

    values = configfile.read_layer(FinetuneConfig, mapping, source)
    for key in ("pruned", "out"):
        if not values.get(key):
            raise UserError(f"{source}: `{key}` is required")
    return configfile.build_config(FinetuneConfig, values)


def resolve_method(cfg: FinetuneConfig, prune_json: dict[str, Any], free_bytes: int | None = None,
                   shards: int = 1, devices: int = 1) -> tuple[FinetuneConfig, str]:
    """(cfg with a concrete method, why): `--method auto` asks `prunetune.recovery.auto` (`shards`: processes of
    an FSDP2 run; `devices`: GPUs visible to an unsharded one)."""
    if cfg.method != recovery_methods.AUTO:
        return cfg, f"{cfg.method}: requested (--method {cfg.method})"
    from prunetune.recovery.auto import choose

    method, why = choose(prune_json, free_bytes, shards, devices)
    return dataclasses.replace(cfg, method=method), why
