"""`--method sparse-ft`: sparse fine-tuning. No adapter: the kept weights of the pruned matrices train directly.

The gradient of every pruned position is zeroed by a tensor hook (before gradient accumulation and before DDP's
all-reduce), and the weights are re-masked after every optimizer step (`RemaskCallback`), so the zeros stay
exact whatever the optimizer (momentum, weight decay) does. Under FSDP2 each weight becomes a DTensor of which a
rank holds one shard: the masks are cut exactly like their weights (`sharded.shard_like`), the reduce-scattered
gradient shards are masked after each backward, before clipping (the hooks never see them), and each rank re-masks
its own shards; masks, gradients, optimizer state and master weights all take 1/N per rank. What trains is the deployable sparse model: the run
leaves a pruned-model directory (`RUN/model`) that `verify` and `evaluate` take, nothing to merge. It recovered
most per token at block sparsity (bench/RESULTS.md); its cost is AdamW state for every weight of the trained
matrices (the banner prints it).
"""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from prunetune import sharded
from prunetune.architecture import module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.recovery.base import ADAMW_STATE_BYTES, Evaluation, Prepared, RecoverySettings, gib
from prunetune.rundir import PRUNE_JSON, SPARSE_MODEL_DIR, copy_masks

ALL_LINEAR = "all-linear"


def select_types(available: list[str], targets: tuple[str, ...] | list[str]) -> list[str]:
    """The module types sparse-ft trains: `all-linear` or a subset of `available`; UserError for unknown ones."""
    if tuple(targets) == (ALL_LINEAR,):
        return sorted(available)
    unknown = [t for t in targets if t not in available]
    if unknown or not targets:
        raise UserError(
            f"--sparse-ft-targets {','.join(unknown) or '(empty)'} not found in this model; choose from: "
            f"{', '.join(sorted(available))} or {ALL_LINEAR}"
        )
    return sorted(set(targets))


@dataclass
class SparseTraining:
    """The trained weights of a sparse fine-tuning run and their keep-masks."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    """Full module name -> the weight trained in place (under FSDP2: its DTensor, once `bind` found it)."""
    keep: dict[str, torch.Tensor]
    """Full module name -> keep-mask (bool) of what this process holds of the weight: all of it, or under FSDP2
    the local shard, cut like the weight's, on its device."""
    hooks: list[Any] = field(default_factory=list)

    def bind(self) -> None:
        """Find the trained weights again in the model as it is now. FSDP2 replaces each by a DTensor that holds
        this rank's shard (and the gradient hooks on the old tensors with it): the mask becomes the matching shard,
        and the whole mask is dropped."""
        linears = prunable_linears(self.model)
        for name, old in list(self.params.items()):
            weight = linears[name].weight
            if weight is old:
                continue
            self.params[name] = weight
            self.keep[name] = sharded.shard_like(self.keep[name], weight)

    @torch.no_grad()
    def remask(self) -> None:
        """Zero every pruned position this rank holds (`masked_fill_` writes +0.0, never -0.0)."""
        for name, param in self.params.items():
            sharded.local(param).masked_fill_(~self.keep[name], 0.0)

    @torch.no_grad()
    def mask_sharded_grads(self) -> None:
        """Zero the gradient shards of pruned positions that FSDP2 reduce-scattered outside autograd (where the
        tensor hooks never run); the gradients of unsharded weights were masked by their hooks already."""
        for name, param in self.params.items():
            if sharded.is_sharded(param) and param.grad is not None:
                sharded.local(param.grad).masked_fill_(~self.keep[name], 0.0)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def memory(self) -> dict[str, int]:
        """What training these weights costs beyond inference on this process (its shards under FSDP2): dense
        tensors, so every position counts."""
        held = {name: sharded.local(p) for name, p in self.params.items()}
        trained = sum(p.numel() for p in held.values())
        kept = sum(int(k.sum()) for k in self.keep.values())
        elem = max((p.element_size() for p in held.values()), default=4)
        return {
            "trained_params": trained, "kept_params": kept,
            "optimizer_state_bytes": ADAMW_STATE_BYTES * trained,
            "grad_bytes": elem * trained,
            "mask_bytes": sum(k.numel() * k.element_size() for k in self.keep.values()),
        }


def _mask_grad(keep: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, grad, 0.0)
    return hook


def prepare_sparse_ft(model: nn.Module, masks: dict[str, torch.Tensor],
                      targets: tuple[str, ...] | list[str] = (ALL_LINEAR,)) -> SparseTraining:
    """Freeze `model` except the weights of the prunable linears of the `targets` types; mask their gradients.

    Matrices without a keep-mask (not pruned) are trained in full. The model's weights are re-masked once
    here, so training starts from exactly the pruned pattern.
    """
    linears = prunable_linears(model)
    types = select_types(sorted({module_type(n) for n in linears}), targets)
    model.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    keep: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in linears.items():
        if module_type(name) not in types:
            continue
        weight = module.weight
        mask = masks.get(name)
        # Weights left on the meta device (FSDP's low-RAM loading on ranks > 0) keep their masks on the CPU.
        device = "cpu" if weight.device.type == "meta" else weight.device
        mask = torch.ones(weight.shape, dtype=torch.bool, device=device) if mask is None else mask.to(device, torch.bool)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: keep-mask {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        weight.requires_grad_(True)
        params[name], keep[name] = weight, mask
        hooks.append(weight.register_hook(_mask_grad(mask)))
    training = SparseTraining(model, params, keep, hooks)
    training.remask()
    return training


class RemaskCallback(TrainerCallback):
    """Re-apply the keep-masks after every optimizer step (and before training, after a checkpoint load).

    `on_optimizer_step` runs once per optimizer step, after all accumulated micro-batches, on every rank;
    `on_backward_end` (prunetune's Trainer) after each micro-batch's backward, before gradients are clipped.
    """

    def __init__(self, training: SparseTraining) -> None:
        self.training = training

    def on_train_begin(self, args, state, control, **kwargs):
        self.training.bind()  # the model may have been sharded since `prepare`
        self.training.remask()

    def on_backward_end(self, args, state, control, **kwargs):
        self.training.mask_sharded_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.training.remask()


def save_sparse_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, pruned_dir: str | Path,
                      record: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None
                      ) -> list[str]:
    """Write a sparse-ft model as a pruned-model directory that `prunetune verify` and `evaluate` take:
    safetensors weights + config, the tokenizer, the pruned dir's masks (`prunetune/`) and `prune.json` (unchanged, so the
    mask digests still match) with `record` under `recovery`. `state_dict`: the weights gathered from a sharded
    model. Returns the file names written."""
    out_dir, pruned_dir = Path(out_dir), Path(pruned_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    copy_masks(pruned_dir, out_dir)
    if (pruned_dir / PRUNE_JSON).is_file():
        meta = json.loads((pruned_dir / PRUNE_JSON).read_text())
        if record is not None and isinstance(meta, dict):
            meta["recovery"] = record
        (out_dir / PRUNE_JSON).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return sorted(p.name for p in out_dir.iterdir())


def load_sparse_checkpoint(model: nn.Module, checkpoint: str | Path) -> None:
    """Load the weights a sparse-ft checkpoint (`checkpoint-N/`, written by the Trainer) holds into `model`."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    if not files:
        raise UserError(f"{checkpoint} has no model*.safetensors; it is not a sparse-ft checkpoint")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"{checkpoint} holds weights this model lacks ({', '.join(unexpected[:3])}); "
                        "it belongs to another model")


class SparseFT:
    name = "sparse-ft"
    summary = "sparse fine-tuning of the kept weights"
    result_dir = SPARSE_MODEL_DIR
    trains_base = True
    makes_adapter = False
    exact_merge = True  # nothing to merge: the trained model is the deployable one
    checkpoint_weights = ("model.safetensors",)

    def describes(self, deployable: bool = True) -> str:
        return "deployable sparse model (kept weights fine-tuned, pruned pattern exact)"

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], settings: RecoverySettings) -> Prepared:
        sparse = prepare_sparse_ft(model, masks, settings.sparse_ft_targets)
        mem = sparse.memory()
        banner = {"method": self.name, "trainable": mem["trained_params"], "modules": len(sparse.params),
                  "targets": sorted({module_type(n) for n in sparse.params})} | mem
        return Prepared(model, self.name, [RemaskCallback(sparse)], banner, sparse,
                        held_bytes=lambda: {"mask_bytes": sparse.memory()["mask_bytes"]})

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation("deployable", self.describes(True))]

    def load_checkpoint(self, model: nn.Module, checkpoint: Path) -> bool:
        if not Path(checkpoint).is_dir():
            return False
        load_sparse_checkpoint(model, checkpoint)
        return True

    def save_result(self, trainer: Any, out_dir: Path, pruned_dir: Path, base_model: str | None,
                    record: dict[str, Any], base_digest: str, is_main: bool) -> None:
        # Sharded (FSDP2): every rank takes part in gathering the weights; the main process writes them.
        state = sharded.full_state_dict(trainer.model) if getattr(trainer, "is_fsdp_enabled", False) else None
        if is_main:
            save_sparse_model(trainer.model, trainer.processing_class, out_dir, pruned_dir, record, state)

    def attach(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
        return 0

    def unmerged(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def banner_lines(self, r: dict[str, Any]) -> list[str]:
        total = r.get("total")
        of_all = f" of {total:,} params ({100 * r['trainable'] / total:.2f}%)" if total and r.get("trainable") else ""
        return [
            f"Sparse fine-tuning of {r.get('modules')} pruned matrices ({','.join(r.get('targets', []))}): "
            f"{r.get('trained_params', 0):,} weights in the trained tensors{of_all}, {r.get('kept_params', 0):,} "
            "kept (trained), the rest pruned (held at exactly 0)",
            f"  memory beyond inference: AdamW state {gib(r.get('optimizer_state_bytes', 0))} (2 fp32 values per "
            f"weight) + gradients {gib(r.get('grad_bytes', 0))} + keep-masks {gib(r.get('mask_bytes', 0))}",
        ]

    def next_steps(self, result: Path, pruned: Path, run_out: Path, data_flag: str) -> list[tuple[str, str]]:
        quoted = shlex.quote(str(result))
        return [("perplexity of the recovered sparse model", f"prunetune evaluate --model {quoted}{data_flag}"),
                ("check that the pruned pattern holds", f"prunetune verify {quoted}")]


METHOD = SparseFT()
