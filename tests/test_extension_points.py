"""The growth points take a new kind as one new file plus one registry line, touching no other module.

A recovery method is defined here, in this file alone, registered with one line, and then runs through the
paths users run: `prunetune finetune` (its banner, checkpoints, best-checkpoint load, final evaluation, result,
next steps), `prunetune evaluate` on its result, and a whole `prunetune run` pipeline (prune, finetune, the merge
stage that has nothing to merge, eval, report). Likewise an export format through `prunetune export`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prunetune.recovery import registry
from prunetune.recovery.base import Evaluation, Prepared
from prunetune.recovery.sparse_ft import load_sparse_checkpoint, save_sparse_model
from test_finetune import make_pruned_dir, small_config
from test_pipeline import tiny_pipeline


class NormFT:
    """A toy method: only the RMSNorm weights train; the pruned matrices are untouched, so the pattern holds."""

    name = "norm-ft"
    summary = "fine-tuning of the norm weights only"
    result_dir = "norm-model"
    trains_base = True
    makes_adapter = False
    exact_merge = True
    checkpoint_weights = ("model.safetensors",)

    def describes(self, deployable: bool = True) -> str:
        return "deployable sparse model (norm weights fine-tuned)"

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], settings: Any) -> Prepared:
        model.requires_grad_(False)
        trained = [p for n, p in model.named_parameters() if "norm" in n]
        for p in trained:
            p.requires_grad_(True)
        return Prepared(model, self.name, [], {"method": self.name, "trainable": sum(p.numel() for p in trained)})

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation("deployable", self.describes())]

    def load_checkpoint(self, model: nn.Module, checkpoint: Path) -> bool:
        load_sparse_checkpoint(model, checkpoint)
        return True

    def save_result(self, trainer: Any, out_dir: Path, pruned_dir: Path, base_model: str | None,
                    record: dict[str, Any], base_digest: str, is_main: bool) -> None:
        if is_main:
            save_sparse_model(trainer.model, trainer.processing_class, out_dir, pruned_dir, record)

    def attach(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
        return 0

    def unmerged(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def banner_lines(self, record: dict[str, Any]) -> list[str]:
        return [f"Norm fine-tuning: {record.get('trainable', 0):,} weights train"]

    def next_steps(self, result: Path, pruned: Path, run_out: Path, data_flag: str) -> list[tuple[str, str]]:
        return [("perplexity of the result", f"prunetune evaluate --model {shlex.quote(str(result))}{data_flag}")]


@pytest.fixture
def norm_ft():
    registry.register(NormFT())  # the one registry line
    yield "norm-ft"
    registry.unregister("norm-ft")


@pytest.mark.slow
def test_a_new_recovery_method_runs_through_finetune_and_evaluate(norm_ft, tiny_model_dir, shared_data, tmp_path,
                                                                   capsys):
    from prunetune.evaluate import EvalConfig, run_evaluate
    from prunetune.finetune.engine import run_finetune
    from prunetune.models import load_model
    from prunetune.rundir import load_keep_masks, recovery_result
    from prunetune.rundir.records import read_jsonl
    from prunetune.sparsity.violations import pattern_violations

    pruned = make_pruned_dir(tiny_model_dir, tmp_path / "pruned")
    out = tmp_path / "run"
    result = run_finetune(small_config(pruned, out, shared_data, method=norm_ft, max_steps=4, eval_steps=2,
                                       save_steps=2))
    assert result["status"] == "completed"
    saved = recovery_result(out)
    assert saved is not None and saved.path == out / "norm-model" and saved.method == norm_ft and not saved.is_adapter
    model, _ = load_model(str(saved.path))
    masks, source = load_keep_masks(saved.path, model)
    assert source.endswith("masks.safetensors") and pattern_violations(model, masks) == {}  # only norms trained
    records = read_jsonl(out / "metrics.jsonl")
    banner = next(r for r in records if r["event"] == "lora")
    assert banner["method"] == norm_ft and banner["trainable"] > 0
    final = next(r for r in records if r["event"] == "final_eval")
    assert final["describes"] == NormFT().describes()
    summary = next(r for r in records if r["event"] == "summary")
    assert summary["next_steps"][0][1].startswith(f"prunetune evaluate --model {saved.path}")
    assert "Norm fine-tuning:" in (out / "train.log").read_text()
    evaluated = run_evaluate(EvalConfig(model=str(saved.path), seqlen=32, max_windows=2,
                                        data_dir=[str(shared_data)], quiet=True))
    assert evaluated["perplexity"] > 1 and 0.45 < evaluated["sparsity"]["overall"] < 0.55


@pytest.mark.slow
def test_a_new_recovery_method_runs_through_the_pipeline(norm_ft, tiny_model_dir, shared_data, tmp_path):
    from prunetune.pipeline.config import parse_pipeline
    from prunetune.pipeline.job import run_pipeline

    doc = tiny_pipeline(tiny_model_dir, shared_data, method=norm_ft)
    story = run_pipeline(parse_pipeline(doc, source="tiny"), tmp_path / "run")
    merge = json.loads((tmp_path / "run" / "merge" / "stage.json").read_text())["result"]
    assert merge == {"deployable": str(tmp_path / "run" / "finetune" / "norm-model"), "merged": False}
    evals = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["test"]
    assert evals["recovered_model"]["model"].endswith("norm-model") and evals["recovered"]["perplexity"] > 1
    assert story["test"]["deployable"]


class Npz:
    """A toy export format: every weight as numpy arrays (one new file + one registry line in the product)."""

    name = "npz"
    runtimes = "numpy (np.load), as of the test that defines it"

    def check(self, cfg: Any) -> None:
        return None

    def write(self, source: Any, cfg: Any, staging: Path, log: Any) -> Any:
        import numpy as np

        from prunetune.export.base import Written

        arrays = {n: p.detach().float().numpy() for n, p in source.model.state_dict().items()}
        np.savez(staging / "weights.npz", **arrays)
        back = np.load(staging / "weights.npz")
        verified = sum(bool((back[n] == arrays[n]).all()) for n in (f"{m}.weight" for m in source.linears))
        return Written(record={"arrays": len(arrays)}, rows=[("weights", 1, (staging / "weights.npz").stat().st_size)],
                       verified=verified)


def test_a_new_export_format_runs_through_export(tiny_model_dir, tmp_path):
    from prunetune.cli import main
    from prunetune.export import registry as formats

    pruned = make_pruned_dir(tiny_model_dir, tmp_path / "pruned")
    formats.register(Npz())
    try:
        assert main(["export", str(pruned), "--out", str(tmp_path / "npz"), "--format", "npz"]) == 0
    finally:
        formats.unregister("npz")
    record = json.loads((tmp_path / "npz" / "export.json").read_text())
    assert record["format"] == "npz" and record["verified"] == record["matrices"] > 0
    assert record["loads_in"] == Npz.runtimes
