"""What a pruned-model directory says about itself (`prune.json`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.errors import UserError
from prunetune.fmt import to_float
from prunetune.rundir.names import PRUNE_JSON
from prunetune.rundir.reading import read_json


@dataclass(frozen=True)
class PrunedInfo:
    path: Path
    base_model: str | None
    """The dense model the pruned one came from (`prune.json` `model`): the teacher and the base spec."""
    pruned_perplexity: float | None
    dense_perplexity: float | None
    pruning: str | None
    """One-line description of how it was pruned (method pattern sparsity)."""
    prune_json: dict[str, Any]


def prune_config(prune_json: Any) -> dict[str, Any]:
    """The prune settings inside a `prune.json` record (its `config`; records of old versions were the settings
    themselves); {} for anything else."""
    if not isinstance(prune_json, dict):
        return {}
    cfg = prune_json.get("config", prune_json)
    return cfg if isinstance(cfg, dict) else {}


def read_pruned(path: str | Path) -> PrunedInfo:
    """What `prune.json` says about a pruned model directory (all None for a plain model dir)."""
    path = Path(path).expanduser()
    meta: dict[str, Any] = {}
    if (path / PRUNE_JSON).is_file():
        meta = read_json(path / PRUNE_JSON, PRUNE_JSON, "re-run `prunetune prune`")
        if not isinstance(meta, dict):
            raise UserError(f"{path / PRUNE_JSON} is not a prune record (a JSON object); re-run `prunetune prune`")
    cfg = prune_config(meta)
    parts = [str(cfg[k]) for k in ("method", "pattern", "sparsity") if cfg.get(k) is not None]
    base = meta.get("model") or cfg.get("model")
    return PrunedInfo(path, str(base) if base else None, to_float(meta.get("pruned_perplexity")),
                      to_float(meta.get("dense_perplexity")), " ".join(parts) or None, meta)
