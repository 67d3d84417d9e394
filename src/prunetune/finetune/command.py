"""`prunetune finetune`: LoRA recovery fine-tuning of a pruned model with the live training console.

Flags take either spelling (`--block-size` / `--block_size`), and the TrainingArguments flags users
already type are accepted (`--evaluation_strategy` is the old name of `--eval_strategy`).
Precedence: built-in defaults < `--config run.yaml` < flags on the command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from prunetune.analysis.thresholds import parse_threshold_flags
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig, load_config_file, normalize_mapping

EXIT_INTERRUPTED = 130
EXIT_DIVERGED = 1


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _steps(text: str) -> int:
    # Transformers accepts 500.0-style values; a fraction of training is not supported here.
    value = float(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}")
    return int(value)


def _flag(parser: argparse._ActionsContainer, name: str, **kwargs: Any) -> None:
    """One option under both spellings; default None so an unset flag never overrides --config."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    if kwargs.get("type") is _bool:
        kwargs.setdefault("nargs", "?")
        kwargs.setdefault("const", True)
        kwargs.setdefault("metavar", "BOOL")
    parser.add_argument(*sorted(spellings, key=lambda s: "_" in s), dest=name, default=None, **kwargs)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Recover a pruned model with LoRA while watching every signal: a live console (kept in OUT/train.log), "
        "metrics.jsonl, evaluations with perplexity, checkpoints, alerts, exact resume."
    )
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="settings file (same keys as the flags); flags given here override it")
    run = parser.add_argument_group("run")
    _flag(run, "pruned", metavar="DIR", help="a `prunetune prune` output directory (or any model directory)")
    _flag(run, "out", metavar="DIR", help="run directory for logs, checkpoints and the adapter")
    _flag(run, "dataset", help="wikitext2 | c4 | wikipedia-vital | path to a text/jsonl file (default wikitext2)")
    _flag(run, "data_dir", metavar="DIR", help="local copies of the corpora (default $PRUNETUNE_DATA_DIR)")
    _flag(run, "block_size", type=int, help="tokens per sequence (default 1024)")
    _flag(run, "epochs", type=float, help="training epochs (default 1)")
    run.add_argument("--num_train_epochs", "--num-train-epochs", dest="epochs", type=float, help=argparse.SUPPRESS)
    _flag(run, "lr", type=float, help="learning rate (default 1e-4)")
    run.add_argument("--learning_rate", "--learning-rate", dest="lr", type=float, help=argparse.SUPPRESS)
    _flag(run, "max_train_samples", type=int, metavar="N", help="first N grouped training sequences (default all)")
    _flag(run, "max_eval_samples", type=int, metavar="N", help="first N grouped eval sequences (default 128)")
    _flag(run, "overwrite", type=_bool, help="replace an existing run in --out")
    _flag(run, "device", choices=["cpu", "cuda"], help="default: cuda when available")
    _flag(run, "probe_steps", type=int, metavar="N", help="timed forward+backward passes for the time estimate (default 2)")
    lora = parser.add_argument_group("LoRA")
    _flag(lora, "lora_r", type=int, help="rank (default 8)")
    _flag(lora, "lora_alpha", type=int, help="alpha (default 16)")
    _flag(lora, "lora_dropout", type=float, help="dropout (default 0.05)")
    _flag(lora, "lora_targets", metavar="LIST", help="module types, comma-separated, or all-linear (default q_proj,v_proj)")
    ta = parser.add_argument_group("Trainer (TrainingArguments spellings accepted)")
    _flag(ta, "per_device_train_batch_size", type=int, help="default 1")
    _flag(ta, "per_device_eval_batch_size", type=int, help="default 8")
    _flag(ta, "gradient_accumulation_steps", type=int, help="default 1")
    _flag(ta, "max_steps", type=int, help="stop after N optimizer steps (default -1: use --epochs)")
    _flag(ta, "logging_steps", type=_steps, help="step line every N steps (default 10)")
    _flag(ta, "logging_first_step", type=_bool, help="also log step 1 (default true)")
    _flag(ta, "eval_strategy", choices=["no", "steps", "epoch"], help="default steps")
    ta.add_argument("--evaluation_strategy", "--evaluation-strategy", dest="eval_strategy",
                    choices=["no", "steps", "epoch"], help="old name of --eval_strategy")
    _flag(ta, "eval_steps", type=_steps, help="evaluate every N steps (default 200)")
    _flag(ta, "save_strategy", choices=["no", "steps", "epoch"], help="default steps")
    _flag(ta, "save_steps", type=_steps, help="checkpoint every N steps (default 500; new bests are saved too)")
    _flag(ta, "save_total_limit", type=int, help="keep at most N checkpoints (the best is kept)")
    _flag(ta, "load_best_model_at_end", type=_bool, help="load the best checkpoint before the final eval (default true)")
    _flag(ta, "metric_for_best_model", help="eval_loss (default)")
    _flag(ta, "gradient_checkpointing", type=_bool, help="less memory, slower")
    _flag(ta, "bf16", type=_bool, help="bfloat16 mixed precision (CPU: autocast)")
    _flag(ta, "fp16", type=_bool, help="float16 mixed precision (CUDA)")
    _flag(ta, "warmup_steps", type=float, help="warmup steps, or a fraction of all steps when < 1")
    ta.add_argument("--warmup_ratio", "--warmup-ratio", dest="warmup_steps", type=float, help="fraction of steps")
    _flag(ta, "lr_scheduler_type", help="linear (default), cosine, constant, ...")
    _flag(ta, "weight_decay", type=float, help="default 0")
    _flag(ta, "max_grad_norm", type=float, help="gradient clipping (default 1.0)")
    _flag(ta, "seed", type=int, help="default 42")
    _flag(ta, "dataloader_num_workers", type=int, help="default 0")
    _flag(ta, "report_to", nargs="+", metavar="TRACKER", help="none (default), tensorboard, wandb, ...")
    _flag(ta, "resume_from_checkpoint", nargs="?", const="auto", metavar="auto|DIR",
          help="continue the run in --out from its latest checkpoint (auto) or from DIR")
    kd = parser.add_argument_group("distillation")
    _flag(kd, "distill", type=_bool, help="add KL(teacher||student) from the dense model")
    _flag(kd, "distill_alpha", type=float, help="weight of the KL term (default 0.5)")
    _flag(kd, "distill_temperature", type=float, help="temperature (default 2.0)")
    _flag(kd, "teacher", metavar="MODEL", help="teacher model (default: prune.json's model)")
    parser.add_argument("--alert-threshold", "--alert_threshold", dest="alert_thresholds", action="append",
                        metavar="NAME=VALUE", help="override a live-alert threshold (prunetune.analysis.rules)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "alert_thresholds")}
    if isinstance(flags.get("report_to"), list):
        flags["report_to"] = ",".join(flags["report_to"])
    if args.alert_thresholds:
        flags["alert_thresholds"] = {**values.get("alert_thresholds", {}), **parse_threshold_flags(args.alert_thresholds, "--alert-threshold")}
    values.update(normalize_mapping(flags, "command line"))
    for key, flag in (("pruned", "--pruned DIR"), ("out", "--out DIR")):
        if not values.get(key):
            raise UserError(f"{flag} is required (on the command line or in --config)")
    try:
        return FinetuneConfig(**values)
    except TypeError as err:
        raise UserError(f"bad setting: {err}") from None


def main(args: argparse.Namespace) -> int:
    from prunetune.finetune.engine import run_finetune

    result = run_finetune(config_from_args(args))
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    if result["status"] == "diverged":
        return EXIT_DIVERGED
    return 0
