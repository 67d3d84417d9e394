"""`prunetune finetune` settings: both flag spellings, TrainingArguments names, --config YAML with CLI
precedence, validation messages; and the run_clm grouping of the data."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from prunetune.commands.finetune import config_from_args, configure_parser
from prunetune.data import windows_of
from prunetune.errors import UserError
from prunetune.finetune.config import FinetuneConfig, config_from_mapping
from prunetune.finetune.data import BlockDataset


def parse(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_follow_the_recipe():
    cfg = parse(["--pruned", "p", "--out", "o"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (8, 16, 0.05, ("q_proj", "v_proj"))
    assert (cfg.lr, cfg.block_size, cfg.epochs) == (1e-4, 1024, 1.0)
    assert (cfg.logging_steps, cfg.eval_steps, cfg.save_steps) == (10, 200, 500)
    assert cfg.load_best_model_at_end and cfg.metric_for_best_model == "eval_loss"


def test_trainingarguments_flags_in_both_spellings():
    cfg = parse([
        "--pruned", "p", "--out", "o", "--block_size", "256", "--max-train-samples", "10",
        "--logging_steps", "5", "--eval-steps", "50", "--save_steps", "100.0", "--logging_first_step",
        "--evaluation_strategy", "steps", "--save_strategy", "steps", "--load_best_model_at_end", "True",
        "--metric_for_best_model", "eval_loss", "--gradient_accumulation_steps", "4", "--gradient_checkpointing",
        "--save_total_limit", "2", "--resume_from_checkpoint", "--report_to", "none", "--bf16",
        "--per_device_train_batch_size", "2", "--per-device-eval-batch-size", "3", "--max_steps", "30",
        "--warmup_ratio", "0.1", "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", "--seed", "7",
        "--dataloader_num_workers", "0", "--learning_rate", "2e-4", "--lora-targets", "q_proj,k_proj,v_proj",
    ])
    assert cfg.block_size == 256 and cfg.max_train_samples == 10 and cfg.save_steps == 100
    assert cfg.eval_strategy == "steps" and cfg.gradient_accumulation_steps == 4 and cfg.gradient_checkpointing
    assert cfg.resume_from_checkpoint == "auto" and cfg.report_to == ("none",) and cfg.bf16
    assert cfg.warmup_steps == 0.1 and cfg.lr == 2e-4 and cfg.lora_targets == ("q_proj", "k_proj", "v_proj")
    assert cfg.per_device_eval_batch_size == 3 and cfg.seed == 7 and cfg.lr_scheduler_type == "cosine"


def test_yaml_config_with_cli_override(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("pruned: p\nout: o\nlearning_rate: 5e-4\nlora-r: 16\nevaluation_strategy: 'no'\n"
                         "load_best_model_at_end: false\nblock_size: 512\n")
    cfg = parse(["--config", str(yaml_file), "--block-size", "128"])
    assert cfg.lr == 5e-4 and cfg.lora_r == 16 and cfg.eval_strategy == "no" and cfg.block_size == 128
    # A run directory's run_config.json is itself a valid --config (the printed resume command uses it).
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({"config": cfg.to_dict(), "provenance": {}}))
    again = parse(["--config", str(run_config), "--resume_from_checkpoint", "auto"])
    assert again.block_size == 128 and again.resume_from_checkpoint == "auto"


@pytest.mark.parametrize("argv, match", [
    (["--out", "o"], "--pruned"),
    (["--pruned", "p", "--out", "o", "--lr", "0"], "--lr"),
    (["--pruned", "p", "--out", "o", "--block-size", "0"], "--block-size"),
    (["--pruned", "p", "--out", "o", "--bf16", "--fp16"], "exclusive"),
    (["--pruned", "p", "--out", "o", "--metric_for_best_model", "accuracy"], "eval_loss"),
    (["--pruned", "p", "--out", "o", "--eval_strategy", "no"], "load_best_model_at_end"),
    (["--pruned", "p", "--out", "o", "--overwrite", "--resume_from_checkpoint"], "contradict"),
])
def test_bad_settings_are_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse(argv)


def test_alert_threshold_flags_override_the_yaml_ones(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("pruned: p\nout: o\nalert_thresholds: {min_train_points: 20, flat_max_rel_change: 0.01}\n")
    cfg = parse(["--config", str(yaml_file), "--alert-threshold", "flat_max_rel_change=0.02"])
    assert cfg.alert_thresholds == {"min_train_points": 20, "flat_max_rel_change": 0.02}
    with pytest.raises(UserError, match="--alert-threshold 'flat': expected NAME=VALUE"):
        parse(["--pruned", "p", "--out", "o", "--alert-threshold", "flat"])


def test_unknown_yaml_key_names_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown setting 'lora_rank'.*lora_r"):
        config_from_mapping({"pruned": "p", "out": "o", "lora_rank": 4})


def test_group_blocks_like_run_clm():
    ids = torch.arange(10)
    blocks = windows_of(ids, 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # remainder dropped
    assert windows_of(ids, 4, 1).tolist() == [[0, 1, 2, 3]]
    item = BlockDataset(blocks)[1]
    assert torch.equal(item["input_ids"], item["labels"]) and item["attention_mask"].sum() == 4


@pytest.mark.parametrize("prune_json, method", [
    ({"config": {"pattern": "block16x16"}}, "sparse-ft"),
    ({"pattern": "block8x8"}, "sparse-ft"),
    ({"config": {"pattern": "2:4"}}, "lora"),
    ({"config": {"pattern": "unstructured"}}, "lora"),
    ({}, "lora"),
])
def test_auto_method_is_sparse_ft_for_block_patterns_and_says_why(prune_json, method):
    from prunetune.finetune.config import FinetuneConfig, resolve_method

    cfg, why = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json)
    assert cfg.method == method and why.startswith(f"{method}: auto")
    explicit, why = resolve_method(FinetuneConfig(pruned="p", out="o", method="masked-lora"), prune_json)
    assert explicit.method == "masked-lora" and "requested" in why


def test_auto_method_falls_back_to_masked_lora_when_sparse_ft_state_would_not_fit():
    from prunetune.finetune.config import FinetuneConfig, resolve_method

    # Llama-2-7B-sized: 32 layers of 4096x4096 (x4) and 4096x11008 (x3) matrices, ~6.5e9 trained weights.
    matrices = {f"l{i}.{m}": {"shape": [4096, 4096]} for i in range(32) for m in "qkvo"}
    matrices |= {f"l{i}.{m}": {"shape": [11008, 4096]} for i in range(32) for m in ("gate", "up", "down")}
    prune_json = {"config": {"pattern": "block16x16"}, "matrices": matrices}
    cfg, why = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json, free_bytes=80 * 2**30)
    assert cfg.method == "masked-lora" and "GiB free" in why and "--method sparse-ft" in why
    cfg, _ = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json, free_bytes=640 * 2**30)
    assert cfg.method == "sparse-ft"
    small = {"config": {"pattern": "block16x16"}, "matrices": {"a": {"shape": [576, 576]}}}
    assert resolve_method(FinetuneConfig(pruned="p", out="o"), small, free_bytes=2**30)[0].method == "sparse-ft"

    # Under FSDP2 each of N GPUs holds 1/N of the ~72 GiB: on 40 GB GPUs (24 GiB for it) 8 fit it, 2 do not.
    cfg, why = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json, free_bytes=40 * 2**30, shards=8)
    assert cfg.method == "sparse-ft" and "~9.0 GiB of its state per GPU across 8 GPUs under FSDP2" in why
    cfg, why = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json, free_bytes=40 * 2**30, shards=2)
    assert cfg.method == "masked-lora" and "~36.2 GiB of optimizer state and gradients per GPU across 2" in why
    # Not sharded, but 8 GPUs visible: masked LoRA, and the way to run sparse-ft across them.
    cfg, why = resolve_method(FinetuneConfig(pruned="p", out="o"), prune_json, free_bytes=40 * 2**30, devices=8)
    assert cfg.method == "masked-lora" and "configs/accelerate/fsdp2-8gpu.yaml" in why
