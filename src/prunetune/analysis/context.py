"""The run's settings that turn a diagnosis into advice (`FixContext`), each value with where it came from, built by
one function (`fix_context`) for the live alerts of `finetune` and for `report`.

A fix may quote a value ("lower --learning_rate from 5e-3 ...") only when the context has it, and it names the
origin beside it; a value no source states stays None and the fix says it is unknown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from prunetune.fmt import to_float


@dataclass(frozen=True)
class Fact:
    """One setting of the run and where it was read."""

    value: Any
    origin: str
    """`run_config.json`, `the TrainingArguments(...) dump in the log`, `trainer_state.json`, ..."""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "origin": self.origin}


@dataclass(frozen=True)
class FixContext:
    """What the fixes may quote about the run. Every field is a `Fact` or None (not stated anywhere)."""

    lr: Fact | None = None
    """The configured (peak) learning rate."""
    per_device_train_batch_size: Fact | None = None
    gradient_accumulation_steps: Fact | None = None
    block_size: Fact | None = None
    """Tokens per training sequence (block_size, cutoff_len, max_seq_length, sequence_len)."""
    method: Fact | None = None
    """How the model trains: lora, masked-lora, qlora, dora, sparse-ft, full, freeze."""
    adapter: Fact | None = None
    """True when the run trains a LoRA (PEFT) adapter, False when it provably trains the model's own weights."""
    lora_dropout: Fact | None = None
    precision: Fact | None = None
    """fp16, bf16, fp32, or `no-amp` (neither fp16 nor bf16 mixed precision asked for)."""
    epochs: Fact | None = None
    max_steps: Fact | None = None
    eval_strategy: Fact | None = None
    eval_steps: Fact | None = None
    logging_steps: Fact | None = None
    warmup_steps: Fact | None = None
    warmup_ratio: Fact | None = None
    max_grad_norm: Fact | None = None
    gradient_checkpointing: Fact | None = None
    load_best_model_at_end: Fact | None = None
    weight_decay: Fact | None = None
    resume_command: str | None = None
    """The exact command that resumes the run (prunetune's own runs)."""
    flavour: str = "prunetune"
    """Whose flags the fixes name (`prunetune.analysis.fixes.FLAVOURS`)."""

    def value(self, name: str) -> Any:
        fact = getattr(self, name)
        return fact.value if isinstance(fact, Fact) else None

    @property
    def eval_every(self) -> int | None:
        """Steps between evaluations when the run evaluates by steps."""
        strategy = self.value("eval_strategy")
        return self.value("eval_steps") if strategy in (None, "steps") else None

    @property
    def warmup(self) -> bool | None:
        """Whether the configuration asks for a warm-up (None: not stated)."""
        steps, ratio = self.value("warmup_steps"), self.value("warmup_ratio")
        if steps is None and ratio is None:
            return None
        return bool(steps) or bool(ratio)

    def to_dict(self) -> dict[str, Any]:
        """report.json's `context`: every known setting with its origin."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Fact):
                out[f.name] = value.to_dict()
            elif value is not None and f.name != "flavour":
                out[f.name] = value
        out["flavour"] = self.flavour
        return out


# setting -> the keys that spell it in prunetune's run_config.json, TrainingArguments / TRL configs, LLaMA-Factory,
# axolotl, PEFT's adapter_config.json and trainer_state.json, first match wins
KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning_rate"),
    "per_device_train_batch_size": ("per_device_train_batch_size", "micro_batch_size", "train_batch_size",
                                    "batch_size"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "accumulation", "grad_accum"),
    "block_size": ("block_size", "cutoff_len", "max_seq_length", "sequence_len", "max_length", "seqlen"),
    "method": ("method", "finetuning_type", "adapter", "peft_type"),
    "lora_dropout": ("lora_dropout",),
    "epochs": ("epochs", "num_train_epochs", "num_epochs"),
    "max_steps": ("max_steps",),
    "eval_strategy": ("eval_strategy", "evaluation_strategy"),
    "eval_steps": ("eval_steps",),
    "logging_steps": ("logging_steps",),
    "warmup_steps": ("warmup_steps",),
    "warmup_ratio": ("warmup_ratio",),
    "max_grad_norm": ("max_grad_norm", "max_norm", "gradient_clipping"),
    "gradient_checkpointing": ("gradient_checkpointing",),
    "load_best_model_at_end": ("load_best_model_at_end",),
    "weight_decay": ("weight_decay",),
}
_POSITIVE = {"lr", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size", "epochs",
             "max_steps", "eval_steps", "logging_steps"}
_NON_NEGATIVE = {"lora_dropout", "warmup_steps", "warmup_ratio", "max_grad_norm", "weight_decay"}
_INTEGER = {"per_device_train_batch_size", "gradient_accumulation_steps", "block_size", "max_steps", "eval_steps",
            "logging_steps"}
_BOOLEAN = {"gradient_checkpointing", "load_best_model_at_end"}
# how logs spell a training method: LLaMA-Factory's finetuning_type, axolotl's adapter, PEFT's peft_type,
# prunetune's --method. An adapter method trains LoRA weights; the others train the model's own weights.
_ADAPTER_METHOD = re.compile(r"lora|dora|pissa|adapter|peft", re.IGNORECASE)
_OWN_WEIGHTS_METHOD = re.compile(r"full|freeze|sparse|none", re.IGNORECASE)


_SKIP_SECTIONS = {"pruned", "provenance", "teacher", "distill", "dataset", "data", "model", "prune"}
"""Nested sections that describe something else than the training run (run_config.json's `pruned` is the
prune.json of the model: its `method` is the pruning method, its `seqlen` the calibration length)."""


def _flatten(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping's own values, then those of its nested sections one level down (run_config.json's `config`
    and `precision`, a `lora:` section); the outer level wins."""
    flat = {str(k): v for k, v in mapping.items() if not isinstance(v, Mapping)}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and str(key) not in _SKIP_SECTIONS:
            for k2, v2 in value.items():
                if not isinstance(v2, Mapping):
                    flat.setdefault(str(k2), v2)
    return flat


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    return True if text == "true" else False if text == "false" else None


def _valid(name: str, value: Any) -> Any:
    """`value` as the setting's type, or None when it is not a sane value of it."""
    if value is None or isinstance(value, (list, tuple, Mapping)):
        return None
    if name in _BOOLEAN:
        return _bool(value)
    if name in ("method", "eval_strategy"):
        text = str(value).strip().lower()
        text = text.rsplit(".", 1)[-1]  # IntervalStrategy.STEPS
        return text or None
    number = to_float(value) if not isinstance(value, bool) else None
    if number is None or not math.isfinite(number):
        return None
    if (name in _POSITIVE and number <= 0) or (name in _NON_NEGATIVE and number < 0):
        return None
    if name in _INTEGER:
        return int(number) if number.is_integer() else None
    return number


def _precision(flat: Mapping[str, Any]) -> str | None:
    """fp16 / bf16 / fp32 / no-amp from the keys a config states precision with."""
    for key in ("precision", "mixed_precision", "dtype", "torch_dtype", "bnb_4bit_compute_dtype"):
        text = str(flat.get(key) or "").lower().removeprefix("torch.")
        for name, spellings in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16", "float16", "half")),
                                ("fp32", ("fp32", "float32"))):
            if text in spellings:
                return name
    fp16, bf16 = _bool(flat.get("fp16")), _bool(flat.get("bf16"))
    if fp16:
        return "fp16"
    if bf16:
        return "bf16"
    return "no-amp" if fp16 is False and bf16 is False else None


def _adapter(flat: Mapping[str, Any], method: str | None) -> bool | None:
    if method is not None:
        if _ADAPTER_METHOD.search(method):
            return True
        if _OWN_WEIGHTS_METHOD.search(method):
            return False
    if flat.get("peft") is True or any(flat.get(k) is not None for k in ("lora_r", "lora_rank", "lora_dropout")):
        return True
    return None


def fix_context(settings: Sequence[tuple[str, Mapping[str, Any]]], flavour: str = "prunetune",
                resume_command: str | None = None) -> FixContext:
    """The FixContext of a run from its settings, most trusted first: [(origin, mapping)] where a mapping is a
    run_config.json, a TrainingArguments dump, a trainer_state.json's fields, ... (one level of nesting is
    read). Each setting comes from the first source that states a sane value for it."""
    found: dict[str, Fact] = {}
    for origin, mapping in settings:
        if not isinstance(mapping, Mapping):
            continue
        flat = _flatten(mapping)
        for name, keys in KEYS.items():
            if name in found:
                continue
            for key in keys:
                value = _valid(name, flat.get(key))
                if value is not None:
                    if name == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
                        found.setdefault("warmup_ratio", Fact(value, origin))  # a fraction of the steps
                        break
                    found[name] = Fact(value, origin)
                    break
        if "precision" not in found and (precision := _precision(flat)) is not None:
            found["precision"] = Fact(precision, origin)
        if "adapter" not in found:
            method = found["method"].value if "method" in found and found["method"].origin == origin else None
            if (adapter := _adapter(flat, method)) is not None:
                found["adapter"] = Fact(adapter, origin)
    if "adapter" not in found and "method" in found and (adapter := _adapter({}, found["method"].value)) is not None:
        found["adapter"] = Fact(adapter, found["method"].origin)
    return FixContext(**found, resume_command=resume_command, flavour=flavour)
