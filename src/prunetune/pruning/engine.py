"""`run_prune(cfg)`: load, calibrate layer by layer, score, mask, (reconstruct), assert the pattern, save.

Output directory (self-describing): the pruned model and tokenizer (`save_pretrained`, safetensors),
`masks.safetensors` (keep-masks, see `masks`), `prune.json` (config, per-matrix target/achieved sparsity,
pattern check, calibration hash, seed, timings, provenance, and with `eval` dense/pruned perplexity).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn

from prunetune.architecture import find_decoder_layers, linear_modules, module_type, prunable_linears
from prunetune.data import load_text, tokenize
from prunetune.errors import UserError
from prunetune.evaluate import perplexity
from prunetune.models import context_length, load_model, parse_dtype
from prunetune.pruning import calibration as cal
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.masks import MASKS_FILE, PRUNE_JSON, mask_digest, save_masks
from prunetune.pruning.patterns import make_mask, matrix_violations
from prunetune.pruning.reconstruct import reconstruct
from prunetune.pruning.scores import magnitude_scores, obs_saliency, wanda_scores
from prunetune.pruning.sparsegpt import damped, inverse_cholesky_upper, sparsegpt_prune
from prunetune.runinfo import provenance, write_json

FORMAT = "prunetune-prune/1"
STAGING_PREFIX = ".staging-"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- output directory safety ----

def check_out_dir(cfg: PruneConfig) -> Path:
    """Refuse an output directory holding a different model or other files unless `overwrite`; never delete
    anything but the model files a previous prune wrote there."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    # `.staging-*` directories are what an interrupted save of ours leaves behind; they do not count as content.
    if not out.is_dir() or not any(not p.name.startswith(STAGING_PREFIX) for p in out.iterdir()):
        return out
    previous = out / PRUNE_JSON
    if previous.is_file():
        try:
            old = json.loads(previous.read_text()).get("config", {})
        except (OSError, json.JSONDecodeError):
            old = {}
        same = {k: old.get(k) for k in cfg.identity()} == json.loads(json.dumps(cfg.identity()))
        if same or cfg.overwrite:
            return out
        raise UserError(
            f"--out {str(out)!r} already holds a different pruned model (prune.json differs); "
            "pass --overwrite to replace it, or choose another --out"
        )
    if cfg.overwrite:
        return out
    raise UserError(
        f"--out {str(out)!r} is not empty and holds no prunetune output; choose an empty or new directory "
        "(or pass --overwrite to write into it; other files are left alone)"
    )


def _install(staging: Path, out: Path) -> list[str]:
    """Move staged files into `out`, removing stale model shards of a previous prune first."""
    if (out / PRUNE_JSON).is_file():
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
    names = []
    for item in sorted(staging.iterdir()):
        os.replace(item, out / item.name)
        names.append(item.name)
    staging.rmdir()
    return names


# ---- console ----

def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False,
    )


def sparsity_table(matrices: dict[str, dict[str, Any]]) -> Table:
    """Per module type and overall: target and achieved sparsity, rendered from the prune.json records."""
    zeros: dict[str, float] = defaultdict(float)
    target: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    for name, rec in matrices.items():
        kind = module_type(name)
        numel = rec["shape"][0] * rec["shape"][1]
        zeros[kind] += rec["achieved"] * numel
        target[kind] += rec["target"] * numel
        total[kind] += numel
    table = Table(title="Sparsity by module type")
    for col in ("module", "matrices", "params", "target", "achieved"):
        table.add_column(col, justify="left" if col == "module" else "right")
    counts = defaultdict(int)
    for name in matrices:
        counts[module_type(name)] += 1
    for kind in total:
        table.add_row(kind, str(counts[kind]), f"{total[kind]:,}", f"{target[kind] / total[kind]:.2%}",
                      f"{zeros[kind] / total[kind]:.2%}")
    all_total = sum(total.values()) or 1
    table.add_row("[bold]overall", str(len(matrices)), f"{sum(total.values()):,}",
                  f"{sum(target.values()) / all_total:.2%}", f"[bold]{sum(zeros.values()) / all_total:.2%}")
    return table


# ---- one matrix ----

def prune_matrix(
    weight: torch.Tensor,
    cfg: PruneConfig,
    target: float,
    col_sq_norms: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep-mask) for one matrix; pure given the statistics."""
    pattern = cfg.pattern_spec
    compare = cfg.resolved_compare
    if cfg.method == "sparsegpt":
        if compare == "obs":  # SparseGPT's adaptive mask selection inside the sweep
            new, keep = sparsegpt_prune(weight, hessian, target, pattern.n, pattern.m,
                                        blocksize=cfg.blocksize, percdamp=cfg.percdamp)
        else:  # a fixed pattern ranked by OBS saliency, then SparseGPT's update under it
            hinv_diag = torch.diag(inverse_cholesky_upper(damped(hessian, cfg.percdamp)[0]))
            keep = make_mask(obs_saliency(weight, hinv_diag), pattern, target, compare)
            new = reconstruct(weight, hessian, keep, "obs", cfg.percdamp)
    else:
        scores = wanda_scores(weight, col_sq_norms) if cfg.method == "wanda" else magnitude_scores(weight)
        keep = make_mask(scores, pattern, target, compare)
        new = weight * keep
    if cfg.reconstruct:
        # From the dense weights: exact per-band least squares for blocks, converged CG for the rest.
        new = reconstruct(weight, hessian, keep, "least_squares" if pattern.kind == "block" else "cg", cfg.percdamp)
    return new, keep


def _apply(module: nn.Linear, new: torch.Tensor, keep: torch.Tensor) -> None:
    with torch.no_grad():
        module.weight.copy_(new.to(module.weight.dtype))
        module.weight[~keep.to(module.weight.device)] = 0


# ---- the run ----

def _eval_tokens(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
    text = load_text(cfg.eval_dataset, cfg.eval_split, cfg.data_dir)
    ids = tokenize(text, tokenizer).input_ids
    return ids, {"dataset": cfg.eval_dataset, "split": text.split, "origin": text.origin,
                 "fingerprint": text.fingerprint, "seqlen": cfg.eval_seqlen or cfg.seqlen,
                 "max_windows": cfg.eval_max_windows}


def _measure_ppl(model, ids, cfg: PruneConfig, device: str, prefix: str, progress: Progress, label: str) -> dict:
    seqlen = cfg.eval_seqlen or cfg.seqlen
    task = progress.add_task(label, total=None)
    if device != "cpu":
        model.to(device)
    try:
        result = perplexity(model, ids, seqlen, max_windows=cfg.eval_max_windows,
                            on_batch=lambda done, total: progress.update(task, completed=done, total=total))
    except ValueError as err:
        raise UserError(f"evaluation: {err}; lower --eval-seqlen or use a larger --eval-dataset") from None
    finally:
        progress.remove_task(task)
        if device != "cpu":
            model.to("cpu")
    return {"perplexity": result.perplexity, "nll": result.nll, "windows": result.windows,
            "tokens": result.tokens, "seconds": round(result.seconds, 3)}


def _calibration(cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict[str, Any]]:
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


def _validate_against_model(cfg: PruneConfig, model, targets: dict[str, float], shapes: dict[str, tuple]) -> None:
    ctx = context_length(model)
    if cfg.needs_calibration and ctx is not None and cfg.seqlen > ctx:
        raise UserError(f"--seqlen {cfg.seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    if cfg.eval and ctx is not None and (cfg.eval_seqlen or cfg.seqlen) > ctx:
        raise UserError(f"--eval-seqlen {cfg.eval_seqlen or cfg.seqlen} exceeds the model's context of {ctx}; lower it")
    types = {module_type(n) for n in shapes}
    for key in (*cfg.sparsity_map, *cfg.skip):
        if "*" not in key and "?" not in key and key not in types and key not in shapes:
            raise UserError(f"module {key!r} (in --sparsity-map/--skip) matches nothing; module types here: {', '.join(sorted(types))}")
    if not targets:
        raise UserError("--skip leaves no module to prune; skip fewer modules")
    pattern = cfg.pattern_spec
    if pattern.kind == "block":
        small = min((s for n, s in shapes.items() if n in targets), key=lambda s: s[0] * s[1])
        if pattern.h > min(s[0] for n, s in shapes.items() if n in targets) or \
           pattern.w > min(s[1] for n, s in shapes.items() if n in targets):
            raise UserError(f"--pattern {pattern.name} does not fit the smallest matrix {small[0]}x{small[1]}; use a smaller block")
    if pattern.kind == "nm":
        bad = sorted({s[1] for n, s in shapes.items() if n in targets and s[1] % pattern.m})
        if bad:
            raise UserError(f"--pattern {pattern.name}: input widths {bad} do not divide into groups of {pattern.m}; "
                            "pick an M that divides them or --skip those modules")


def run_prune(cfg: PruneConfig, console: Console | None = None) -> Path:
    """Prune `cfg.model` into `cfg.out`; returns the output directory. Raises UserError for bad input."""
    console = console or Console()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = check_out_dir(cfg)
    device = cfg.device or default_device()
    dtype = parse_dtype(cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))

    model, tokenizer = load_model(cfg.model, dtype=dtype, device=None, log=console.print)
    model.config.use_cache = False
    timings["load_s"] = time.perf_counter() - t_start
    prefix, layers = find_decoder_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_linears(model).items()}
    targets = {n: cfg.target_for(n) for n in shapes if not cfg.is_skipped(n)}
    _validate_against_model(cfg, model, targets, shapes)

    pattern, compare = cfg.pattern_spec, cfg.resolved_compare
    console.print(
        f"[bold]Pruning[/] {cfg.model} ({len(layers)} layers, {len(targets)}/{len(shapes)} matrices) | "
        f"method {cfg.method} | pattern {pattern.name} | sparsity "
        f"{pattern.fixed_sparsity or cfg.sparsity:g}{' + map' if cfg.sparsity_map else ''} | compare {compare} | "
        f"reconstruct {'on' if cfg.reconstruct else 'off'} | device {device} | dtype {str(dtype).removeprefix('torch.')}"
    )
    record: dict[str, Any] = {"format": FORMAT, "model": cfg.model, "method": cfg.method, "pattern": pattern.name,
                              "compare": compare, "seed": cfg.seed, "config": cfg.to_dict()}

    with _progress(console) as progress:
        eval_ids = None
        if cfg.eval:
            t = time.perf_counter()
            eval_ids, record["eval"] = _eval_tokens(cfg, tokenizer)
            dense = _measure_ppl(model, eval_ids, cfg, device, prefix, progress, "dense perplexity")
            record["dense_perplexity"] = dense["perplexity"]
            record["eval"]["dense"] = dense
            timings["dense_eval_s"] = time.perf_counter() - t
            progress.console.print(f"Dense perplexity: {dense['perplexity']:.3f} ({dense['windows']} windows)")

        masks: dict[str, torch.Tensor] = {}
        matrices: dict[str, dict[str, Any]] = {}
        t = time.perf_counter()
        layer_task = progress.add_task("layers", total=len(layers))
        if cfg.needs_calibration:
            windows, record["calibration"] = _calibration(cfg, tokenizer)
            timings["calibration_data_s"] = time.perf_counter() - t
            progress.console.print(
                f"Calibration: {cfg.nsamples} windows x {cfg.seqlen} tokens from {cfg.calib_dataset} train "
                f"(seed {cfg.seed}, sha256 {record['calibration']['windows_sha256']})"
            )
            t = time.perf_counter()
            move_to = device
            cal.move_except_layers(model, prefix, move_to)
            inputs = cal.capture_first_layer_inputs(model, layers[0], windows, move_to)
            cal.move_except_layers(model, prefix, "cpu")
            timings["capture_s"] = time.perf_counter() - t
            outs = torch.empty_like(inputs.hidden)
        else:
            record["calibration"] = None
        t = time.perf_counter()
        for i, layer in enumerate(layers):
            t_layer = time.perf_counter()
            progress.update(layer_task, description=f"layer {i + 1}/{len(layers)}")
            layer.to(device)
            mods = {f"{prefix}.{i}.{rel}": m for rel, m in linear_modules(layer).items()}
            mods = {n: m for n, m in mods.items() if n in targets}
            if cfg.needs_calibration:
                with cal.collecting(mods, hessian=cfg.needs_hessian) as stats:
                    cal.run_layer(layer, inputs, outs)  # dense outputs: the next layer's inputs when one-shot
                for name, module in mods.items():
                    new, keep = prune_matrix(module.weight.data, cfg, targets[name],
                                             col_sq_norms=stats.col_sq_norms(name),
                                             hessian=stats.hessians.get(name))
                    _apply(module, new, keep)
                    masks[name] = keep.cpu()
                del stats
                if cfg.sequential:
                    cal.run_layer(layer, inputs, outs)  # the next layer sees this layer's pruned outputs
                inputs.hidden, outs = outs, inputs.hidden
            else:
                for name, module in mods.items():
                    new, keep = prune_matrix(module.weight.data, cfg, targets[name])
                    _apply(module, new, keep)
                    masks[name] = keep.cpu()
            layer.to("cpu")
            layer_zeros = 0.0
            for name in mods:
                achieved = 1.0 - float(masks[name].float().mean())
                matrices[name] = {"shape": list(shapes[name]), "target": targets[name], "achieved": achieved}
                layer_zeros += achieved
            progress.console.print(
                f"layer {i + 1}/{len(layers)}: {len(mods)} matrices pruned, mean sparsity "
                f"{layer_zeros / max(len(mods), 1):.2%} ({time.perf_counter() - t_layer:.1f}s)"
            )
            progress.advance(layer_task)
        timings["prune_s"] = time.perf_counter() - t
        if cfg.needs_calibration:
            del inputs, outs

        # The pattern and sparsity are asserted against the model's actual weights, not only printed.
        linears = prunable_linears(model)
        violations = {}
        for name, keep in masks.items():
            problems = matrix_violations(linears[name].weight, keep, pattern, targets[name], compare)
            if problems:
                violations[name] = problems
        record["pattern_check"] = {"ok": not violations, "checked": len(masks), "violations": violations}
        if violations:
            raise RuntimeError(f"pruning produced an invalid pattern (a bug): {json.dumps(violations)[:2000]}")

        if cfg.eval:
            t = time.perf_counter()
            pruned = _measure_ppl(model, eval_ids, cfg, device, prefix, progress, "pruned perplexity")
            record["pruned_perplexity"] = pruned["perplexity"]
            record["eval"]["pruned"] = pruned
            timings["pruned_eval_s"] = time.perf_counter() - t
            progress.console.print(f"Pruned perplexity: {pruned['perplexity']:.3f}")

    # Save into a staging directory first so an interrupted save never leaves a half-written model in --out.
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f"{STAGING_PREFIX}{os.getpid()}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    pattern_meta = {"pattern": pattern.name, "compare": compare, "method": cfg.method}
    if pattern.kind == "block":
        pattern_meta["tile"] = [pattern.h, pattern.w]
    save_masks(masks, staging / MASKS_FILE, pattern_meta)
    record["matrices"] = matrices
    record["mask_digests"] = {name: mask_digest(keep) for name, keep in masks.items()}
    record["skipped"] = sorted(n for n in shapes if n not in targets)
    total = sum(r["shape"][0] * r["shape"][1] for r in matrices.values())
    record["overall"] = {
        "target": sum(r["target"] * r["shape"][0] * r["shape"][1] for r in matrices.values()) / total,
        "achieved": sum(r["achieved"] * r["shape"][0] * r["shape"][1] for r in matrices.values()) / total,
        "params": total,
    }
    timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    record["timings"] = {k: round(v, 3) for k, v in timings.items()}
    record["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    if device.startswith("cuda"):
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["provenance"] = provenance()
    write_json(staging / PRUNE_JSON, record)
    record["files"] = _install(staging, out)
    write_json(out / PRUNE_JSON, record)

    console.print(sparsity_table(matrices))
    console.print(f"[green]Saved[/] pruned model, masks and prune.json to {out} ({timings['total_s']:.1f}s)")
    return out


def _peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # Windows: current RSS is the best available
        return psutil.Process().memory_info().rss / 2**20
