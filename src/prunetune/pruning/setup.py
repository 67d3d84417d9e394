"""What the phases of a prune run share (`PruneSession`), the data side (calibration windows, the perplexity set),
validating the config against the model, and the memory figures for the console and prune.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from prunetune.architecture import module_type
from prunetune.data import load_text, tokenize
from prunetune.errors import UserError
from prunetune.models import context_length
from prunetune.pruning import calibration as cal
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.layer_store import LayerStore
from prunetune.pruning.matrix import MatrixRecipe
from prunetune.pruning.precision import Precision
from prunetune.rundir import PRUNE_JSON, check_output, check_space, is_ours, read_json, weights_bytes


@dataclass
class PruneSession:
    """What setup produced and the phases share: the model's layers (`store`), the data, and the run record."""

    cfg: PruneConfig
    store: LayerStore
    tokenizer: Any
    shapes: dict[str, tuple[int, int]]
    targets: dict[str, float]
    """Sparsity per pruned matrix (full module name); skipped modules are absent."""
    device: str
    precision: Precision
    recipe: MatrixRecipe
    windows: torch.Tensor | None = None
    """The calibration windows (nsamples, seqlen); None when the method needs no calibration."""
    eval_ids: torch.Tensor | None = None
    """The perplexity text's token stream (with `eval`)."""
    record: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    """Bool keep-masks of the layer being pruned; once the layer is done they are packed into `packed`."""
    packed: dict[str, tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=dict)
    """Every pruned matrix's keep-mask as stored (one bit per weight or per tile) and its metadata entry."""
    digests: dict[str, str] = field(default_factory=dict)
    violations: dict[str, list[str]] = field(default_factory=dict)
    """Pattern problems found when each layer was done (empty when the pattern holds)."""
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)
    permutation: Any = None
    """The channel permutation applied before the walk (`channels.permute_channels`), saved with the masks."""
    mark: MemoryMark | None = None
    """Resident memory just before the model loaded (the console and prune.json report what it added)."""

    @property
    def model(self) -> nn.Module:
        return self.store.model

    @property
    def prefix(self) -> str:
        return self.store.prefix

    @property
    def layers(self) -> list[nn.Module]:
        return self.store.layers

    @property
    def pattern_meta(self) -> dict[str, Any]:
        """The pattern as the masks file records it (with the tile of block patterns: one bit per tile)."""
        pattern = self.recipe.pattern
        meta: dict[str, Any] = {"pattern": pattern.name, "compare": self.recipe.compare, "method": self.cfg.method}
        if pattern.kind == "block":
            meta["tile"] = [pattern.h, pattern.w]
        return meta


def input_paths(cfg: PruneConfig) -> list[Path]:
    """Local files or directories the run reads (model, calibration/eval files): --out may not overlap them."""
    specs = (cfg.model, cfg.calib_dataset, cfg.eval_dataset if cfg.eval else None)
    return [Path(s).expanduser() for s in specs if s and Path(s).expanduser().exists()]


def check_out(cfg: PruneConfig) -> tuple[Path, bool]:
    """(resolved --out, whether to replace what a previous prune wrote there), or a UserError before any work.

    Rerunning the same config into its own output is allowed without --overwrite (it rewrites the same model);
    a different pruned model there needs --overwrite; anything prunetune did not write is never replaced.
    """
    out = Path(cfg.out).expanduser()
    replace = cfg.overwrite
    if out.is_dir() and (out / PRUNE_JSON).is_file() and is_ours(out) and not replace:
        old = read_json(out / PRUNE_JSON, PRUNE_JSON)
        old = old.get("config", {}) if isinstance(old, dict) else {}
        if {k: old.get(k) for k in cfg.identity()} != json.loads(json.dumps(cfg.identity())):
            raise UserError(f"--out {str(out)!r} already holds a different pruned model (prune.json differs); "
                            "pass --overwrite to replace it, or choose another --out")
        replace = True
    out = check_output(out, inputs=input_paths(cfg), overwrite=replace)
    # The pruned model is at least half the dense one's bytes (float32 stored as bf16 at most halves it).
    check_space(out, weights_bytes(cfg.model) // 2, doing="the pruned model")
    return out, replace


def eval_tokens(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    text = load_text(cfg.eval_dataset, cfg.eval_split, cfg.data_dir)
    ids = tokenize(text, tokenizer).input_ids
    return ids, {"dataset": cfg.eval_dataset, "split": text.split, "origin": text.origin,
                 "fingerprint": text.fingerprint, "seqlen": cfg.eval_seqlen or cfg.seqlen,
                 "max_windows": cfg.eval_max_windows}


def calibration_windows(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    """(nsamples, seqlen) token windows from the calibration corpus' train split, and their record."""
    text = load_text(cfg.calib_dataset, "train", cfg.data_dir)
    tokens = tokenize(text, tokenizer)
    try:
        windows = cal.calibration_windows(tokens.input_ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    except ValueError:
        raise UserError(
            f"calibration data {cfg.calib_dataset!r} (train) has {tokens.input_ids.numel()} tokens, not more than "
            f"--seqlen {cfg.seqlen}; lower --seqlen or use a larger --calib-dataset"
        ) from None
    info = {"dataset": cfg.calib_dataset, "split": "train", "origin": text.origin, "fingerprint": text.fingerprint,
            "note": text.note, "tokens": int(tokens.input_ids.numel()), "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "windows_sha256": cal.windows_hash(windows)}
    return windows, info


def validate_context(cfg: PruneConfig, config) -> None:
    """The window lengths against the model's context (its config is enough: checked before any weight loads)."""
    ctx = context_length(config)
    if cfg.needs_calibration and ctx is not None and cfg.seqlen > ctx:
        raise UserError(f"--seqlen {cfg.seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    if cfg.eval and ctx is not None and (cfg.eval_seqlen or cfg.seqlen) > ctx:
        raise UserError(f"--eval-seqlen {cfg.eval_seqlen or cfg.seqlen} exceeds the model's context of {ctx}; lower it")


def validate_against_model(cfg: PruneConfig, targets: dict[str, float], shapes: dict[str, tuple]) -> None:
    """The checks that need the model's modules: names in --sparsity-map/--skip, pattern fit."""
    types = {module_type(n) for n in shapes}
    for key in (*cfg.sparsity_map, *cfg.skip):
        if "*" not in key and "?" not in key and key not in types and key not in shapes:
            raise UserError(f"module {key!r} (in --sparsity-map/--skip) matches nothing; module types here: {', '.join(sorted(types))}")
    if not targets:
        raise UserError("--skip leaves no module to prune; skip fewer modules")
    pattern = cfg.pattern_spec
    pruned = [s for n, s in shapes.items() if n in targets]
    if pattern.kind == "block":
        small = min(pruned, key=lambda s: s[0] * s[1])
        if pattern.h > min(s[0] for s in pruned) or pattern.w > min(s[1] for s in pruned):
            raise UserError(f"--pattern {pattern.name} does not fit the smallest matrix {small[0]}x{small[1]}; use a smaller block")
    if pattern.kind == "nm":
        bad = sorted({s[1] for s in pruned if s[1] % pattern.m})
        if bad:
            raise UserError(f"--pattern {pattern.name}: input widths {bad} do not divide into groups of {pattern.m}; "
                            "pick an M that divides them or --skip those modules")


def rss_mib() -> float:
    """Resident memory of this process now."""
    return psutil.Process().memory_info().rss / 2**20


class MemoryMark:
    """Resident memory from a mark on (set just before the model loads). On Linux the process's high-water mark
    is reset at the mark (`/proc/self/clear_refs`), so the peak after it is the model's phase alone, not an
    earlier peak (a GGUF conversion, tokenizing the corpus); elsewhere it is the whole process's peak."""

    def __init__(self) -> None:
        self.earlier_peak = peak_rss_mib()
        self.rss = rss_mib()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False

    def record(self) -> dict[str, float | bool]:
        peak = peak_rss_mib()
        return {"rss_before_model_mib": round(self.rss, 1), "peak_rss_mib": round(peak, 1),
                "model_mib": round(peak - self.rss, 1), "peak_is_since_model": self.reset,
                "process_peak_rss_mib": round(max(peak, self.earlier_peak), 1)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # Windows: current RSS is the best available
        return psutil.Process().memory_info().rss / 2**20
