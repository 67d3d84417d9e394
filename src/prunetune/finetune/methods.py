"""Recovery methods that keep the pruned pattern: what trains is what deploys.

- `lora`: plain PEFT LoRA. Its update `s * B @ A` is dense, so the trained model has weight back in every
  pruned position; the deployable model masks the delta (`merge --keep-sparsity`). `deployable(model)` switches
  the forward to that masked delta without merging, so both perplexities can be measured from one model.
- `masked-lora`: the forward uses `keep * (s * B @ A)`; the gradient reaches only the kept positions, and
  merging with the keep-mask is exact (the merged model computes what was trained).
- `sparse-ft`: no adapter; the kept weights of the pruned matrices are trained directly. The gradient of every
  pruned position is zeroed by a tensor hook (before gradient accumulation and before DDP's all-reduce), and
  the weights are re-masked after every optimizer step (`RemaskCallback`), so the zeros stay exact whatever
  the optimizer (momentum, weight decay) does.

The keep-masks (bool, True = weight kept) live on the device beside the weights and are never saved into an
adapter: they come from the pruned directory's `masks.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerCallback

from prunetune.architecture import module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.rundir import PRUNE_JSON, copy_masks

METHODS = ("lora", "masked-lora", "sparse-ft")
ALL_LINEAR = "all-linear"
# AdamW keeps two float32 states (exp_avg, exp_avg_sq) per trained weight, dense over the whole tensor.
ADAMW_STATE_BYTES = 8


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def describes(method: str, deployable: bool = True) -> str:
    """What a perplexity measured on the fine-tuned model of `method` is the perplexity of."""
    if method == "lora" and not deployable:
        return "pruned model + LoRA adapter (dense update: weight back in every pruned position; not deployable)"
    if method == "sparse-ft":
        return "deployable sparse model (kept weights fine-tuned, pruned pattern exact)"
    return "deployable sparse model (LoRA delta masked by the pruned pattern = the merged model)"


# ---------------------------------------------------------------------------------------------------
# Masked LoRA
# ---------------------------------------------------------------------------------------------------
class _MaskedLoraDelta(torch.autograd.Function):
    """y = x @ (keep * (B @ A))^T, without keeping the (out, in) masked delta alive for the backward pass.

    Saves x, A, B and keep; the backward recomputes the delta. Peak extra memory is two (out, in) matrices
    of the module being computed, never one per module of the network.
    x (..., in), A (r, in), B (out, r), keep (out, in) bool -> (..., out).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        delta = torch.where(keep, lora_b @ lora_a, 0.0)  # (out, in) in the adapter's dtype
        ctx.save_for_backward(x, lora_a, lora_b, keep)
        return F.linear(x.to(delta.dtype), delta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, lora_a, lora_b, keep = ctx.saved_tensors
        dtype = lora_a.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            delta = torch.where(keep, lora_b @ lora_a, 0.0)
            grad_x = (g @ delta).reshape(x.shape).to(x.dtype)  # (N, in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_delta = torch.where(keep, g.T @ x.reshape(-1, x.shape[-1]).to(dtype), 0.0)  # (out, in)
            grad_a = lora_b.T @ grad_delta  # (r, in)
            grad_b = grad_delta @ lora_a.T  # (out, r)
        return grad_x, grad_a, grad_b, None


def masked_lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x @ (keep * (B @ A))^T, differentiable in x, A and B. x (..., in), A (r, in), B (out, r), keep (out, in)."""
    return _MaskedLoraDelta.apply(x, lora_a, lora_b, keep)


class MaskedLoraVariant:
    """A PEFT LoRA variant (the hook DoRA uses) holding one module's keep-mask.

    `masked=True`: the forward adds `keep * (s * B @ A)` and the PEFT merge writes exactly that; `False`:
    vanilla LoRA. The mask is a plain tensor, not a module buffer: it is never saved in the adapter and DDP
    does not broadcast it every step.
    """

    def __init__(self, keep: torch.Tensor, masked: bool) -> None:
        self.keep = keep.bool()
        self.masked = masked

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        return None

    def _keep_on(self, device: torch.device) -> torch.Tensor:
        if self.keep.device != device:
            self.keep = self.keep.to(device)
        return self.keep

    def delta(self, module: nn.Module, adapter: str) -> torch.Tensor:
        delta = module.get_delta_weight(adapter)  # (out, in), scaling included
        if not self.masked:
            return delta
        return torch.where(self._keep_on(delta.device), delta, 0.0)

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return (orig_weight.float() + self.delta(module, active_adapter).float()).to(orig_weight.dtype)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(self.merge_safe(module, active_adapter, orig_weight))

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return (orig_weight.float() - self.delta(module, active_adapter).float()).to(orig_weight.dtype)

    def forward(self, module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        lora_a = module.lora_A[active_adapter].weight  # (r, in)
        lora_b = module.lora_B[active_adapter].weight  # (out, r)
        x = module.lora_dropout[active_adapter](x)
        scaling = module.scaling[active_adapter]
        if not self.masked:
            return result + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling
        return result + masked_lora_delta(x, lora_a, lora_b, self._keep_on(lora_a.device)) * scaling


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA linear layers by the name of the base module they wrap (as in `prunable_linears`)."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor], masked: bool) -> int:
    """Give every LoRA layer of the PEFT `model` its keep-mask; `masked`: train/evaluate with the masked delta.

    Returns the number of LoRA layers that got a mask. A LoRA layer on a matrix that was not pruned (no mask)
    stays vanilla: its delta changes no pattern. Raises ValueError for a mask of the wrong shape.
    """
    count = 0
    for name, layer in _lora_layers(model).items():
        keep = masks.get(name)
        if keep is None:
            continue
        weight = layer.get_base_layer().weight
        if tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: keep-mask {tuple(keep.shape)} != weight {tuple(weight.shape)}")
        for adapter in layer.lora_A:
            layer.lora_variant[adapter] = MaskedLoraVariant(keep.to(weight.device), masked)
        count += 1
    return count


@contextlib.contextmanager
def masked_forward(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[int]:
    """Within the block, the PEFT `model` computes the masked delta (what a masked-LoRA adapter was trained
    as); afterwards its LoRA layers are plain PEFT layers again, so PEFT's own merge/unload apply."""
    count = attach_masks(model, masks, masked=True)
    try:
        yield count
    finally:
        for layer in _lora_layers(model).values():
            for adapter in [a for a, v in layer.lora_variant.items() if isinstance(v, MaskedLoraVariant)]:
                del layer.lora_variant[adapter]


def _variants(model: nn.Module) -> list[MaskedLoraVariant]:
    return [v for layer in _lora_layers(model).values() for v in layer.lora_variant.values()
            if isinstance(v, MaskedLoraVariant)]


@contextlib.contextmanager
def deployable(model: nn.Module) -> Iterator[int]:
    """Within the block, every LoRA layer with a keep-mask adds the masked delta: the model computes what
    `merge --keep-sparsity` would write. Yields the number of masked layers; restores the previous setting."""
    variants = _variants(model)
    before = [v.masked for v in variants]
    for v in variants:
        v.masked = True
    try:
        yield len(variants)
    finally:
        for v, was in zip(variants, before, strict=True):
            v.masked = was


def evaluate_deployable(evaluate: Any, model: nn.Module, method: str) -> dict[str, Any]:
    """Metrics of the deployable model from `evaluate` (e.g. `Trainer.evaluate`), which is called with
    `metric_key_prefix`. For plain LoRA it runs twice: `eval_adapter_*` = the unmasked adapter (dense update),
    then `eval_*` inside `deployable(model)` = the masked-merged model; the other methods train the deployable
    model, so one run. `describes` says which model `eval_*` is."""
    metrics: dict[str, Any] = {}
    if method == "lora":
        metrics |= evaluate(metric_key_prefix="eval_adapter")
        with deployable(model):
            metrics |= evaluate(metric_key_prefix="eval")
    else:
        metrics |= evaluate(metric_key_prefix="eval")
    return metrics | {"describes": describes(method)}


# ---------------------------------------------------------------------------------------------------
# Sparse fine-tuning
# ---------------------------------------------------------------------------------------------------
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
    """The trained weights of a sparse fine-tuning run and their keep-masks (on the weights' device)."""

    params: dict[str, nn.Parameter]
    """Full module name -> the weight trained in place."""
    keep: dict[str, torch.Tensor]
    """Full module name -> keep-mask (bool, same shape and device as the weight)."""
    hooks: list[Any] = field(default_factory=list)

    @torch.no_grad()
    def remask(self) -> None:
        """Zero every pruned position (`masked_fill_` writes +0.0, never -0.0)."""
        for name, param in self.params.items():
            param.masked_fill_(~self.keep[name], 0.0)

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def memory(self) -> dict[str, int]:
        """What training these weights costs beyond inference: dense tensors, so every position counts."""
        trained = sum(p.numel() for p in self.params.values())
        kept = sum(int(k.sum()) for k in self.keep.values())
        elem = max((p.element_size() for p in self.params.values()), default=4)
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
        mask = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(weight.device, torch.bool)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{name}: keep-mask {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        weight.requires_grad_(True)
        params[name], keep[name] = weight, mask
        hooks.append(weight.register_hook(_mask_grad(mask)))
    training = SparseTraining(params, keep, hooks)
    training.remask()
    return training


class RemaskCallback(TrainerCallback):
    """Re-apply the keep-masks after every optimizer step (and before training, after a checkpoint load).

    `on_optimizer_step` runs once per optimizer step, after all accumulated micro-batches, on every rank.
    """

    def __init__(self, training: SparseTraining) -> None:
        self.training = training

    def on_train_begin(self, args, state, control, **kwargs):
        self.training.remask()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.training.remask()


SPARSE_MODEL_DIR = "model"
"""Where a sparse-ft run writes its deployable model inside the run directory."""


def save_sparse_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, pruned_dir: str | Path,
                      record: dict[str, Any] | None = None) -> list[str]:
    """Write a sparse-ft model as a pruned-model directory that `prunetune verify` and `evaluate` take:
    safetensors weights + config, the tokenizer, the pruned dir's masks (`prunetune/`) and `prune.json` (unchanged, so the
    mask digests still match) with `record` under `recovery`. Returns the file names written."""
    out_dir, pruned_dir = Path(out_dir), Path(pruned_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
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


@torch.no_grad()
def pattern_violations(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Names of the prunable linears with a non-zero weight where the keep-mask says pruned."""
    bad = []
    for name, module in prunable_linears(model).items():
        keep = masks.get(name)
        if keep is not None and bool((module.weight[~keep.to(module.weight.device)] != 0).any()):
            bad.append(name)
    return bad


@torch.no_grad()
def merge_deployable(peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The deployable sparse model of a LoRA/masked-LoRA `peft_model`: every delta masked by its keep-mask and
    merged (float32 math, PEFT's safe merge: refuses non-finite weights). Raises RuntimeError if a pruned
    weight ends up non-zero (a bug, not a user error)."""
    if not _variants(peft_model):
        attach_masks(peft_model, masks, masked=True)
    with deployable(peft_model):
        merged = peft_model.merge_and_unload(safe_merge=True)
    bad = pattern_violations(merged, masks)
    if bad:
        raise RuntimeError(f"masked merge left pruned weights non-zero in {bad[:3]}: this is a bug in prunetune")
    return merged


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def banner_lines(r: dict[str, Any]) -> list[str]:
    """Console lines for a method's banner record (`Prepared.banner` + `total`): what trains, what it costs."""
    method = r.get("method", "lora")
    total = r.get("total")
    of_all = f" of {total:,} params ({100 * r['trainable'] / total:.2f}%)" if total and r.get("trainable") else ""
    if method == "sparse-ft":
        return [
            f"Sparse fine-tuning of {r.get('modules')} pruned matrices ({','.join(r.get('targets', []))}): "
            f"{r.get('trained_params', 0):,} weights in the trained tensors{of_all}, {r.get('kept_params', 0):,} "
            "kept (trained), the rest pruned (held at exactly 0)",
            f"  memory beyond inference: AdamW state {_gib(r.get('optimizer_state_bytes', 0))} (2 fp32 values per "
            f"weight) + gradients {_gib(r.get('grad_bytes', 0))} + keep-masks {_gib(r.get('mask_bytes', 0))}",
        ]
    lines = [f"{'Masked LoRA' if method == 'masked-lora' else 'LoRA'} on {r.get('modules', '?')} modules "
             f"({','.join(r.get('targets', []))}): trainable params {r.get('trainable', 0):,}{of_all}; "
             f"AdamW state {_gib(r.get('optimizer_state_bytes', 0))}"]
    if method == "masked-lora":
        lines.append(f"  the update is masked by the pruned pattern in {r.get('masked_layers')} matrices: "
                     "training computes the deployable sparse model, merging is exact")
    else:
        lines.append("  the LoRA update is dense (weight back in every pruned position): perplexities are reported "
                     "twice, with the adapter and deployable (masked, what `merge` writes)")
    return lines


# ---------------------------------------------------------------------------------------------------
# One entry point for the engine
# ---------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The trainable model of a method, the callbacks it needs and what it costs."""

    model: nn.Module
    method: str
    callbacks: list[TrainerCallback]
    banner: dict[str, Any]
    sparse: SparseTraining | None = None


def prepare(model: nn.Module, method: str, masks: dict[str, torch.Tensor], *, lora_config: Any = None,
            sparse_targets: tuple[str, ...] | list[str] = (ALL_LINEAR,)) -> Prepared:
    """Make `model` trainable by `method`. lora/masked-lora need `lora_config` (a peft.LoraConfig)."""
    check_method(method)
    if method == "sparse-ft":
        sparse = prepare_sparse_ft(model, masks, sparse_targets)
        mem = sparse.memory()
        banner = {"method": method, "trainable": mem["trained_params"], "modules": len(sparse.params),
                  "targets": sorted({module_type(n) for n in sparse.params})} | mem
        return Prepared(model, method, [RemaskCallback(sparse)], banner, sparse)
    if lora_config is None:
        raise ValueError(f"method {method} needs a peft LoraConfig")
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    masked_layers = attach_masks(peft_model, masks, masked=method == "masked-lora")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    banner = {"method": method, "trainable": trainable, "masked_layers": masked_layers,
              "optimizer_state_bytes": ADAMW_STATE_BYTES * trainable}
    return Prepared(peft_model, method, [], banner)
