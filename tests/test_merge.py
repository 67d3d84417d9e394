"""`prunetune merge`: the pruned pattern survives a --keep-sparsity merge exactly, the merged model computes
what the adapter computed (plain) or the masked-delta model (masked), and broken inputs are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console

from prunetune.architecture import prunable_linears
from prunetune.cli import main as cli_main
from prunetune.errors import UserError
from prunetune.merge import MergeConfig, run_merge
from prunetune.models import load_model
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.engine import run_prune
from prunetune.pruning.verify import verify_dir
from prunetune.recovery.merge import lora_delta, masked_merge
from prunetune.rundir import load_masks, save_masks
from prunetune.sparsity.violations import masked_nonzeros

TILE = 16
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _quiet() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model pruned 50% in 16x16 blocks by `prunetune prune` (magnitude: no calibration data)."""
    out = tmp_path_factory.mktemp("pruned") / "block16"
    cfg = PruneConfig(model=str(tiny_model_dir), out=str(out), method="magnitude", pattern=f"block{TILE}x{TILE}",
                      sparsity=0.5, device="cpu")
    run_prune(cfg, _quiet())
    return out


def _make_adapter(out: Path, pruned: Path, break_module: str | None = None) -> Path:
    """A LoRA adapter on `pruned` with non-zero B (a freshly initialised one has B = 0 and merges to nothing)."""
    model, tokenizer = load_model(str(pruned))
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            if break_module and break_module in name and "lora_A" in name:
                param[0, 0] = float("nan")
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "prunetune_adapter.json").write_text(json.dumps({"pruned_model": str(pruned)}))
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, pruned_dir) -> Path:
    return _make_adapter(tmp_path_factory.mktemp("adapter"), pruned_dir)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


# ------------------------------------------------------------------------------------------- pure math


def test_lora_delta_equals_peft(pruned_dir, adapter_dir):
    model, _ = load_model(str(pruned_dir))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.get_delta_weight("default")
    got = lora_delta(layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"])
    torch.testing.assert_close(got, expected)
    assert lora_delta(torch.ones(2, 3), torch.ones(5, 2), 0.5, fan_in_fan_out=True).shape == (3, 5)


def test_masked_merge_keeps_zeros_and_leaves_inputs_alone():
    torch.manual_seed(0)
    keep = torch.rand(32, 48) > 0.5
    weight = torch.randn(32, 48) * keep
    delta = torch.randn(32, 48)
    w0, d0 = weight.clone(), delta.clone()
    merged, stats = masked_merge(weight, delta, keep, "m")
    torch.testing.assert_close(merged, weight + delta * keep)
    assert masked_nonzeros(merged, keep) == 0
    # +0.0 exactly: a negative delta times a False mask would give -0.0 bits in the saved file.
    assert not torch.signbit(merged[~keep]).any()
    assert stats.pruned == int((~keep).sum()) == stats.restored_by_plain_merge
    assert 0 < stats.masked_delta_norm < 1
    assert torch.equal(weight, w0) and torch.equal(delta, d0)
    plain, plain_stats = masked_merge(weight, delta, None, "m")
    torch.testing.assert_close(plain, weight + delta)
    assert masked_nonzeros(plain, keep) > 0 and plain_stats.pruned == 0


def test_masked_merge_bf16_keeps_pattern():
    torch.manual_seed(0)
    keep = torch.rand(16, 16) > 0.5
    weight = (torch.randn(16, 16) * keep).to(torch.bfloat16)
    merged, _ = masked_merge(weight, torch.randn(16, 16), keep, "m")
    assert merged.dtype == torch.bfloat16
    assert masked_nonzeros(merged, keep) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_masked_merge_refuses_non_finite(bad):
    keep = torch.ones(4, 4, dtype=torch.bool)
    delta = torch.zeros(4, 4)
    delta[1, 2] = bad
    with pytest.raises(UserError, match="model.layers.3.mlp.up_proj"):
        masked_merge(torch.zeros(4, 4), delta, keep, "model.layers.3.mlp.up_proj")
    weight = torch.zeros(4, 4)
    weight[0, 0] = bad  # a broken base weight is refused too: the merged weight must be finite
    with pytest.raises(UserError, match="merged weight of w"):
        masked_merge(weight, torch.zeros(4, 4), keep, "w")
    with pytest.raises(UserError, match="shape"):
        masked_merge(torch.zeros(4, 4), torch.zeros(4, 4), torch.ones(4, 5, dtype=torch.bool), "w")


# ------------------------------------------------------------------------------------------- the command


def test_keep_sparsity_merge(tmp_path, pruned_dir, adapter_dir, batch):
    record = run_merge(MergeConfig(adapter=str(adapter_dir), out=str(tmp_path / "merged")), _quiet())
    out = tmp_path / "merged"
    assert {"config.json", "model.safetensors", "prunetune", "merge.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    merged, _ = load_model(str(out))
    masks = load_masks(pruned_dir)
    linears = prunable_linears(merged)
    for name, keep in masks.items():
        assert masked_nonzeros(linears[name].weight, keep) == 0, name
    assert record["sparsity_after"]["zeros"] == record["sparsity_before"]["zeros"]
    assert record["sparsity_before"]["overall"] == pytest.approx(0.5)
    assert record["plain_merge_sparsity"] < 0.5  # what a plain merge would have lost
    assert json.loads((out / "merge.json").read_text())["sparsity_after"] == record["sparsity_after"]
    assert verify_dir(out).ok  # `prunetune verify` accepts the merged model: same masks, same pattern

    # Reference: the pruned model plus PEFT's own delta, masked; merged weights changed only where kept.
    reference, _ = load_model(str(pruned_dir))
    peft_model = PeftModel.from_pretrained(load_model(str(pruned_dir))[0], str(adapter_dir))
    peft_layers = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "get_delta_weight")}
    ref_linears = prunable_linears(reference)
    with torch.no_grad():
        for name, layer in peft_layers.items():
            ref_linears[name].weight += layer.get_delta_weight("default") * masks[name]
    torch.testing.assert_close(_logits(merged, batch), _logits(reference, batch), atol=1e-5, rtol=1e-5)
    changed = {n for n in linears if not torch.equal(linears[n].weight, prunable_linears(load_model(str(pruned_dir))[0])[n].weight)}
    assert {n.rsplit(".", 1)[-1] for n in changed} == set(TARGETS)


def test_plain_merge_equals_unmerged_adapter(tmp_path, pruned_dir, adapter_dir, batch):
    record = run_merge(
        MergeConfig(adapter=str(adapter_dir), out=str(tmp_path / "plain"), keep_sparsity=False), _quiet()
    )
    merged, _ = load_model(str(tmp_path / "plain"))
    masks = load_masks(pruned_dir)
    linears = prunable_linears(merged)
    restored = sum(masked_nonzeros(linears[n].weight, masks[n]) for n in masks)
    assert restored > 0
    assert record["sparsity_after"]["overall"] < record["sparsity_before"]["overall"]
    assert not (tmp_path / "plain" / "prune.json").exists()  # the pattern no longer holds; nothing claims it
    peft_model = PeftModel.from_pretrained(load_model(str(pruned_dir))[0], str(adapter_dir))
    torch.testing.assert_close(_logits(merged, batch), _logits(peft_model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_cli_eval_and_output_protection(tmp_path, pruned_dir, adapter_dir, shared_data, capsys):
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(adapter_dir), "--out", str(out), "--eval", "--data-dir", str(shared_data),
            "--seqlen", "64", "--max-windows", "3"]
    assert cli_main(args) == 0
    ppl = json.loads((out / "merge.json").read_text())["perplexity"]
    assert ppl["unmerged"]["windows"] == ppl["merged"]["windows"] == 3
    assert ppl["merged"]["perplexity"] != ppl["unmerged"]["perplexity"]  # masking changed the model
    first = (out / "model.safetensors").read_bytes()

    capsys.readouterr()
    assert cli_main(args) == 2  # an existing merge is kept without --overwrite
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == first

    assert cli_main([*args[:-7], "--no-keep-sparsity", "--overwrite"]) == 0
    assert json.loads((out / "merge.json").read_text())["keep_sparsity"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging leftovers

    user_dir = tmp_path / "notes"
    user_dir.mkdir()
    (user_dir / "todo.txt").write_text("mine")
    assert cli_main(["merge", "--adapter", str(adapter_dir), "--out", str(user_dir), "--overwrite"]) == 2
    assert (user_dir / "todo.txt").read_text() == "mine"
    # Writing into the input directories would destroy them, --overwrite or not.
    assert cli_main(["merge", "--adapter", str(adapter_dir), "--out", str(pruned_dir), "--overwrite"]) == 2
    assert cli_main(["merge", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_non_finite_adapter_refused(tmp_path, pruned_dir):
    adapter = _make_adapter(tmp_path / "broken", pruned_dir, break_module="layers.1.mlp.up_proj")
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj"):
        run_merge(MergeConfig(adapter=str(adapter), out=str(tmp_path / "merged")), _quiet())
    assert not (tmp_path / "merged").exists()


def test_masks_derived_from_zeros_and_model_override(tmp_path, pruned_dir, adapter_dir):
    no_masks = tmp_path / "pruned-no-masks"
    shutil.copytree(pruned_dir, no_masks)
    shutil.rmtree(no_masks / "prunetune")
    record = run_merge(
        MergeConfig(adapter=str(adapter_dir), out=str(tmp_path / "merged"), model=str(no_masks)), _quiet()
    )
    assert "derived from the zero weights" in record["masks"]
    assert record["pruned_model"] == str(no_masks.resolve())
    assert record["sparsity_after"]["zeros"] >= record["sparsity_before"]["zeros"]
    assert not (tmp_path / "merged" / "prunetune").exists()


def test_pruned_model_found_from_peft_config(tmp_path, pruned_dir, adapter_dir):
    """Without prunetune_adapter.json (a plain PEFT adapter), the base recorded by PEFT is the pruned model."""
    adapter = tmp_path / "peft-only"
    shutil.copytree(adapter_dir, adapter)
    (adapter / "prunetune_adapter.json").unlink()
    assert Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]) == pruned_dir
    record = run_merge(MergeConfig(adapter=str(adapter), out=str(tmp_path / "merged")), _quiet())
    assert record["pruned_model"] == str(pruned_dir.resolve())
    assert record["masks"].endswith("prunetune/masks.safetensors")


def test_merge_keeps_the_pruned_models_dtype(tmp_path, pruned_dir, adapter_dir):
    bf16_dir = tmp_path / "pruned-bf16"
    model, tokenizer = load_model(str(pruned_dir), dtype="bfloat16")
    model.save_pretrained(bf16_dir)
    tokenizer.save_pretrained(bf16_dir)
    shutil.copytree(pruned_dir / "prunetune", bf16_dir / "prunetune")
    run_merge(MergeConfig(adapter=str(adapter_dir), out=str(tmp_path / "merged"), model=str(bf16_dir)), _quiet())
    merged, _ = load_model(str(tmp_path / "merged"), dtype="bfloat16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    masks = load_masks(pruned_dir)
    linears = prunable_linears(merged)
    assert all(masked_nonzeros(linears[n].weight, keep) == 0 for n, keep in masks.items())


def test_masks_that_disagree_with_weights_refused(tmp_path, pruned_dir, adapter_dir):
    edited = tmp_path / "pruned-edited"
    shutil.copytree(pruned_dir, edited)
    masks = load_masks(edited)
    name = next(iter(masks))
    masks[name] = ~masks[name]  # now marks the kept (non-zero) weights as pruned
    save_masks(masks, edited, {"pattern": f"block{TILE}x{TILE}", "tile": [TILE, TILE]})
    with pytest.raises(UserError, match="prunetune verify"):
        run_merge(MergeConfig(adapter=str(adapter_dir), out=str(tmp_path / "m"), model=str(edited)), _quiet())
