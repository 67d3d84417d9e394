"""`--method masked-lora`: a LoRA adapter whose update keeps the pruned pattern.

The forward adds `keep * (s * B @ A)`: the gradient reaches only kept positions, what trains is the deployable
sparse model, and merging with the keep-mask is exact (merged == unmerged). It costs a full (out, in) product
per adapted matrix per step (about half plain LoRA's speed on CPU), and its adapter state is tiny, so it is
`auto`'s choice where sparse-ft's optimizer state would not fit.
"""

from __future__ import annotations

from prunetune.recovery.adapter import AdapterMethod


class MaskedLoRA(AdapterMethod):
    def banner_lines(self, r: dict) -> list[str]:
        return [*super().banner_lines(r),
                f"  the update is masked by the pruned pattern in {r.get('masked_layers')} matrices: training "
                "computes the deployable sparse model, merging is exact"]


METHOD = MaskedLoRA("masked-lora", masked=True, summary="masked LoRA (the update keeps the pattern; exact merge)")
