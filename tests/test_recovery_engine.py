"""`prunetune finetune --method ...` end to end on a tiny model pruned in 16x16 blocks: the number the run
reports describes the deployable sparse model, the outputs pass `prunetune verify`, masked LoRA merges exactly,
sparse-ft keeps exact zeros with gradient accumulation, plain LoRA reports both perplexities."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from prunetune.finetune.config import FinetuneConfig
from prunetune.finetune.engine import run_finetune
from prunetune.merge import MergeConfig, run_merge
from prunetune.models import apply_adapter, load_model
from prunetune.perplexity import perplexity
from prunetune.pruning.verify import verify_dir
from prunetune.recovery.merge import merge_adapter
from prunetune.rundir import ADAPTER_DIR, SPARSE_MODEL_DIR, load_keep_masks
from prunetune.rundir.records import read_jsonl
from prunetune.sparsity.violations import pattern_violations
from test_recovery_verify import pruned  # noqa: F401  (the module-scoped block16x16 prune fixture)

CPU = torch.device("cpu")


def config(pruned_dir: Path, out: Path, shared_data: Path, **overrides) -> FinetuneConfig:
    base = dict(
        pruned=str(pruned_dir), out=str(out), dataset="wikitext2", data_dir=str(shared_data), block_size=32,
        max_train_samples=24, max_eval_samples=4, per_device_eval_batch_size=4, max_steps=4, logging_steps=1,
        eval_steps=2, save_steps=2, lr=3e-3, probe_steps=0, lora_r=4, lora_alpha=8, lora_targets=("all-linear",),
        gradient_accumulation_steps=2, per_device_train_batch_size=2, lora_dropout=0.0,
    )
    return FinetuneConfig(**(base | overrides))


def final_record(out: Path) -> dict:
    return next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "final_eval")


def eval_ids(tokenizer, shared_data: Path) -> torch.Tensor:
    from prunetune.data import load_text, tokenize

    return tokenize(load_text("wikitext2", "validation", str(shared_data)), tokenizer).input_ids


@pytest.mark.slow
def test_masked_lora_run_merges_exactly_and_verifies(pruned, shared_data, tmp_path):  # noqa: F811
    out = tmp_path / "masked"
    result = run_finetune(config(pruned, out, shared_data, method="masked-lora"), stream=io.StringIO())
    assert result["status"] == "completed"
    final = final_record(out)
    assert "deployable" in final["describes"] and final.get("adapter_perplexity") is None

    model, tokenizer = load_model(str(pruned), dtype=torch.float32, device=CPU)
    masks, _ = load_keep_masks(pruned, model)
    ids = eval_ids(tokenizer, shared_data)
    base, _ = load_model(str(pruned), dtype=torch.float32, device=CPU)
    peft_model = apply_adapter(base, out / ADAPTER_DIR)
    # What the engine trained is the masked forward: re-create it from the saved adapter and the pruned masks.
    merged, _ = merge_adapter(peft_model, masks)
    merged_ppl = perplexity(merged, ids, 32, max_windows=8).perplexity
    assert pattern_violations(merged, masks) == {}
    # apply_adapter alone is plain PEFT (dense update); the merged model is the masked one. Reload the masked
    # forward to compare like with like:
    from prunetune.recovery.lora_layers import attach_masks

    masked_base, _ = load_model(str(pruned), dtype=torch.float32, device=CPU)
    masked_model = apply_adapter(masked_base, out / ADAPTER_DIR)
    attach_masks(masked_model, masks, masked=True)
    masked_ppl = perplexity(masked_model, ids, 32, max_windows=8).perplexity
    assert merged_ppl == pytest.approx(masked_ppl, rel=1e-3)  # within 0.1%

    # The real merge command on the adapter; its output passes verify.
    from prunetune.cli import main

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / ADAPTER_DIR), "--out", str(merged_dir)]) in (0, None)
    assert verify_dir(merged_dir).ok
    on_disk, _ = load_model(str(merged_dir), dtype=torch.float32, device=CPU)
    assert perplexity(on_disk, ids, 32, max_windows=8).perplexity == pytest.approx(masked_ppl, rel=1e-3)

    # merge --eval: the unmerged number of a masked-LoRA adapter is its masked forward, so merged == unmerged.
    record = run_merge(MergeConfig(adapter=str(out / ADAPTER_DIR), out=str(tmp_path / "merged-eval"), eval=True,
                                   dataset="wikitext2", split="validation", data_dir=[str(shared_data)],
                                   seqlen=32, max_windows=8))
    assert record["exact"] is True
    assert record["perplexity"]["unmerged"]["perplexity"] == pytest.approx(masked_ppl, rel=1e-6)
    assert abs(record["perplexity"]["merged_vs_unmerged"]) < 1e-3


@pytest.mark.slow
def test_sparse_ft_run_keeps_exact_zeros_and_verifies(pruned, shared_data, tmp_path):  # noqa: F811
    out = tmp_path / "sparse"
    result = run_finetune(config(pruned, out, shared_data, method="sparse-ft", lr=1e-3, weight_decay=0.1),
                          stream=io.StringIO())
    assert result["status"] == "completed"
    model_dir = out / SPARSE_MODEL_DIR
    assert verify_dir(model_dir).ok
    trained, tokenizer = load_model(str(model_dir), dtype=torch.float32, device=CPU)
    before, _ = load_model(str(pruned), dtype=torch.float32, device=CPU)
    masks, _ = load_keep_masks(pruned, trained)
    assert pattern_violations(trained, masks) == {}
    changed = [n for n, p in trained.named_parameters()
               if "proj" in n and not torch.equal(p, dict(before.named_parameters())[n])]
    assert len(changed) == len(masks)  # every pruned matrix trained
    final = final_record(out)
    ids = eval_ids(tokenizer, shared_data)
    assert final["perplexity"] is not None and perplexity(trained, ids, 32, max_windows=4).perplexity > 0
    banner = next(r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "lora")
    assert banner["optimizer_state_bytes"] == 8 * banner["trained_params"]


@pytest.mark.slow
def test_plain_lora_reports_adapter_and_deployable(pruned, shared_data, tmp_path):  # noqa: F811
    out = tmp_path / "plain"
    result = run_finetune(config(pruned, out, shared_data, method="lora"), stream=io.StringIO())
    assert result["status"] == "completed"
    final = final_record(out)
    assert final["adapter_perplexity"] is not None and final["perplexity"] is not None
    assert final["adapter_perplexity"] != pytest.approx(final["perplexity"], rel=1e-6)
    assert "deployable" in final["describes"]
    log = (out / "train.log").read_text()
    assert "deployable" in log


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["layerwise", "both"])
def test_layerwise_distillation_runs(pruned, shared_data, tmp_path, mode):  # noqa: F811
    out = tmp_path / mode
    cfg = config(pruned, out, shared_data, method="masked-lora", distill=mode, max_steps=2, eval_strategy="no",
                 load_best_model_at_end=False, save_strategy="no")
    assert run_finetune(cfg, stream=io.StringIO())["status"] == "completed"
    plain = config(pruned, tmp_path / "plain", shared_data, method="masked-lora", max_steps=2, eval_strategy="no",
                   load_best_model_at_end=False, save_strategy="no")
    run_finetune(plain, stream=io.StringIO())
    first = {name: next(r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["event"] == "log")
             for name in (mode, "plain")}
    # The pruned student differs from the dense teacher: the SquareHead term is positive at step 1.
    assert first[mode] > first["plain"]


def test_default_method_on_a_block_pruned_model_is_sparse_ft_and_says_why(pruned, shared_data, tmp_path):  # noqa: F811
    out = tmp_path / "auto"
    result = run_finetune(config(pruned, out, shared_data, max_steps=2, eval_steps=2, save_steps=2),
                          stream=io.StringIO())
    assert result["status"] == "completed"
    assert verify_dir(out / SPARSE_MODEL_DIR).ok  # trained directly: the deployable sparse model, no adapter
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["config"]["method"] == "sparse-ft"  # resolved, so a resume compares like with like
    assert saved["method_reason"].startswith("sparse-ft: auto for a block16x16 model")
    assert "sparse-ft: auto" in (out / "train.log").read_text()  # the banner says it
