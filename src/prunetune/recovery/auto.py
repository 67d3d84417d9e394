"""`--method auto`: which recovery method a pruned model gets, and the reason the banner prints.

Measured on SmolLM2-135M at 50% 16x16 blocks (deployable test perplexity, 32k tokens, bench/RESULTS.md):
sparse-ft 285 vs masked LoRA 410 vs the Wanda recipe (LoRA q,v, merged masked) 3,261. Sparse-ft trains every
kept weight, so its optimizer state and gradients scale with the model: where they would not fit the free memory
(a 7B model needs ~75 GiB for them) masked LoRA keeps the pattern at adapter cost. Under FSDP2 each GPU holds 1/N
of them, so sparse-ft is chosen when they fit across the GPUs of the run. Other patterns keep LoRA, the recipe of
the Wanda code base, until measured.
"""

from __future__ import annotations

import math
from typing import Any

from prunetune.recovery.base import ADAMW_STATE_BYTES

# Share of the free memory that auto lets sparse-ft's optimizer state and gradients take (activations need the rest).
SPARSE_FT_MEMORY_SHARE = 0.6


def pattern_of(prune_json: Any) -> str:
    """The pattern a `prune.json` record names ('' without one)."""
    if not isinstance(prune_json, dict):
        return ""
    cfg = prune_json.get("config", prune_json)
    return str((cfg if isinstance(cfg, dict) else {}).get("pattern") or "")


def trained_weights(prune_json: Any) -> int:
    """How many weights the pruned matrices hold (what sparse-ft would train), from `prune.json`."""
    matrices = prune_json.get("matrices", {}) if isinstance(prune_json, dict) else {}
    return sum(math.prod(m.get("shape", (0,))) for m in matrices.values() if isinstance(m, dict))


def choose(prune_json: Any, free_bytes: int | None = None, shards: int = 1, devices: int = 1) -> tuple[str, str]:
    """(method name, why) for a pruned model described by its `prune.json` record.

    `free_bytes` is one device's free memory. `shards`: the processes FSDP2 shards the run over (each holds 1/N
    of the optimizer state and gradients); `devices`: the GPUs visible to a run that is not sharded, for the hint
    that sparse-ft would fit across them under FSDP2."""
    pattern = pattern_of(prune_json)
    if not pattern.startswith("block"):
        why = f"a {pattern} model" if pattern else "a model without a prune record"
        return "lora", f"lora: auto for {why} (--method sparse-ft / masked-lora keep it sparse)"
    need = (ADAMW_STATE_BYTES + 4) * trained_weights(prune_json)  # two float32 moments + a float32 gradient
    per_device = need / max(shards, 1)
    across = f" across {shards} GPUs under FSDP2" if shards > 1 else ""
    if free_bytes is not None and per_device > SPARSE_FT_MEMORY_SHARE * free_bytes:
        hint = ""
        if shards == 1 and devices > 1 and need / devices <= SPARSE_FT_MEMORY_SHARE * free_bytes:
            hint = (f"; it would fit across the {devices} visible GPUs under FSDP2: accelerate launch --config_file "
                    f"configs/accelerate/fsdp2-{devices}gpu.yaml -m prunetune finetune ...")
        return ("masked-lora",
                f"masked-lora: auto for a {pattern} model; sparse-ft would need ~{per_device / 2**30:.1f} GiB of "
                f"optimizer state and gradients per GPU{across}, {free_bytes / 2**30:.1f} GiB free{hint} "
                "(--method sparse-ft to insist)")
    fits = f", ~{per_device / 2**30:.1f} GiB of its state per GPU{across}" if free_bytes is not None and shards > 1 else ""
    return "sparse-ft", f"sparse-ft: auto for a {pattern} model (recovers most per token at block sparsity{fits})"
