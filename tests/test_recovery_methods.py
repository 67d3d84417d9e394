"""Recovery methods on their own: masked-LoRA math against a direct computation, merge exactness on a tiny
model, the deployable switch of plain LoRA, and sparse fine-tuning keeping exact zeros through a real Trainer
run with gradient accumulation."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from prunetune.architecture import prunable_linears
from prunetune.errors import UserError
from prunetune.recovery import registry
from prunetune.recovery.adapter import lora_config as peft_lora_config
from prunetune.recovery.base import ADAMW_STATE_BYTES, Prepared
from prunetune.recovery.lora_layers import attach_masks, deployable, masked_lora_delta
from prunetune.recovery.merge import lora_delta, masked_merge, merge_adapter
from prunetune.recovery.sparse_ft import prepare_sparse_ft, select_types
from tiny import tiny_config


def block_masks(model: torch.nn.Module, seed: int = 0, block: int = 16) -> dict[str, torch.Tensor]:
    """Keep-masks that drop half of the 16x16 tiles of every prunable linear, chosen at random."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in prunable_linears(model).items():
        out, inp = module.weight.shape
        tiles = torch.rand(out // block, inp // block, generator=gen) < 0.5
        masks[name] = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return masks


def pruned_tiny(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 97))
    masks = block_masks(model, seed)
    with torch.no_grad():
        for name, module in prunable_linears(model).items():
            module.weight.mul_(masks[name])
    return model, masks


@dataclass
class Settings:
    """What a recovery method reads of a FinetuneConfig."""

    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("all-linear",)
    sparse_ft_targets: tuple[str, ...] = ("all-linear",)


def lora_config(targets="all-linear") -> Settings:
    return Settings(lora_targets=(targets,) if isinstance(targets, str) else tuple(targets))


def prepare(model: torch.nn.Module, method: str, masks: dict[str, torch.Tensor],
            lora_config: Settings | None = None) -> Prepared:
    """What the fine-tuning engine calls: the registered method's `prepare`."""
    return registry.get(method).prepare(model, masks, lora_config or Settings())


def randomize_lora_b(model: torch.nn.Module, seed: int = 1) -> None:
    """PEFT starts B at 0 (a no-op adapter); give it values so the delta matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def test_masked_delta_matches_autograd_of_the_direct_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(6, 8) < 0.5
    direct = x @ torch.where(keep, b @ a, 0.0).T
    ours = masked_lora_delta(x, a, b, keep)
    torch.testing.assert_close(ours, direct)
    g = torch.randn_like(direct)
    want = torch.autograd.grad(direct, (x, a, b), g)
    got = torch.autograd.grad(ours, (x, a, b), g)
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w)
    assert torch.autograd.gradcheck(lambda x, a, b: masked_lora_delta(x, a, b, keep), (x, a, b))


def test_masked_lora_merges_exactly_and_keeps_the_pattern():
    model, masks = pruned_tiny()
    reference = copy.deepcopy(model)
    prepared = prepare(model, "masked-lora", masks, lora_config=lora_config())
    peft_model = prepared.model
    assert prepared.banner["masked_layers"] == len(masks)
    randomize_lora_b(peft_model)
    ids = torch.randint(0, 97, (2, 12))
    peft_model.eval()
    lora_layers = dict(peft_model.named_modules())
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        # The merge prunetune writes (merge.py): weight + keep * (s * B @ A), module by module.
        for name, layer in prunable_linears(reference).items():
            lora = lora_layers[f"base_model.model.{name}"]
            delta = lora_delta(lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"])
            merged_weight, _ = masked_merge(layer.weight, delta, masks[name], name)
            layer.weight.copy_(merged_weight)
        reference_logits = reference(input_ids=ids).logits
        merged, _ = merge_adapter(peft_model, masks)  # the merge `prunetune merge` runs
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference_logits, unmerged, rtol=1e-4, atol=1e-4)
    reference_linears = prunable_linears(reference)
    for name, module in prunable_linears(merged).items():
        assert not bool((module.weight[~masks[name]] != 0).any()), name
        torch.testing.assert_close(module.weight, reference_linears[name].weight)


def test_plain_lora_trains_dense_and_deployable_masks():
    model, masks = pruned_tiny()
    plain = prepare(model, "lora", masks, lora_config=lora_config(["q_proj", "v_proj"])).model
    randomize_lora_b(plain)
    vanilla = copy.deepcopy(plain)
    for layer in vanilla.modules():
        if hasattr(layer, "lora_variant"):
            layer.lora_variant.clear()
    ids = torch.randint(0, 97, (1, 10))
    plain.eval()
    vanilla.eval()
    with torch.no_grad():
        dense_update = plain(input_ids=ids).logits
        torch.testing.assert_close(dense_update, vanilla(input_ids=ids).logits)
        with deployable(plain) as n:
            masked = plain(input_ids=ids).logits
        assert n == 4  # q_proj, v_proj of 2 layers
        again = plain(input_ids=ids).logits
        merged = copy.deepcopy(plain)
        with deployable(merged):
            merged = merged.merge_and_unload(safe_merge=True)
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(again, dense_update)
    torch.testing.assert_close(merged_logits, masked, rtol=1e-4, atol=1e-4)
    assert (masked - dense_update).abs().max() > 1e-4  # the masked part of the update matters


def test_masked_lora_trains_its_adapter_and_names_bad_methods():
    model, masks = pruned_tiny()
    peft_model = prepare(model, "masked-lora", masks, lora_config=lora_config(["q_proj"])).model
    randomize_lora_b(peft_model)
    ids = torch.randint(0, 97, (1, 8))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    layer = dict(peft_model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.get_base_layer().weight.grad is None  # the pruned base stays frozen
    assert registry.check("masked-lora") == "masked-lora"
    with pytest.raises(UserError, match="choose one of"):
        registry.check("dora")


def test_attach_masks_refuses_a_wrong_shape():
    model, masks = pruned_tiny()
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_lora_config(model, lora_config(["q_proj"])))
    masks["model.layers.0.self_attn.q_proj"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep-mask"):
        attach_masks(peft_model, masks, masked=True)


def test_sparse_ft_types_and_memory():
    model, masks = pruned_tiny()
    with pytest.raises(UserError, match="not found in this model"):
        prepare_sparse_ft(model, masks, ["mlp"])
    assert select_types(["down_proj", "q_proj"], ["all-linear"]) == ["down_proj", "q_proj"]
    training = prepare_sparse_ft(model, masks, ["down_proj", "up_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"model.layers.{i}.mlp.{t}.weight" for i in (0, 1) for t in ("down_proj", "up_proj"))
    mem = training.memory()
    assert mem["trained_params"] == 4 * 64 * 128
    assert mem["optimizer_state_bytes"] == ADAMW_STATE_BYTES * mem["trained_params"]
    assert mem["kept_params"] == sum(int(masks[n].sum()) for n in training.params)
    training.remove_hooks()


class RandomTokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_sparse_ft_keeps_exact_zeros_under_grad_accumulation(tmp_path):
    model, masks = pruned_tiny()
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    prepared = prepare(model, "sparse-ft", masks)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=prepared.model, args=args, train_dataset=RandomTokens(12, 16, 97),
                      callbacks=prepared.callbacks)
    trainer.train()
    assert trainer.state.global_step == 3
    changed = 0
    for name, module in prunable_linears(model).items():
        weight, keep = module.weight.detach(), masks[name]
        assert bool((weight[~keep] == 0).all()), name
        assert not bool(torch.signbit(weight[~keep]).any()), f"{name}: -0.0 at a pruned position"
        changed += int((weight[keep] != before[name][keep]).sum())
    assert changed > 0.9 * sum(int(m.sum()) for m in masks.values())
    # Frozen everywhere else.
    assert prepared.banner["modules"] == len(masks) and prepared.state is not None


def test_sparse_ft_gradient_is_masked_before_the_optimizer():
    model, masks = pruned_tiny()
    prepare(model, "sparse-ft", masks)
    ids = torch.randint(0, 97, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, module in prunable_linears(model).items():
        assert bool((module.weight.grad[~masks[name]] == 0).all())
        assert module.weight.grad[masks[name]].abs().sum() > 0


def test_plain_lora_is_evaluated_as_trained_then_deployable():
    """The policy the final evaluation and `evaluate --adapter` run: plain LoRA twice (dense update, then the
    update masked by the pattern), the methods that train the deployable model once."""
    model, masks = pruned_tiny()
    plain = prepare(model, "lora", masks, lora_config=lora_config(["q_proj"])).model
    randomize_lora_b(plain)
    ids = torch.randint(0, 97, (1, 10))
    plain.eval()

    def loss() -> float:
        with torch.no_grad():
            return float(plain(input_ids=ids, labels=ids).loss)

    passes = registry.get("lora").evaluations()
    assert [p.key for p in passes] == ["adapter", "deployable"]
    measured = {}
    for ev in passes:
        with ev.context(plain):
            measured[ev.key] = loss()
    with deployable(plain):
        masked = loss()
    assert measured["deployable"] == masked and measured["adapter"] == loss() != masked
    assert "deployable" in passes[-1].describes and "not deployable" in passes[0].describes
    for name in ("masked-lora", "sparse-ft"):
        assert [p.key for p in registry.get(name).evaluations()] == ["deployable"]


def test_remask_alone_restores_zeros_after_every_optimizer_step(tmp_path):
    """Without the gradient hook AdamW moves pruned weights; the callback must zero them after each step."""
    from transformers import TrainerCallback

    model, masks = pruned_tiny()
    prepared = prepare(model, "sparse-ft", masks)
    prepared.state.remove_hooks()
    seen = []

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(all(bool((m.weight[~masks[n]] == 0).all()) for n, m in prunable_linears(model).items()))

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False,
    )
    Trainer(model=model, args=args, train_dataset=RandomTokens(8, 16, 97),
            callbacks=[*prepared.callbacks, Check()]).train()
    assert seen == [True, True]
    # And the control: without the callback the same run leaves pruned weights non-zero.
    model2, masks2 = pruned_tiny()
    prepare(model2, "sparse-ft", masks2).state.remove_hooks()
    Trainer(model=model2, args=args, train_dataset=RandomTokens(8, 16, 97)).train()
    assert any(bool((m.weight[~masks2[n]] != 0).any()) for n, m in prunable_linears(model2).items())


def test_banner_lines_say_what_trains_and_what_it_costs():
    model, masks = pruned_tiny()
    total = sum(p.numel() for p in model.parameters())
    sparse = prepare(model, "sparse-ft", masks).banner | {"total": total}
    text = "\n".join(registry.get("sparse-ft").banner_lines(sparse))
    assert "Sparse fine-tuning of 14 pruned matrices" in text and "AdamW state" in text
    assert f"{sparse['kept_params']:,} kept" in text
    model, masks = pruned_tiny()
    masked = prepare(model, "masked-lora", masks, lora_config=lora_config()).banner | {"total": total}
    assert "merging is exact" in "\n".join(registry.get("masked-lora").banner_lines(masked))
    model, masks = pruned_tiny()
    plain = prepare(model, "lora", masks, lora_config=lora_config()).banner
    assert "reported twice" in "\n".join(registry.get("lora").banner_lines(plain))
