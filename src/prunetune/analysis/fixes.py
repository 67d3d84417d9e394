"""The one text of each fix, in the reader's terms, quoting only facts.

Every place that tells a user what to change (the offline rules of `report`, the live alerts and stop
messages of `finetune`, the pipeline's stage errors) phrases it through these functions, so "lower the LR"
reads the same everywhere and names the flags of the tool that produced the run:

- `prunetune`: the flags of `prunetune finetune` (`--lr`, `--epochs`, `--block-size`, ...);
- `trainer`:   Transformers `TrainingArguments` / PEFT `LoraConfig` names as the example scripts take them
               (`--learning_rate`, `--num_train_epochs`, `--lora_dropout`, ...): the reader of a foreign log;
- `pipeline`:  the keys of a `prunetune run` YAML (`finetune.lr`, ...).

A fix quotes a current value ("from 5e-3 to 1.7e-3") only when the `FixContext` (or the log, through the rule)
states it, and says so when it is unknown; LoRA advice only for runs that may train LoRA. Each `Fix` lists the
facts it rests on (`basis`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunetune.analysis.context import Fact, FixContext
from prunetune.fmt import fmt_lr

FLAVOURS: tuple[str, ...] = ("prunetune", "trainer", "pipeline")

# setting -> its spelling per flavour (prunetune, trainer, pipeline)
_FLAGS: dict[str, tuple[str, str, str]] = {
    "lr": ("--lr", "--learning_rate", "finetune.lr"),
    "epochs": ("--epochs", "--num_train_epochs", "finetune.epochs"),
    "block_size": ("--block-size", "--block_size / max_seq_length", "finetune.block_size"),
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
    "fp16": ("--fp16", "--fp16", "finetune.fp16"),
    "max_grad_norm": ("--max_grad_norm", "--max_grad_norm", "finetune.max_grad_norm"),
    "warmup_steps": ("--warmup_steps", "--warmup_steps", "finetune.warmup_steps"),
    "eval_strategy": ("--eval_strategy", "--eval_strategy", "finetune.eval_strategy"),
    "eval_steps": ("--eval_steps", "--eval_steps", "finetune.eval_steps"),
    "load_best": ("--load_best_model_at_end", "--load_best_model_at_end", "finetune.load_best_model_at_end"),
    "metric_for_best": ("--metric_for_best_model", "--metric_for_best_model", "finetune.metric_for_best_model"),
    "weight_decay": ("--weight_decay", "--weight_decay", "finetune.weight_decay"),
}


@dataclass(frozen=True)
class Fix:
    """What to change, and the facts it rests on."""

    text: str
    basis: tuple[str, ...] = ()
    """Each fact the text quotes or relies on, with where it came from."""


def flag(setting: str, flavour: str = "prunetune") -> str:
    """How `setting` (a key of the table above) is spelled for the reader."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r}; choose one of {FLAVOURS}")
    return _FLAGS[setting][FLAVOURS.index(flavour)]


def _set(setting: str, value: object, flavour: str) -> str:
    """`--lr 1e-5` / `finetune.lr: 1e-5`."""
    name = flag(setting, flavour)
    return f"{name}: {value}" if flavour == "pipeline" else f"{name} {value}"


def _unknown(ctx: FixContext) -> str:
    return "its current value is not in the run's records" if ctx.flavour != "trainer" else \
        "its current value is not in the log"


def stated(name: str, fact: Fact | None, fmt=str) -> str | None:
    """`learning rate 5e-3 (the TrainingArguments(...) dump in the log)`: one line of a fix's basis."""
    return None if fact is None else f"{name} {fmt(fact.value)} ({fact.origin})"


def _basis(*items: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


def _lr_fact(ctx: FixContext, lr: Fact | None) -> Fact | None:
    return lr if lr is not None else ctx.lr


# ---------------------------------------------------------------------------------------------------------
# The learning rate


def raise_lr(ctx: FixContext, lr: Fact | None = None) -> Fix:
    """The LR is too low (loss falls too slowly)."""
    lr = _lr_fact(ctx, lr)
    f = flag("lr", ctx.flavour)
    if lr is None:
        return Fix(f"raise {f} 3-10x ({_unknown(ctx)}; LoRA recovery usually trains at 1e-4 to 5e-4)"
                   if ctx.value("adapter") is not False else f"raise {f} 3-10x ({_unknown(ctx)})")
    up = f" (up to {fmt_lr(lr.value * 10)} for LoRA if it stays stable)" if ctx.value("adapter") else \
        f" (up to {fmt_lr(lr.value * 10)} if it stays stable)"
    return Fix(f"raise {f} from {fmt_lr(lr.value)} to {fmt_lr(lr.value * 3)}{up}",
               _basis(stated("learning rate", lr, fmt_lr)))


def _bigger_batch(ctx: FixContext) -> tuple[str, str | None]:
    accum = ctx.gradient_accumulation_steps
    f = flag("accum", ctx.flavour)
    if accum is None:
        return f"raise {f} 4x (a larger, less noisy batch; {_unknown(ctx)})", None
    return (f"raise {f} from {accum.value} to {accum.value * 4} (a larger, less noisy batch)",
            stated("gradient_accumulation_steps", accum))


def lower_lr(ctx: FixContext, lr: Fact | None = None) -> Fix:
    """The LR is too high or the batch too noisy (oscillating loss): 3x lower, or a larger batch."""
    lr = _lr_fact(ctx, lr)
    f = flag("lr", ctx.flavour)
    lr_part = f"lower {f} from {fmt_lr(lr.value)} to {fmt_lr(lr.value / 3)}" if lr else \
        f"lower {f} 3x ({_unknown(ctx)})"
    batch, accum = _bigger_batch(ctx)
    return Fix(f"{lr_part} or {batch}", _basis(stated("learning rate", lr, fmt_lr), accum))


def diverging(ctx: FixContext, lr: Fact | None = None, warmup_seen: str | None = None) -> Fix:
    """The loss rises or blew up: lower the LR; clipping and warm-up where the run has none."""
    base = lower_lr(ctx, lr)
    parts, basis = [base.text], list(base.basis)
    clip = ctx.max_grad_norm
    if clip is None or not clip.value:
        parts.append(f"clip gradients ({_set('max_grad_norm', '1.0', ctx.flavour)})"
                     + (f": {stated('max_grad_norm', clip)}" if clip is not None else ""))
    else:
        basis.append(stated("max_grad_norm", clip) or "")
    if warmup_seen:
        basis.append(warmup_seen)
    elif ctx.warmup:
        basis.append(stated("warm-up", ctx.warmup_steps if ctx.value("warmup_steps") else ctx.warmup_ratio) or "")
    else:
        parts.append(f"warm the LR up ({flag('warmup_steps', ctx.flavour)}; the log shows no warm-up)")
    return Fix("; ".join(parts) + ".", _basis(*basis))


def nan_lr(lr: float) -> float:
    """The LR to restart a run that went NaN/Inf with: 10x lower."""
    return lr / 10


def lower_lr_after_nan(lr: float | None, flavour: str = "prunetune") -> str:
    """`--lr 1e-5 (10x lower than 1e-4)`: the LR part of every NaN/Inf fix."""
    f = flag("lr", flavour)
    if not lr:
        return f"a 10x lower {f}"
    return f"{_set('lr', fmt_lr(nan_lr(lr)), flavour)} (10x lower than {fmt_lr(lr)})"


# ---------------------------------------------------------------------------------------------------------
# Numerical divergence, memory


def nan_inf(ctx: FixContext, step: int | None = None, lr: Fact | None = None, fp16_signs: tuple[str, ...] = ()) -> Fix:
    """Training diverged numerically (NaN/Inf loss, grad norm, eval loss or weights). `fp16_signs`: the facts
    that point at an fp16 overflow (a loss of exactly 0.0 beside NaN gradients, fp16 precision, loss-scale
    messages): then the precision is the first fix, not the LR."""
    lr = _lr_fact(ctx, lr)
    where = f"step {step}" if step is not None else "the first non-finite value"
    keep = f"restart from the last checkpoint saved before {where}"
    lr_part = lower_lr_after_nan(lr.value if lr else None, ctx.flavour)
    basis = [*fp16_signs, stated("learning rate", lr, fmt_lr)]
    if fp16_signs:
        text = (f"{keep} in bf16 ({flag('bf16', ctx.flavour)} instead of {flag('fp16', ctx.flavour)}, on GPUs that "
                f"have it; else fp32): fp16 overflows where bf16 does not, at the same LR; if it still diverges, "
                f"{lr_part}")
    else:
        text = f"{keep} with {lr_part}"
        clip = ctx.max_grad_norm
        if clip is None or not clip.value:
            text += f" and gradient clipping ({_set('max_grad_norm', '1.0', ctx.flavour)})"
        if not ctx.warmup:
            text += f", warm-up ({flag('warmup_steps', ctx.flavour)})"
    if ctx.flavour == "trainer":
        text += "; set --logging_nan_inf_filter false: its default hides NaN losses"
    text += "."
    if ctx.resume_command:
        text += f" Resume with: {ctx.resume_command}"
    return Fix(text, _basis(*basis))


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


def out_of_memory(ctx: FixContext, step: int | None = None, ran_steps: bool = False,
                  during_eval: bool = False) -> Fix:
    """The run died of an out-of-memory error. At its start (nothing fits): the memory levers in order. After
    steps that fit (`ran_steps`): what grows during a run, the evaluation's batch first when it died there."""
    f = ctx.flavour
    v = ctx.value
    basis = [stated("block size", ctx.block_size), stated("per-device batch", ctx.per_device_train_batch_size),
             stated("gradient_accumulation_steps", ctx.gradient_accumulation_steps),
             stated("gradient checkpointing", ctx.gradient_checkpointing), stated("precision", ctx.precision)]
    if during_eval:
        text = (f"the evaluation ran out of memory after training steps that fit: {_set('eval_batch', 1, f)}"
                + ("" if f == "prunetune" else " and --eval_accumulation_steps 1")
                + f" (or fewer eval samples, {flag('max_eval_samples', f)})")
    elif ran_steps:
        text = (f"the first {step} steps fit, so one longer batch or memory that grew ran out: cap the sequence "
                f"length ({flag('block_size', f)}"
                + (f", now {v('block_size')}" if v("block_size") else "") + "), set "
                "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation"
                + ("" if v("gradient_checkpointing") else f", {flag('gradient_checkpointing', f)}")
                + f", or a smaller {flag('batch', f)} with more {flag('accum', f)}")
    else:
        half = None if v("precision") is None else v("precision") in ("bf16", "fp16")
        items = oom_fixes(v("block_size"), v("per_device_train_batch_size"), v("gradient_accumulation_steps"),
                          v("gradient_checkpointing"), half, f)
        text = "free memory with " + "; ".join(items)
    text += "." + (f" Resume with: {ctx.resume_command}" if ctx.resume_command else "")
    return Fix(text, _basis(*basis))


# ---------------------------------------------------------------------------------------------------------
# Overfitting and evaluation


def _regularise(ctx: FixContext) -> tuple[str, str | None]:
    """More dropout: LoRA's when the run trains LoRA, else the model's regularisation."""
    adapter = ctx.value("adapter")
    f = flag("lora_dropout", ctx.flavour)
    if adapter is False:
        wd = ctx.weight_decay
        text = (f"raise {flag('weight_decay', ctx.flavour)} from {wd.value:g}" if wd is not None else
                f"more regularisation ({flag('weight_decay', ctx.flavour)}, dropout)")
        return text, stated("weight_decay", wd) or stated("training method", ctx.method or ctx.adapter)
    dropout = ctx.lora_dropout
    if adapter and dropout is not None:
        new = min(0.5, max(0.1, dropout.value * 2))
        return f"raise {f} from {dropout.value:g} to {new:g}", stated("lora_dropout", dropout)
    if adapter:
        return f"raise {f} (e.g. 0.1; {_unknown(ctx)})", stated("LoRA adapter", ctx.adapter)
    return f"more dropout ({f} if this is a LoRA run)", None


def overfitting(ctx: FixContext, best_step: int | None = None) -> Fix:
    """Eval loss rises while train loss falls (or the train loss converged near zero)."""
    f = ctx.flavour
    epochs = ctx.epochs
    reg, reg_basis = _regularise(ctx)
    fewer = (f"train fewer epochs ({_set('epochs', max(1, int(epochs.value) // 2), f)} instead of "
             f"{epochs.value:g})" if epochs is not None and epochs.value > 1 else "train fewer steps")
    best = f" (step {best_step})" if best_step is not None else ""
    if ctx.value("load_best_model_at_end"):
        keep = f"keep the best checkpoint{best}: {flag('load_best', f)} is on, so it is the one kept"
    else:
        keep = (f"stop early and keep the best checkpoint{best}: {flag('load_best', f)} "
                f"{flag('metric_for_best', f)} eval_loss")
    parts = [reg, fewer, keep, f"more training text ({flag('max_train_samples', f)}) helps most"]
    return Fix("; ".join(parts) + ".", _basis(reg_basis, stated("epochs", epochs),
                                             stated("load_best_model_at_end", ctx.load_best_model_at_end)))


def eval_far_above_train(ctx: FixContext) -> Fix:
    """Eval loss far above the train loss."""
    data = "--dataset and its eval split" if ctx.flavour == "prunetune" else "the train and eval files"
    reg, reg_basis = _regularise(ctx)
    return Fix(
        f"check that train and eval text come from the same distribution ({data}); if they do, the model "
        f"memorises the train set: {reg}, use more training text ({flag('max_train_samples', ctx.flavour)}) or "
        f"fewer epochs ({flag('epochs', ctx.flavour)}).", _basis(reg_basis))


def no_eval(ctx: FixContext, last_step: int) -> Fix:
    """The run never evaluated."""
    f = ctx.flavour
    every = max(10, last_step // 10)
    why = stated("eval_strategy", ctx.eval_strategy)
    return Fix(f"evaluate during training: {_set('eval_strategy', 'steps', f)} {_set('eval_steps', every, f)} "
               f"(and {_set('max_eval_samples', 128, f)} to keep it quick).", _basis(why))


# ---------------------------------------------------------------------------------------------------------
# A model that does not learn


def check_setup(ctx: FixContext) -> str:
    """The checks for a model that does not learn at all."""
    f = ctx.flavour
    targets = f" (LoRA {flag('lora_targets', f)} match the model)" if ctx.value("adapter") is not False else ""
    return (f"check the data and configuration: labels not all -100/padding, trainable parameters > 0{targets}, "
            f"{flag('lr', f)} not 0, the dataset not a repeated/empty text")


def flat(ctx: FixContext, lr: Fact | None = None) -> Fix:
    """The loss does not move."""
    up = raise_lr(ctx, lr)
    return Fix(f"{check_setup(ctx)}; then {up.text} if all of that is right.", up.basis)


def frozen(ctx: FixContext, lr: Fact | None = None) -> Fix:
    """Identical losses or zero gradients: the weights no longer change."""
    lr = _lr_fact(ctx, lr)
    targets = f" (LoRA {flag('lora_targets', ctx.flavour)} match the model)" if ctx.value("adapter") is not False else ""
    text = (f"the weights no longer change: check that parameters are trainable{targets}, the labels are not all "
            "masked, and the LR is sane")
    if lr is not None and lr.value >= 0.1:
        text += (f" ({_set('lr', fmt_lr(lr.value), ctx.flavour)}: an absurd LR saturates the network; restart from "
                 f"the last good checkpoint with {_set('lr', fmt_lr(lr.value / 1000), ctx.flavour)} or lower)")
    return Fix(text + ".", _basis(stated("learning rate", lr, fmt_lr)))
