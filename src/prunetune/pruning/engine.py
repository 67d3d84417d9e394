"""`run_prune(cfg)`: set up, calibrate and prune layer by layer, assert the pattern, save.

Output directory (self-describing): the pruned model and tokenizer (safetensors, byte for byte what
`save_pretrained` writes), `prunetune/masks.safetensors` (keep-masks, see `masks`; out of weight loaders' way,
`rundir.META_DIR`), `prune.json` (config, per-matrix target/achieved sparsity, pattern check, calibration hash,
seed, timings, memory, provenance, and with `eval` dense/pruned perplexity).

Memory: the model's layers live in a `LayerStore` (layer_store.py): streamed from the checkpoint's shards one
decoder layer at a time and written pruned into the output as the walk goes (the default where exact), or the
whole model in memory. The output is written into its staging directory during the whole run and published at
the end (a failed run leaves nothing). The data is read before the model, so the memory the model adds is the
peak RSS minus the RSS just before it loads; both are recorded.
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

from prunetune import phases
from prunetune.architecture import prunable_linears
from prunetune.devices import default_device
from prunetune.errors import UserError
from prunetune.fmt import fmt_ppl, hms
from prunetune.models import load_config, load_tokenizer, materialize, resolve_model
from prunetune.pruning.channels import permute_channels, save_permutation
from prunetune.pruning.config import PruneConfig
from prunetune.pruning.console import memory_line, progress_bar, sparsity_table
from prunetune.pruning.layer_eval import layerwise_perplexity
from prunetune.pruning.layer_store import open_layers
from prunetune.pruning.layers import capture_inputs, owl_targets, prune_layers
from prunetune.pruning.matrix import MatrixRecipe
from prunetune.pruning.precision import resolve_precision
from prunetune.pruning.setup import (
    MemoryMark,
    PruneSession,
    calibration_windows,
    check_out,
    eval_tokens,
    input_paths,
    validate_against_model,
    validate_context,
)
from prunetune.rundir import PRUNE_JSON, run_lock, save_encoded_masks, staged_output
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity.masks import masks_meta
from prunetune.sparsity.patterns import sparsity_tolerance

FORMAT = "prunetune-prune/1"


def run_prune(cfg: PruneConfig, console: Console | None = None) -> Path:
    """Prune `cfg.model` into `cfg.out`; returns the output directory. Raises UserError for bad input."""
    console = console or Console()
    t_start = time.perf_counter()
    out, replace = check_out(cfg)  # before any work: a refused or unwritable --out fails in a second
    with _locked(out, console), staged_output(out, inputs=input_paths(cfg), overwrite=replace,
                                              command="prunetune prune", what="the pruned model") as staging:
        phases.boundary("locked")
        session = setup(cfg, console)
        try:
            session.store.open_output(staging)
            with progress_bar(console) as progress:
                if cfg.eval:
                    evaluate_phase(session, progress, "dense")
                inputs = capture_inputs(session, progress) if cfg.needs_calibration else None
                if cfg.owl:
                    owl_targets(session, inputs, progress)
                if cfg.permutes:  # after OWL: the search uses each matrix's own target
                    permute_channels(session, inputs, progress)
                prune_layers(session, inputs, progress)
                check_pattern(session)
                if cfg.eval:
                    evaluate_phase(session, progress, "pruned")
            phases.boundary("pruned")
            save(session, staging, t_start)
        except BaseException:
            session.store.abort()
            raise
    console.print(sparsity_table(session.matrices))
    console.print(memory_line(session.record["memory"]))
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
    """Read the data, then open the model (streamed where exact, else loaded whole on CPU), find its decoder
    layers and prunable matrices, and validate the config against it."""
    t = time.perf_counter()
    device = default_device(cfg.device)
    precision = resolve_precision(cfg.dtype, device, cfg.calibration_recipe)
    ref = resolve_model(cfg.model)
    location = materialize(ref, log=console.print)  # a GGUF is converted into its cache here, once
    validate_context(cfg, load_config(ref, log=console.print))
    tokenizer = load_tokenizer(ref)
    windows = calibration = eval_ids = eval_record = None
    if cfg.needs_calibration:
        windows, calibration = calibration_windows(cfg, tokenizer)
    if cfg.eval:
        eval_ids, eval_record = eval_tokens(cfg, tokenizer)
    data_s = time.perf_counter() - t
    mark = MemoryMark()  # everything before this is not the model's: imports, tokenizer, data
    t = time.perf_counter()
    store = open_layers(ref, location, precision.storage, cfg.stream, log=console.print)
    store.model.config.use_cache = False
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_linears(store.model).items()}
    targets = {n: cfg.target_for(n) for n in shapes if not cfg.is_skipped(n)}
    validate_against_model(cfg, targets, shapes)
    recipe = MatrixRecipe(cfg.method, cfg.pattern_spec, cfg.resolved_compare, cfg.reconstruct, cfg.percdamp,
                          cfg.blocksize)
    session = PruneSession(cfg, store, tokenizer, shapes, targets, device, precision, recipe, windows, eval_ids)
    session.timings["load_s"] = time.perf_counter() - t
    session.timings["data_s"] = data_s
    session.record = {"format": FORMAT, "model": cfg.model, "method": cfg.method, "pattern": recipe.pattern.name,
                      "compare": recipe.compare, "seed": cfg.seed, "config": cfg.to_dict(),
                      "dtype": precision.record(), "calibration": calibration,
                      "memory": {"weights": store.how, "streamed": store.streamed,
                                 "weight_mib": round(store.weight_bytes() / 2**20, 1)}}
    session.mark = mark
    if eval_record is not None:
        session.record["eval"] = eval_record
    console.print(
        f"[bold]Pruning[/] {cfg.model} ({len(store.layers)} layers, {len(targets)}/{len(shapes)} matrices) | "
        f"method {cfg.method} | pattern {recipe.pattern.name} | sparsity "
        f"{recipe.pattern.fixed_sparsity or cfg.sparsity:g}{' + map' if cfg.sparsity_map else ''} | "
        f"compare {recipe.compare} | reconstruct {'on' if cfg.reconstruct else 'off'} | device {device}"
    )
    console.print(f"Precision: {precision.describe()}")
    console.print(f"Weights: {store.how}")
    return session


def evaluate_phase(s: PruneSession, progress: Progress, which: str) -> None:
    """Perplexity of the model as it is now (`dense` before pruning, `pruned` after), layer by layer, into the
    record."""
    t = time.perf_counter()
    seqlen = s.cfg.eval_seqlen or s.cfg.seqlen
    task = progress.add_task(f"{which} perplexity", total=len(s.layers))
    try:
        result = layerwise_perplexity(s.store, s.eval_ids, seqlen, s.cfg.eval_max_windows, s.device,
                                      s.precision.autocast,
                                      on_layer=lambda done, total: progress.update(task, completed=done))
    except ValueError as err:
        raise UserError(f"evaluation: {err}; lower --eval-seqlen or use a larger --eval-dataset") from None
    finally:
        progress.remove_task(task)
    s.record[f"{which}_perplexity"] = result.perplexity
    s.record["eval"][which] = {"perplexity": result.perplexity, "nll": result.nll, "windows": result.windows,
                               "tokens": result.tokens, "seconds": round(time.perf_counter() - t, 3)}
    s.timings[f"{which}_eval_s"] = time.perf_counter() - t
    progress.console.print(f"{which.capitalize()} perplexity: {fmt_ppl(result.perplexity)} ({result.windows} windows)")


# ---- assert, save ----

def check_pattern(s: PruneSession) -> None:
    """The pattern and sparsity are asserted against the model's actual weights, not only printed: each matrix
    when its layer was done (`layers.finish_layer`, against the weights as saved), the overall sparsity here."""
    violations = dict(s.violations)
    numel = {n: r["shape"][0] * r["shape"][1] for n, r in s.matrices.items()}
    total = sum(numel.values())
    achieved = sum(s.matrices[n]["achieved"] * numel[n] for n in numel) / total
    target = sum(s.targets[n] * numel[n] for n in numel) / total
    slack = sum(sparsity_tolerance(tuple(s.matrices[n]["shape"]), s.recipe.pattern, s.recipe.compare) * numel[n]
                for n in numel) / total
    if abs(achieved - target) > slack + 1e-9:  # overall: what each matrix may round, summed, and no more
        violations["overall"] = [f"achieved sparsity {achieved:.4f} is not the target {target:.4f}"]
    s.record["pattern_check"] = {"ok": not violations, "checked": len(s.packed), "violations": violations}
    if violations:
        raise RuntimeError(f"pruning produced an invalid pattern (a bug): {json.dumps(violations)[:2000]}")


def save(s: PruneSession, staging: Path, t_start: float) -> None:
    """Model (the streamed shards completed, or the whole model written), tokenizer, masks and prune.json into
    the staging directory that `run_prune` publishes whole."""
    t = time.perf_counter()
    s.store.finish(staging)
    s.tokenizer.save_pretrained(staging)
    tensors = {name: packed for name, (packed, _) in s.packed.items()}
    save_encoded_masks(tensors, masks_meta({name: info for name, (_, info) in s.packed.items()}, s.pattern_meta),
                       staging)
    if s.permutation is not None:
        save_permutation(s.permutation, staging)
    s.timings["save_s"] = time.perf_counter() - t
    s.timings["total_s"] = time.perf_counter() - t_start
    write_json(staging / PRUNE_JSON, _final_record(s, sorted({p.name for p in staging.iterdir()} | {PRUNE_JSON})))


def _final_record(s: PruneSession, files: list[str]) -> dict[str, Any]:
    record = s.record
    record["matrices"] = s.matrices
    record["mask_digests"] = dict(s.digests)
    record["skipped"] = sorted(n for n in s.shapes if n not in s.targets)
    total = sum(r["shape"][0] * r["shape"][1] for r in s.matrices.values())
    record["overall"] = {
        "target": sum(r["target"] * r["shape"][0] * r["shape"][1] for r in s.matrices.values()) / total,
        "achieved": sum(r["achieved"] * r["shape"][0] * r["shape"][1] for r in s.matrices.values()) / total,
        "params": total,
    }
    record["timings"] = {k: round(v, 3) for k, v in s.timings.items()}
    memory = record["memory"]
    memory.update(s.mark.record())
    memory["model_share_of_weights"] = round(memory["model_mib"] / max(memory["weight_mib"], 1e-9), 4)
    record["peak_rss_mib"] = memory["process_peak_rss_mib"]
    if s.device.startswith("cuda"):
        record["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    record["provenance"] = provenance()
    record["files"] = files
    return record
