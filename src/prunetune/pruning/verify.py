"""Re-check a pruned model directory against its saved masks and pattern (`prunetune verify`).

Reads the weights straight from the safetensors files (no model is built), so it is fast and checks exactly
what is on disk. Unreadable input (missing or truncated files, a prune.json that is not a prune record) is a
UserError (exit 2); a readable directory that breaks its pattern is a failed `VerifyResult` (exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from prunetune.errors import UserError
from prunetune.oserrors import check_links
from prunetune.rundir import (
    MASKS_FILE,
    PRUNE_JSON,
    check_complete,
    check_safetensors,
    load_masks,
    mask_digest,
    masks_file,
    read_json,
)
from prunetune.sparsity.patterns import Pattern, matrix_violations, parse_pattern

_FIX = "re-run `prunetune prune` to write it again"


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problems: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Record:
    """The parts of prune.json verify checks against."""

    pattern: Pattern
    compare: str
    matrices: dict[str, dict[str, Any]]
    digests: dict[str, str]


def _read_record(path: Path) -> _Record:
    record = read_json(path, PRUNE_JSON, _FIX)
    try:
        matrices = record["matrices"]
        rec = _Record(parse_pattern(record["pattern"]), str(record["compare"]), matrices,
                      record.get("mask_digests", {}))
        for info in matrices.values():
            float(info["target"]), float(info["achieved"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path} is not a complete prune record ({type(err).__name__}: {err}); {_FIX}") from None
    return rec


def _read_masks(model_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path, "masks file")
    try:
        return load_masks(model_dir)
    except (ValueError, KeyError, OSError, SafetensorError) as err:
        raise UserError(f"masks file {str(path)!r} is unreadable ({str(err)[:200]}); {_FIX}") from None


def _weights(model_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    wanted = {f"{n}.weight": n for n in names}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        if path.name == MASKS_FILE:  # a directory written before the masks moved to prunetune/
            continue
        check_safetensors(path, "weights file")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if key in wanted:
                        found[wanted[key]] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"weights file {str(path)!r} is unreadable ({str(err)[:200]}); {_FIX}") from None
    return found


def _check_matrix(name: str, keep: torch.Tensor, weight: torch.Tensor | None, rec: _Record) -> list[str]:
    issues = []
    if rec.digests.get(name) != mask_digest(keep):
        issues.append("mask differs from the one recorded at pruning time (digest mismatch)")
    if weight is None:
        return [*issues, "weight missing from the model files"]
    info = rec.matrices[name]
    target = float(info["target"])
    issues += matrix_violations(weight, keep, rec.pattern.at(target), target, rec.compare)
    achieved = 1.0 - float(keep.float().mean())
    if abs(achieved - float(info["achieved"])) > 1e-9:
        issues.append(f"mask sparsity {achieved:.4f} != recorded {float(info['achieved']):.4f}")
    return issues


def verify_dir(model_dir: str | Path) -> VerifyResult:
    """Check masks against prune.json (digests, targets), the pattern, and the weights on disk."""
    model_dir = check_links(Path(model_dir).expanduser(), "MODEL_DIR")
    check_complete(model_dir, "MODEL_DIR")
    masks_path = masks_file(model_dir)
    if not (model_dir / PRUNE_JSON).is_file() or masks_path is None:
        raise UserError(f"{str(model_dir)!r} is not a pruned model directory (needs {PRUNE_JSON} and "
                        f"prunetune/{MASKS_FILE}); "
                        "make one with `prunetune prune`")
    rec = _read_record(model_dir / PRUNE_JSON)
    masks = _read_masks(model_dir, masks_path)
    problems: dict[str, list[str]] = {}
    for name in sorted(set(rec.matrices) - set(masks)):
        problems[name] = ["listed in prune.json but missing from masks.safetensors"]
    for name in sorted(set(masks) - set(rec.matrices)):
        problems[name] = ["in masks.safetensors but not listed in prune.json"]
    weights = _weights(model_dir, set(masks))
    for name, keep in masks.items():
        if name in rec.matrices and (issues := _check_matrix(name, keep, weights.get(name), rec)):
            problems[name] = issues
    return VerifyResult(not problems, len(masks), problems)
