"""`run_prune(cfg)`: set up, calibrate and prune layer by layer, assert the pattern, save.

Output directory (self-describing): the pruned model and tokenizer (`save_pretrained`, safetensors),
`prunetune/masks.safetensors` (keep-masks, see `masks`; out of weight loaders' way, `rundir.META_DIR`),
`prune.json` (config, per-matrix target/achieved sparsity, pattern check, calibration hash, seed, timings, provenance, and with `eval` dense/pruned perplexity).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from prunetune.architecture import find_decoder_layers, prunable_linears
from prunetune.devices import default_device
from prunetune.fmt import fmt_ppl, hms
from prunetune.models import load_model
from prunetune.pruning.channels import permute_channels, save_permutation
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.console import progress_bar, sparsity_table
from prunetune.pruning.layers import capture_inputs, owl_targets, prune_layers
from prunetune.pruning.matrix import MatrixRecipe
from prunetune.pruning.precision import resolve_precision
from prunetune.pruning.setup import (
    OWNED,
    PruneSession,
    check_out,
    eval_tokens,
    input_paths,
    measure_ppl,
    peak_rss_mib,
    validate_against_model,
)
from prunetune.rundir import PRUNE_JSON, mask_digest, run_lock, save_masks, staged_output
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity.patterns import matrix_violations, sparsity_tolerance

FORMAT = "prunetune-prune/1"


def run_prune(cfg: PruneConfig, console: Console | None = None) -> Path:
    """Prune `cfg.model` into `cfg.out`; returns the output directory. Raises UserError for bad input."""
    console = console or Console()
    t_start = time.perf_counter()
    out, replace = check_out(cfg)  # before any work: a refused or unwritable --out fails in a second
    with _locked(out, console):
        session = setup(cfg, console)
        with progress_bar(console) as progress:
            eval_ids = evaluate_phase(session, progress, None, "dense") if cfg.eval else None
            inputs = capture_inputs(session, progress) if cfg.needs_calibration else None
            if cfg.owl:
                owl_targets(session, inputs, progress)
            if cfg.permutes:  # after OWL: the search uses each matrix's own target
                permute_channels(session, inputs, progress)
            prune_layers(session, inputs, progress)
            check_pattern(session)
            if cfg.eval:
                evaluate_phase(session, progress, eval_ids, "pruned")
        save(session, out, replace, t_start)
    console.print(sparsity_table(session.matrices))
    console.print(f"[green]Saved[/] pruned model, masks and prune.json to {out} (total {hms(session.timings['total_s'])})")
    return out


@contextmanager
def _locked(out: Path, console: Console) -> Iterator[None]:
    """One prune writes `out` at a time; a directory the lock had to create is removed again if the run fails."""
    created = not out.exists()
    try:
        with run_lock(out, "prunetune prune", log=console.print):
            yield
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


# ---- setup ----

def setup(cfg: PruneConfig, console: Console) -> PruneSession:
    """Load the model on CPU, find its decoder layers and prunable matrices, validate the config against it."""
    t = time.perf_counter()
    device = default_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device)
    model, tokenizer = load_model(cfg.model, dtype=precision.storage, device=None, log=console.print)
    model.config.use_cache = False
    prefix, layers = find_decoder_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_linears(model).items()}
    targets = {n: cfg.target_for(n) for n in shapes if not cfg.is_skipped(n)}
    validate_against_model(cfg, model, targets, shapes)
    recipe = MatrixRecipe(cfg.method, cfg.pattern_spec, cfg.resolved_compare, cfg.reconstruct, cfg.percdamp,
                          cfg.blocksize)
    session = PruneSession(cfg, model, tokenizer, prefix, list(layers), shapes, targets, device, precision, recipe)
    session.timings["load_s"] = time.perf_counter() - t
    session.record = {"format": FORMAT, "model": cfg.model, "method": cfg.method, "pattern": recipe.pattern.name,
                      "compare": recipe.compare, "seed": cfg.seed, "config": cfg.to_dict(),
                      "dtype": precision.record()}
    console.print(
        f"[bold]Pruning[/] {cfg.model} ({len(layers)} layers, {len(targets)}/{len(shapes)} matrices) | "
        f"method {cfg.method} | pattern {recipe.pattern.name} | sparsity "
        f"{recipe.pattern.fixed_sparsity or cfg.sparsity:g}{' + map' if cfg.sparsity_map else ''} | "
        f"compare {recipe.compare} | reconstruct {'on' if cfg.reconstruct else 'off'} | device {device}"
    )
    console.print(f"Precision: {precision.describe()}")
    return session


def evaluate_phase(s: PruneSession, progress: Progress, ids: torch.Tensor | None, which: str) -> torch.Tensor:
    """Perplexity of the model as it is now (`dense` before pruning, `pruned` after), into the record."""
    t = time.perf_counter()
    if ids is None:
        ids, s.record["eval"] = eval_tokens(s.cfg, s.tokenizer)
    with s.precision.autocast():
        result = measure_ppl(s.model, ids, s.cfg, s.device, progress, f"{which} perplexity")
    s.record[f"{which}_perplexity"] = result["perplexity"]
    s.record["eval"][which] = result
    s.timings[f"{which}_eval_s"] = time.perf_counter() - t
    progress.console.print(f"{which.capitalize()} perplexity: {fmt_ppl(result['perplexity'])} ({result['windows']} windows)")
    return ids


# ---- assert, save ----

def check_pattern(s: PruneSession) -> None:
    """The pattern and sparsity are asserted against the model's actual weights, not only printed."""
    linears = prunable_linears(s.model)
    violations = {}
    for name, keep in s.masks.items():
        target, pattern = s.targets[name], s.recipe.pattern.at(s.targets[name])
        problems = matrix_violations(linears[name].weight, keep, pattern, target, s.recipe.compare)
        if problems:
            violations[name] = problems
    numel = {n: k.numel() for n, k in s.masks.items()}
    total = sum(numel.values())
    achieved = sum(float((~k).sum()) for k in s.masks.values()) / total
    target = sum(s.targets[n] * numel[n] for n in numel) / total
    slack = sum(sparsity_tolerance(tuple(k.shape), s.recipe.pattern, s.recipe.compare) * numel[n]
                for n, k in s.masks.items()) / total
    if abs(achieved - target) > slack + 1e-9:  # overall: what each matrix may round, summed, and no more
        violations["overall"] = [f"achieved sparsity {achieved:.4f} is not the target {target:.4f}"]
    s.record["pattern_check"] = {"ok": not violations, "checked": len(s.masks), "violations": violations}
    if violations:
        raise RuntimeError(f"pruning produced an invalid pattern (a bug): {json.dumps(violations)[:2000]}")


def save(s: PruneSession, out: Path, replace: bool, t_start: float) -> None:
    """Model, tokenizer, masks and prune.json into a staging directory, then swapped into `out`: an interrupted
    save never leaves a half-written model."""
    t = time.perf_counter()
    pattern = s.recipe.pattern
    with staged_output(out, inputs=input_paths(s.cfg), overwrite=replace, owned=OWNED,
                       command="prunetune prune") as staging:
        s.model.save_pretrained(staging)
        s.tokenizer.save_pretrained(staging)
        pattern_meta = {"pattern": pattern.name, "compare": s.recipe.compare, "method": s.cfg.method}
        if pattern.kind == "block":
            pattern_meta["tile"] = [pattern.h, pattern.w]
        save_masks(s.masks, staging, pattern_meta)
        if s.permutation is not None:
            save_permutation(s.permutation, staging)
        s.timings["save_s"] = time.perf_counter() - t
        s.timings["total_s"] = time.perf_counter() - t_start
        write_json(staging / PRUNE_JSON, _final_record(s, sorted({p.name for p in staging.iterdir()} | {PRUNE_JSON})))


def _final_record(s: PruneSession, files: list[str]) -> dict[str, Any]:
    record = s.record
    record.setdefault("calibration", None)
    record["matrices"] = s.matrices
    record["mask_digests"] = {name: mask_digest(keep) for name, keep in s.masks.items()}
    record["skipped"] = sorted(n for n in s.shapes if n not in s.targets)
    total = sum(r["shape"][0] * r["shape"][1] for r in s.matrices.values())
    record["overall"] = {
        "target": sum(r["target"] * r["shape"][0] * r["shape"][1] for r in s.matrices.values()) / total,
        "achieved": sum(r["achieved"] * r["shape"][0] * r["shape"][1] for r in s.matrices.values()) / total,
        "params": total,
    }
    record["timings"] = {k: round(v, 3) for k, v in s.timings.items()}
    record["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if s.device.startswith("cuda"):
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["provenance"] = provenance()
    record["files"] = files
    return record
