"""The deployable models of masked LoRA and sparse fine-tuning, from a real `prune` output (16x16 blocks):
written to disk they pass `prunetune verify`, and the merged masked-LoRA model computes what was trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import Trainer, TrainingArguments

from prunetune.models import apply_adapter, load_model
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.verify import verify_dir
from prunetune.recovery.merge import merge_adapter
from prunetune.recovery.sparse_ft import load_sparse_checkpoint, save_sparse_model
from prunetune.rundir import META_DIR, PRUNE_JSON, SPARSE_MODEL_DIR, copy_masks, load_keep_masks
from prunetune.sparsity.violations import pattern_violations
from test_recovery_methods import RandomTokens, lora_config, prepare


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    out = tmp_path_factory.mktemp("recovery") / "pruned"
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(out), pattern="block16x16", calib_dataset="wikitext2",
                      data_dir=str(shared_data), nsamples=4, seqlen=64)
    return Path(run_prune(cfg, console=Console(quiet=True)))


def train(model, tmp_path: Path, callbacks=(), steps: int = 3) -> None:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=5e-3, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, logging_steps=1,
    )
    vocab = model.get_input_embeddings().weight.shape[0]
    Trainer(model=model, args=args, train_dataset=RandomTokens(8, 16, vocab), callbacks=list(callbacks)).train()


def loss_of(model, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_sparse_ft_model_verifies_and_reloads(pruned, tmp_path):
    model, tokenizer = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    masks, source = load_keep_masks(pruned, model)
    assert source == "prunetune/masks.safetensors"
    prepared = prepare(model, "sparse-ft", masks)
    train(prepared.model, tmp_path, prepared.callbacks)
    out = tmp_path / SPARSE_MODEL_DIR
    files = save_sparse_model(model, tokenizer, out, pruned, record={"method": "sparse-ft"})
    assert {META_DIR, PRUNE_JSON, "config.json", "model.safetensors"} <= set(files)
    result = verify_dir(out)
    assert result.ok, result.problems
    reloaded, _ = load_model(str(out), dtype=torch.float32, device=torch.device("cpu"))
    ids = torch.randint(0, 100, (1, 12))
    assert loss_of(reloaded, ids) == pytest.approx(loss_of(model, ids), rel=1e-6)
    # A checkpoint of the trained weights loads back into a fresh pruned model.
    fresh, _ = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    load_sparse_checkpoint(fresh, out)
    assert loss_of(fresh, ids) == pytest.approx(loss_of(model, ids), rel=1e-6)


def test_masked_lora_adapter_merges_exactly_and_verifies(pruned, tmp_path):
    model, tokenizer = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    masks, _ = load_keep_masks(pruned, model)
    prepared = prepare(model, "masked-lora", masks, lora_config=lora_config())
    train(prepared.model, tmp_path)
    ids = torch.randint(0, 100, (2, 16))
    trained_loss = loss_of(prepared.model, ids)
    prepared.model.save_pretrained(str(tmp_path / "adapter"))

    # As a user (or the merge stage) would: the pruned dir + the saved adapter, merged with the masks.
    base, _ = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    merged, _ = merge_adapter(apply_adapter(base, tmp_path / "adapter"), masks)
    assert pattern_violations(merged, masks) == {}
    assert loss_of(merged, ids) == pytest.approx(trained_loss, rel=1e-3)  # perplexity within 0.1%
    out = tmp_path / "merged"
    merged.save_pretrained(str(out), safe_serialization=True)
    copy_masks(pruned, out)
    shutil.copy2(pruned / PRUNE_JSON, out / PRUNE_JSON)
    result = verify_dir(out)
    assert result.ok, result.problems


def test_plain_lora_adapter_is_not_the_deployable_model(pruned, tmp_path):
    model, _ = load_model(str(pruned), dtype=torch.float32, device=torch.device("cpu"))
    masks, _ = load_keep_masks(pruned, model)
    prepared = prepare(model, "lora", masks, lora_config=lora_config())
    train(prepared.model, tmp_path)
    ids = torch.randint(0, 100, (2, 16))
    adapter_loss = loss_of(prepared.model, ids)
    merged, _ = merge_adapter(prepared.model, masks)
    assert pattern_violations(merged, masks) == {}
    # The dense update trained through every pruned tile; masking it changes the model.
    assert abs(loss_of(merged, ids) - adapter_loss) > 1e-4
