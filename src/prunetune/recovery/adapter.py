"""What the two LoRA methods share: the PEFT wrapping of the pruned model, the adapter directory a run leaves
(PEFT's files + prunetune's record of its base and the base's digest, which `merge` checks), loading a
checkpoint's adapter weights, and the next steps (evaluate with the adapter, merge keeping the pattern).

They differ in one thing, `masked`: masked LoRA trains `keep * (s * B @ A)` (merging is exact); plain LoRA trains
the dense update, so its deployable model (the update masked by the pattern) is measured as a second pass.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune import sharded
from prunetune.architecture import module_type, prunable_linears
from prunetune.errors import UserError
from prunetune.recovery.base import ADAMW_STATE_BYTES, Evaluation, Prepared, RecoverySettings, gib
from prunetune.recovery.lora_layers import attach_masks, masked_forward
from prunetune.rundir import ADAPTER_DIR, ADAPTER_WEIGHTS, write_adapter_meta

ALL_LINEAR = "all-linear"


def lora_config(model: nn.Module, settings: RecoverySettings) -> Any:
    """The PEFT LoraConfig of `settings`, its target module types checked against `model`."""
    from peft import LoraConfig

    targets: str | list[str] = ALL_LINEAR if tuple(settings.lora_targets) == (ALL_LINEAR,) else list(settings.lora_targets)
    available = sorted({module_type(name) for name in prunable_linears(model)})
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise UserError(
                f"--lora-targets {','.join(unknown)} not found in this model; choose from: {', '.join(available)} "
                f"or {ALL_LINEAR}"
            )
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


class AdapterMethod:
    """A LoRA adapter on the frozen pruned base; `masked` says whether its update keeps the pattern."""

    result_dir = ADAPTER_DIR
    trains_base = False
    makes_adapter = True
    checkpoint_weights = (ADAPTER_WEIGHTS,)

    def __init__(self, name: str, masked: bool, summary: str) -> None:
        self.name, self.masked, self.summary = name, masked, summary
        self.exact_merge = masked

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], settings: RecoverySettings) -> Prepared:
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(model, settings))
        masked_layers = attach_masks(peft_model, masks, masked=self.masked)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        modules = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
        banner = {"method": self.name, "trainable": trainable, "masked_layers": masked_layers, "modules": modules,
                  "targets": list(settings.lora_targets), "optimizer_state_bytes": ADAMW_STATE_BYTES * trainable}
        return Prepared(peft_model, self.name, [], banner)

    def load_checkpoint(self, model: nn.Module, checkpoint: Path) -> bool:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = Path(checkpoint) / ADAPTER_WEIGHTS
        if not weights.is_file():
            return False
        set_peft_model_state_dict(model, load_file(str(weights)))
        return True

    def save_result(self, trainer: Any, out_dir: Path, pruned_dir: Path, base_model: str | None,
                    record: dict[str, Any], base_digest: str, is_main: bool) -> None:
        if getattr(trainer, "is_fsdp_enabled", False):  # every rank takes part in gathering the adapter
            state = sharded.full_state_dict(trainer.model, trainable_only=True)
            if is_main:
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(out_dir), state_dict=state)
                trainer.processing_class.save_pretrained(str(out_dir))
        else:
            trainer.save_model(str(out_dir))  # every rank: a model sharded at load gathers its state here
        if is_main:
            write_adapter_meta(out_dir, pruned_model=pruned_dir, base_model=base_model, digest=base_digest, **record)

    def attach(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
        return attach_masks(peft_model, masks, masked=self.masked)

    @contextlib.contextmanager
    def unmerged(self, peft_model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[Any]:
        # A masked-LoRA adapter was trained with its delta masked: its unmerged model is that one, not PEFT's
        # plain (dense-update) forward, so merged == unmerged is the check that the merge is exact.
        with masked_forward(peft_model, masks) if self.masked else contextlib.nullcontext() as count:
            yield count

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation("deployable", self.describes(True))]

    def describes(self, deployable: bool = True) -> str:
        return "deployable sparse model (LoRA delta masked by the pruned pattern = the merged model)"

    def banner_lines(self, r: dict[str, Any]) -> list[str]:
        total = r.get("total")
        of_all = f" of {total:,} params ({100 * r['trainable'] / total:.2f}%)" if total and r.get("trainable") else ""
        return [f"{'Masked LoRA' if self.masked else 'LoRA'} on {r.get('modules', '?')} modules "
                f"({','.join(r.get('targets', []))}): trainable params {r.get('trainable', 0):,}{of_all}; "
                f"AdamW state {gib(r.get('optimizer_state_bytes', 0))}"]

    def next_steps(self, result: Path, pruned: Path, run_out: Path, data_flag: str) -> list[tuple[str, str]]:
        merged = shlex.quote(str(run_out / "merged"))
        quoted = shlex.quote(str(result))
        return [
            ("perplexity of the recovered model",
             f"prunetune evaluate --model {shlex.quote(str(pruned))} --adapter {quoted}{data_flag}"),
            ("merge the adapter, keeping the sparsity", f"prunetune merge --adapter {quoted} --out {merged}"),
        ]
