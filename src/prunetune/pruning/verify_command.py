"""`prunetune verify DIR`: re-check a pruned model directory against its saved masks and pattern.

Reads the weights straight from the safetensors files (no model is built), so it is fast and checks exactly
what is on disk. Exit 0 when every check passes, 1 on any violation (2 for unusable input).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors import safe_open

from prunetune.errors import UserError
from prunetune.rundir import MASKS_FILE, PRUNE_JSON, load_masks, mask_digest
from prunetune.pruning.patterns import matrix_violations, parse_pattern


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problems: dict[str, list[str]] = field(default_factory=dict)


def _weights(model_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    wanted = {f"{n}.weight": n for n in names}
    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        if path.name == MASKS_FILE:
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key in wanted:
                    found[wanted[key]] = f.get_tensor(key)
    return found


def verify_dir(model_dir: str | Path) -> VerifyResult:
    """Check masks against prune.json (digests, targets), the pattern, and the weights on disk."""
    model_dir = Path(model_dir)
    record_path = model_dir / PRUNE_JSON
    if not record_path.is_file() or not (model_dir / MASKS_FILE).is_file():
        raise UserError(f"{str(model_dir)!r} is not a pruned model directory (needs {PRUNE_JSON} and {MASKS_FILE}); "
                        "make one with `prunetune prune`")
    record = json.loads(record_path.read_text())
    try:
        masks = load_masks(model_dir)
    except (ValueError, KeyError, OSError) as err:
        return VerifyResult(False, 0, {MASKS_FILE: [f"unreadable: {err}"]})
    pattern = parse_pattern(record["pattern"])
    compare = record["compare"]
    matrices = record["matrices"]
    digests = record.get("mask_digests", {})
    problems: dict[str, list[str]] = {}
    for name in sorted(set(matrices) - set(masks)):
        problems[name] = ["listed in prune.json but missing from masks.safetensors"]
    for name in sorted(set(masks) - set(matrices)):
        problems[name] = ["in masks.safetensors but not listed in prune.json"]
    weights = _weights(model_dir, set(masks))
    for name, keep in masks.items():
        if name not in matrices:
            continue
        issues = []
        if digests.get(name) != mask_digest(keep):
            issues.append("mask differs from the one recorded at pruning time (digest mismatch)")
        if name not in weights:
            issues.append("weight missing from the model files")
        else:
            issues += matrix_violations(weights[name], keep, pattern, matrices[name]["target"], compare)
            achieved = 1.0 - float(keep.float().mean())
            if abs(achieved - matrices[name]["achieved"]) > 1e-9:
                issues.append(f"mask sparsity {achieved:.4f} != recorded {matrices[name]['achieved']:.4f}")
        if issues:
            problems[name] = issues
    return VerifyResult(not problems, len(masks), problems)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="pruned model directory written by `prunetune prune`")


def main(args: argparse.Namespace) -> int:
    console = Console()
    result = verify_dir(args.dir)
    if result.ok:
        console.print(f"[green]✅ {args.dir}: {result.checked} matrices match their masks and pattern")
        return 0
    console.print(f"[red]❌ {args.dir}: {len(result.problems)} of {result.checked} matrices fail verification")
    for name, issues in list(result.problems.items())[:50]:
        for issue in issues:
            console.print(f"  {name}: {issue}")
    return 1
