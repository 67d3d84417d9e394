"""`--method lora`: plain PEFT LoRA on the frozen pruned base (the Wanda code base's recipe).

Its update `s * B @ A` is dense: the trained model has weight back in every pruned position, so it is not the
model a user deploys. The deployable model masks the update by the pattern (`merge --keep-sparsity`, the
default); every evaluation reports both, the deployable one as the result.
"""

from __future__ import annotations

from prunetune.recovery.adapter import AdapterMethod
from prunetune.recovery.base import Evaluation
from prunetune.recovery.lora_layers import deployable


class LoRA(AdapterMethod):
    def evaluations(self) -> list[Evaluation]:
        # As trained (dense update) first, then the deployable model: the same adapter, its delta masked.
        return [Evaluation("adapter", self.describes(False)), Evaluation("deployable", self.describes(True), deployable)]

    def describes(self, deployable: bool = True) -> str:
        if not deployable:
            return "pruned model + LoRA adapter (dense update: weight back in every pruned position; not deployable)"
        return super().describes(True)

    def banner_lines(self, r: dict) -> list[str]:
        return [*super().banner_lines(r),
                "  the LoRA update is dense (weight back in every pruned position): perplexities are reported "
                "twice, with the adapter and deployable (masked, what `merge` writes)"]


METHOD = LoRA("lora", masked=False, summary="LoRA (dense update, merged with the pattern kept)")
