"""`--method auto`: which recovery method a pruned model gets, and the reason the banner prints.

Measured on SmolLM2-135M at 50% 16x16 blocks (deployable test perplexity, 32k tokens, bench/RESULTS.md):
sparse-ft 285 vs masked LoRA 410 vs the Wanda recipe (LoRA q,v, merged masked) 3,261. Sparse-ft trains every
kept weight, so its optimizer state and gradients scale with the model: where they would not fit the free memory
(a 7B model needs ~75 GiB for them) masked LoRA keeps the pattern at adapter cost. Other patterns keep LoRA, the
recipe of the Wanda code base, until measured.
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


def choose(prune_json: Any, free_bytes: int | None = None) -> tuple[str, str]:
    """(method name, why) for a pruned model described by its `prune.json` record."""
    pattern = pattern_of(prune_json)
    if not pattern.startswith("block"):
        why = f"a {pattern} model" if pattern else "a model without a prune record"
        return "lora", f"lora: auto for {why} (--method sparse-ft / masked-lora keep it sparse)"
    need = (ADAMW_STATE_BYTES + 4) * trained_weights(prune_json)  # two float32 moments + a float32 gradient
    if free_bytes is not None and need > SPARSE_FT_MEMORY_SHARE * free_bytes:
        return ("masked-lora",
                f"masked-lora: auto for a {pattern} model; sparse-ft would need ~{need / 2**30:.1f} GiB of optimizer "
                f"state and gradients, {free_bytes / 2**30:.1f} GiB free (--method sparse-ft to insist)")
    return "sparse-ft", f"sparse-ft: auto for a {pattern} model (recovers most per token at block sparsity)"
