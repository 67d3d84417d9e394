"""`prunetune finetune`: flags from `FinetuneConfig`, then `engine.run_finetune`.

Flags take either spelling (`--block-size` / `--block_size`), and the TrainingArguments flags users already
type are accepted (`--learning_rate`, `--evaluation_strategy`, `--num_train_epochs`, `--warmup_ratio`).
Precedence: built-in defaults < `--config run.yaml` < flags on the command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from prunetune import configfile
from prunetune.analysis.thresholds import parse_threshold_flags
from prunetune.commands import flags
from prunetune.commands.flags import Flag
from prunetune.finetune.config import (
    DISTILL_MODES,
    DTYPES,
    EVAL_STRATEGIES,
    SAVE_STRATEGIES,
    FinetuneConfig,
)
from prunetune.recovery import registry as recovery_methods

EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 1

FLAGS = {
    "pruned": Flag(metavar="DIR"),
    "out": Flag(metavar="DIR"),
    "data_dir": Flag(metavar="DIR"),
    "eval_strategy": Flag(choices=EVAL_STRATEGIES),
    "save_strategy": Flag(choices=SAVE_STRATEGIES),
    "device": Flag(choices=("cpu", "cuda")),
    "lora_targets": Flag(metavar="LIST"),
    "report_to": Flag(metavar="TRACKER"),
    "teacher": Flag(metavar="MODEL"),
    "resume_from_checkpoint": Flag(nargs="?", const="auto", metavar="auto|DIR"),
    "distill": Flag(nargs="?", const="logits", choices=DISTILL_MODES),  # a bare --distill: logits, as before
    "method": Flag(choices=(recovery_methods.AUTO, *recovery_methods.names())),
    "dtype": Flag(choices=DTYPES),
}
# Help sections, in the order a user reads them; fields not listed land under "run".
GROUPS = {
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "Trainer (TrainingArguments spellings accepted)": (
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_steps",
        "max_train_minutes", "logging_steps", "logging_first_step", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
        "save_total_limit", "load_best_model_at_end", "metric_for_best_model", "gradient_checkpointing", "bf16",
        "fp16", "warmup_steps", "lr_scheduler_type", "weight_decay", "max_grad_norm", "seed",
        "dataloader_num_workers", "report_to", "resume_from_checkpoint",
    ),
    "distillation": ("distill", "distill_alpha", "distill_temperature", "teacher"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Recover a pruned model with LoRA while watching every signal: a live console (kept in OUT/train.log), "
        "metrics.jsonl, evaluations with perplexity, checkpoints, alerts, exact resume."
    )
    flags.add_config_file_flag(parser)
    flags.add_config_flags(parser, FinetuneConfig, flags=FLAGS, groups=GROUPS, skip=("alert_thresholds",))
    parser.add_argument("--alert-threshold", "--alert_threshold", dest="alert_threshold_flags", action="append",
                        metavar="NAME=VALUE", help="override a live-alert threshold (prunetune.analysis.rules)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    extra: dict[str, Any] = {}
    if args.alert_threshold_flags:
        from_file: dict[str, Any] = {}
        if args.config:
            data = configfile.settings_of(configfile.read_mapping(args.config), "finetune")
            from_file = configfile.read_layer(FinetuneConfig, data, f"--config {args.config}").get("alert_thresholds") or {}
        extra["alert_thresholds"] = {**from_file, **parse_threshold_flags(args.alert_threshold_flags, "--alert-threshold")}
    return flags.config_from_args(FinetuneConfig, args, command="finetune", extra=extra)


def main(args: argparse.Namespace) -> int:
    from prunetune.finetune.engine import run_finetune

    result = run_finetune(config_from_args(args))
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    if result["status"] == "diverged":
        return EXIT_DIVERGED
    return 0
