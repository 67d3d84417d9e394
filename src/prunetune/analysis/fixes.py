"""The one text of each fix, in the reader's terms.

Every place that tells a user what to change (the offline rules of `report`, the live alerts and stop
messages of `finetune`, the pipeline's stage errors) phrases it through these functions, so "lower the LR"
reads the same everywhere and names the flags of the tool that produced the run:

- `prunetune`: the flags of `prunetune finetune` (`--lr`, `--epochs`, `--block-size`, ...);
- `trainer`:   Transformers `TrainingArguments` / PEFT `LoraConfig` names as the example scripts take them
               (`--learning_rate`, `--num_train_epochs`, `--lora_dropout`, ...): the reader of a foreign log;
- `pipeline`:  the keys of a `prunetune run` YAML (`finetune.lr`, ...).
"""

from __future__ import annotations

from prunetune.fmt import fmt_lr

FLAVOURS: tuple[str, ...] = ("prunetune", "trainer", "pipeline")

# setting -> its spelling per flavour (prunetune, trainer, pipeline)
_FLAGS: dict[str, tuple[str, str, str]] = {
    "lr": ("--lr", "--learning_rate", "finetune.lr"),
    "epochs": ("--epochs", "--num_train_epochs", "finetune.epochs"),
    "block_size": ("--block-size", "--block_size", "finetune.block_size"),
    "accum": ("--gradient_accumulation_steps", "--gradient_accumulation_steps",
              "finetune.gradient_accumulation_steps"),
    "batch": ("--per_device_train_batch_size", "--per_device_train_batch_size",
              "finetune.per_device_train_batch_size"),
    "eval_batch": ("--per_device_eval_batch_size", "--per_device_eval_batch_size",
                   "finetune.per_device_eval_batch_size"),
    "lora_dropout": ("--lora_dropout", "--lora_dropout (LoraConfig)", "finetune.lora_dropout"),
    "lora_targets": ("--lora_targets", "target_modules (LoraConfig)", "finetune.lora_targets"),
    "max_train_samples": ("--max-train-samples", "--max_train_samples", "finetune.max_train_samples"),
    "max_eval_samples": ("--max-eval-samples", "--max_eval_samples", "finetune.max_eval_samples"),
    "gradient_checkpointing": ("--gradient_checkpointing", "--gradient_checkpointing",
                               "finetune.gradient_checkpointing"),
    "bf16": ("--bf16", "--bf16", "finetune.bf16"),
    "max_grad_norm": ("--max_grad_norm", "--max_grad_norm", "finetune.max_grad_norm"),
    "warmup_steps": ("--warmup_steps", "--warmup_steps", "finetune.warmup_steps"),
    "eval_strategy": ("--eval_strategy", "--eval_strategy", "finetune.eval_strategy"),
    "eval_steps": ("--eval_steps", "--eval_steps", "finetune.eval_steps"),
    "load_best": ("--load_best_model_at_end", "--load_best_model_at_end", "finetune.load_best_model_at_end"),
    "metric_for_best": ("--metric_for_best_model", "--metric_for_best_model", "finetune.metric_for_best_model"),
}


def flag(setting: str, flavour: str = "prunetune") -> str:
    """How `setting` (a key of the table above) is spelled for the reader."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r}; choose one of {FLAVOURS}")
    return _FLAGS[setting][FLAVOURS.index(flavour)]


def _set(setting: str, value: object, flavour: str) -> str:
    """`--lr 1e-5` / `finetune.lr: 1e-5`."""
    name = flag(setting, flavour)
    return f"{name}: {value}" if flavour == "pipeline" else f"{name} {value}"


def raise_lr(lr: float | None, flavour: str = "prunetune") -> str:
    """The LR is too low (loss falls too slowly)."""
    f = flag("lr", flavour)
    if lr:
        return f"raise {f} from {fmt_lr(lr)} to {fmt_lr(lr * 3)} (up to {fmt_lr(lr * 10)} for LoRA if it stays stable)"
    return f"raise {f} by 3-10x (LoRA recovery usually trains at 1e-4 to 5e-4)"


def lower_lr(lr: float | None, accum: float | None = None, flavour: str = "prunetune") -> str:
    """The LR is too high or the batch too noisy (oscillating or rising loss): 3x lower, or a larger batch."""
    acc = int(accum or 1)
    f = flag("lr", flavour)
    lr_part = f"lower {f} from {fmt_lr(lr)} to {fmt_lr(lr / 3)}" if lr else f"lower {f} by 3x"
    return (f"{lr_part} or raise {flag('accum', flavour)} from {acc} to {acc * 4} (a larger, less noisy batch)")


def nan_lr(lr: float) -> float:
    """The LR to restart a run that went NaN/Inf with: 10x lower."""
    return lr / 10


def lower_lr_after_nan(lr: float | None, flavour: str = "prunetune") -> str:
    """`--lr 1e-5 (10x lower than 1e-4)`: the LR part of every NaN/Inf fix."""
    f = flag("lr", flavour)
    if not lr:
        return f"a 10x lower {f}"
    return f"{_set('lr', fmt_lr(nan_lr(lr)), flavour)} (10x lower than {fmt_lr(lr)})"


def nan_inf(step: int | None, lr: float | None, flavour: str = "prunetune", resume_command: str | None = None) -> str:
    """Training diverged numerically (NaN/Inf loss, grad norm, eval loss or weights)."""
    where = f"step {step}" if step is not None else "the first non-finite value"
    text = (
        f"stop the run: everything after {where} is lost; keep the last checkpoint saved before {where} and "
        f"restart with {lower_lr_after_nan(lr, flavour)}, add warm-up ({flag('warmup_steps', flavour)}) and "
        f"gradient clipping ({_set('max_grad_norm', '1.0', flavour)})"
    )
    if flavour == "trainer":
        text += "; set --logging_nan_inf_filter false, its default hides NaN losses."
    else:
        text += "; in plain Trainer runs set --logging_nan_inf_filter false, its default hides NaN losses."
    return text + (f" Resume with: {resume_command}" if resume_command else "")


def oom_fixes(block_size: float | None = None, batch: float | None = None, accum: float | None = None,
              gradient_checkpointing: bool | None = None, half_precision: bool | None = None,
              flavour: str = "prunetune") -> list[str]:
    """Ways to free memory after an out-of-memory error, most effective first; unknown settings (None) are
    suggested generically, settings already in effect are not suggested again."""
    fixes = []
    if block_size and block_size > 128:
        fixes.append(f"shorter sequences: {_set('block_size', int(block_size) // 2, flavour)}")
    elif not block_size:
        fixes.append(f"shorter sequences: a smaller {flag('block_size', flavour)} (e.g. 512)")
    if not gradient_checkpointing:
        fixes.append(f"recompute activations: {flag('gradient_checkpointing', flavour)}")
    acc = int(accum or 1)
    if batch and batch > 1:
        b = max(1, int(batch) // 2)
        fixes.append(f"smaller batch, same total: {_set('batch', b, flavour)} with "
                     f"{_set('accum', int(acc * batch // b), flavour)}")
    elif batch is None:
        fixes.append(f"{_set('batch', 1, flavour)} (raise {flag('accum', flavour)} to keep the total batch)")
    else:
        fixes.append(f"smaller evaluation batches: {_set('eval_batch', 1, flavour)}")
    if half_precision is False:
        fixes.append(f"half the activation memory: {flag('bf16', flavour)}")
    return fixes


def out_of_memory(block_size: float | None = None, batch: float | None = None, accum: float | None = None,
                  gradient_checkpointing: bool | None = None, half_precision: bool | None = None,
                  flavour: str = "prunetune", resume_command: str | None = None) -> str:
    """The run died of an out-of-memory error: the fixes of `oom_fixes` in one sentence."""
    items = oom_fixes(block_size, batch, accum, gradient_checkpointing, half_precision, flavour)
    return "free memory with " + "; ".join(items) + "." + (f" Resume with: {resume_command}" if resume_command else "")


def _more_dropout(dropout: float | None, flavour: str) -> str:
    f = flag("lora_dropout", flavour)
    if dropout is None:
        return f"raise {f} (e.g. 0.1)"
    return f"raise {f} from {dropout:g} to {min(0.5, max(0.1, dropout * 2)):g}"


def overfitting(dropout: float | None, epochs: float | None, best_step: int | None,
                flavour: str = "prunetune") -> str:
    """Eval loss rises while train loss falls."""
    fewer = (f"train fewer epochs ({_set('epochs', max(1, int(epochs) // 2), flavour)} instead of {epochs:g})"
             if epochs and epochs > 1 else "train fewer steps")
    best = f" (step {best_step})" if best_step is not None else ""
    parts = [
        _more_dropout(dropout, flavour),
        fewer,
        f"or stop early and keep the best checkpoint{best}; {flag('load_best', flavour)} "
        f"{flag('metric_for_best', flavour)} eval_loss",
        f"more training text ({flag('max_train_samples', flavour)}) helps most",
    ]
    return "; ".join(parts) + "."


def eval_far_above_train(dropout: float | None, flavour: str = "prunetune") -> str:
    """Eval loss far above the train loss."""
    data = "--dataset and its eval split" if flavour == "prunetune" else "the train and eval files"
    return (
        f"check that train and eval text come from the same distribution ({data}); if they do, the model "
        f"memorises the train set: {_more_dropout(dropout, flavour)}, use more training text "
        f"({flag('max_train_samples', flavour)}) or fewer epochs ({flag('epochs', flavour)})."
    )


def no_eval(last_step: int, flavour: str = "prunetune") -> str:
    """The run never evaluated."""
    every = max(10, last_step // 10)
    return (f"evaluate during training: {_set('eval_strategy', 'steps', flavour)} {_set('eval_steps', every, flavour)} "
            f"(and {_set('max_eval_samples', 128, flavour)} to keep it quick).")


def check_setup(flavour: str = "prunetune") -> str:
    """The checks for a model that does not learn at all."""
    return (
        "check the data and configuration: labels not all -100/padding, trainable parameters > 0 "
        f"(LoRA {flag('lora_targets', flavour)} match the model), {flag('lr', flavour)} not 0, the dataset not a "
        "repeated/empty text"
    )


def flat(lr: float | None, flavour: str = "prunetune") -> str:
    """The loss does not move."""
    return f"{check_setup(flavour)}; then {raise_lr(lr, flavour)} if all of that is right."


def frozen(lr: float | None, flavour: str = "prunetune") -> str:
    """Identical losses or zero gradients: the weights no longer change."""
    text = (
        "the weights no longer change: check that parameters are trainable (LoRA "
        f"{flag('lora_targets', flavour)} match the model), the labels are not all masked, and the LR is sane"
    )
    if lr and lr >= 0.1:
        text += (f" ({_set('lr', fmt_lr(lr), flavour)}: an absurd LR saturates the network; restart from the last "
                 f"good checkpoint with {_set('lr', fmt_lr(lr / 1000), flavour)} or lower)")
    return text + "."


def diverging(lr: float | None, accum: float | None = None, flavour: str = "prunetune") -> str:
    """The loss rises: lower the LR, clip, warm up."""
    return f"{lower_lr(lr, accum, flavour)}; add {_set('max_grad_norm', '1.0', flavour)} and warm-up."
