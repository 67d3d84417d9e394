"""The layer walk of `prune`: one decoder layer resident on the device at a time (loaded from the store, see
`layer_store`), calibrated on the current activations, pruned, optionally trained block-wise, checked and committed
(written, when streamed), and recomputed so the next layer sees the pruned model. Also OWL's pass over the dense
layers that sets the per-layer targets before pruning starts.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from rich.progress import Progress
from torch import nn

from prunetune.architecture import linear_modules
from prunetune.budget import fit_steps
from prunetune.pruning import calibration as cal
from prunetune.pruning.blockwise import outputs_mse, probe_step_seconds, reconstruct_block
from prunetune.pruning.matrix import prune_matrix
from prunetune.pruning.owl import (
    clamp_target,
    layer_offsets,
    outlier_ratio,
    step_of,
    target_range,
    wanted_offsets,
)
from prunetune.pruning.scores import wanda_scores
from prunetune.pruning.setup import PruneSession
from prunetune.pruning.sparsegpt import HessianFactors
from prunetune.sparsity.masks import encode_mask, mask_digest
from prunetune.sparsity.patterns import matrix_violations


def capture_inputs(s: PruneSession, progress: Progress) -> cal.LayerInputs:
    """Capture what the first decoder layer is called with on the calibration windows (read in setup)."""
    assert s.windows is not None, "calibration windows are read in setup when the method needs them"
    progress.console.print(
        f"Calibration: {s.cfg.nsamples} windows x {s.cfg.seqlen} tokens from {s.cfg.calib_dataset} train "
        f"(seed {s.cfg.seed}, sha256 {s.record['calibration']['windows_sha256']})"
    )
    t = time.perf_counter()
    s.store.load_outer(s.device)
    try:
        with s.precision.autocast():
            inputs = cal.capture_first_layer_inputs(s.model, s.layers[0], s.windows, s.device)
    finally:
        s.store.release_outer()
    s.timings["capture_s"] = time.perf_counter() - t
    return inputs


def layer_modules(s: PruneSession, i: int, layer: nn.Module) -> dict[str, nn.Linear]:
    """The linear modules of layer i that are pruned (full names), in the layer's own order."""
    mods = {f"{s.prefix}.{i}.{rel}": m for rel, m in linear_modules(layer).items()}
    return {n: m for n, m in mods.items() if n in s.targets}


@dataclass
class _Walk:
    """Activation buffers at the current layer boundary, (nsamples, seqlen, hidden) each; swapped per layer."""

    inputs: cal.LayerInputs
    """What the (pruned) model feeds the current layer."""
    outs: torch.Tensor
    dense: cal.LayerInputs | None = None
    """Block-wise reconstruction with sequential calibration: what the dense model feeds the current layer."""
    dense_outs: torch.Tensor | None = None

    def advance(self) -> None:
        self.inputs.hidden, self.outs = self.outs, self.inputs.hidden
        if self.dense is not None:
            self.dense.hidden, self.dense_outs = self.dense_outs, self.dense.hidden


def prune_layers(s: PruneSession, inputs: cal.LayerInputs | None, progress: Progress) -> None:
    """Walk the decoder stack, pruning every target module; record the per-layer results."""
    walk = None
    if inputs is not None:
        walk = _Walk(inputs, torch.empty_like(inputs.hidden))
        if s.cfg.block_reconstruct_epochs and s.cfg.sequential:  # the dense model's own activations, alongside
            walk.dense = dataclasses.replace(inputs, hidden=inputs.hidden.clone())
            walk.dense_outs = torch.empty_like(inputs.hidden)
    task = progress.add_task("layers", total=len(s.layers))
    t = time.perf_counter()
    budget_shown = False
    for i in range(len(s.layers)):
        t_layer = time.perf_counter()
        progress.update(task, description=f"layer {i + 1}/{len(s.layers)}")
        layer = s.store.load(i, s.device)
        mods = layer_modules(s, i, layer)
        note = ""
        if walk is None:
            _prune_modules(s, mods, None)
        else:
            note = _calibrated_layer(s, i, layer, mods, walk)
        finish_layer(s, mods)
        s.store.commit(i, layer)
        s.store.release(i, layer)
        mean = sum(s.matrices[n]["achieved"] for n in mods) / max(len(mods), 1)
        progress.console.print(f"layer {i + 1}/{len(s.layers)}: {len(mods)} matrices pruned, mean sparsity "
                               f"{mean:.2%}{note} ({time.perf_counter() - t_layer:.1f}s)")
        if (budget := s.record.get("block_reconstruct_budget")) and not budget_shown:
            budget_shown = True
            progress.console.print(
                f"Block-wise budget {budget['minutes']:g} min over {budget['layers']} layers, "
                f"{budget['s_per_step']:.3f} s/step measured on layer {i + 1}: {budget['steps_per_layer']} of "
                f"{budget['planned_steps_per_layer']} steps per layer {'fit' if budget['cut'] else '(all fit)'}")
        progress.advance(task)
    s.timings["prune_s"] = time.perf_counter() - t


def _calibrated_layer(s: PruneSession, i: int, layer: nn.Module, mods: dict[str, nn.Linear], walk: _Walk) -> str:
    """Statistics, masks and (optional) block-wise training of layer i; returns a note for its console line."""
    autocast = s.precision.autocast
    if walk.dense is not None:
        with autocast():
            cal.run_layer(layer, walk.dense, walk.dense_outs)  # the dense model's output: the block-wise target
    with cal.collecting(mods, hessian=s.cfg.needs_hessian) as stats, autocast():
        if s.cfg.sequential:  # the next layer's inputs come from the pruned layer below: statistics only
            cal.gather_stats(layer, walk.inputs, stats)
        else:  # one-shot: the dense outputs are the next layer's inputs (and the block-wise target)
            cal.run_layer(layer, walk.inputs, walk.outs)
    _prune_modules(s, mods, stats)
    del stats
    result, last = None, i == len(s.layers) - 1
    if s.cfg.block_reconstruct_epochs and mods:
        target = walk.dense_outs if walk.dense is not None else walk.outs
        keeps = {m: s.masks[n] for n, m in mods.items()}
        result = reconstruct_block(layer, keeps, walk.inputs, target, s.cfg.block_reconstruct_epochs,
                                   s.cfg.block_reconstruct_lr, seed=s.cfg.seed + i, autocast=autocast,
                                   max_steps=_block_steps(s, layer, keeps, walk.inputs, target),
                                   measure_after=not (s.cfg.sequential and not last))
    if s.cfg.sequential and not last:  # the last layer's pruned outputs feed nothing
        with autocast():
            cal.run_layer(layer, walk.inputs, walk.outs)  # the next layer sees this layer's pruned outputs
        if result is not None:  # the block-wise error, from these very outputs (no extra pass)
            result = dataclasses.replace(result, mse_after=outputs_mse(walk.outs, target))
    note = ""
    if result is not None:
        s.record.setdefault("block_reconstruct", {})[str(i)] = result.record()
        note = f", block-wise mse {result.mse_before:.3g} -> {result.mse_after:.3g}"
    walk.advance()
    return note


def _block_steps(s: PruneSession, layer: nn.Module, keeps: dict[nn.Linear, torch.Tensor], inputs: cal.LayerInputs,
                 target: torch.Tensor) -> int | None:
    """--block-reconstruct-minutes as Adam steps per layer (None: no budget, every epoch runs): fitted once, from
    one step timed on the first layer trained, so every layer trains the same number of steps."""
    minutes = s.cfg.block_reconstruct_minutes
    if minutes is None:
        return None
    if "block_reconstruct_budget" not in s.record:
        per_step = probe_step_seconds(layer, keeps, inputs, target, s.precision.autocast)
        layers = len({n.removeprefix(f"{s.prefix}.").split(".")[0] for n in s.targets})
        planned = s.cfg.block_reconstruct_epochs * s.cfg.nsamples
        fit = fit_steps(minutes * 60 / layers, planned, per_step)
        s.record["block_reconstruct_budget"] = {
            "minutes": minutes, "layers": layers, "s_per_step": per_step, "planned_steps_per_layer": planned,
            "steps_per_layer": fit.steps, "cut": fit.cut}
    return s.record["block_reconstruct_budget"]["steps_per_layer"]


def finish_layer(s: PruneSession, mods: dict[str, nn.Linear]) -> None:
    """A layer's matrices are final: check each against its mask and pattern (the weights as they will be saved),
    then keep its masks packed (one bit per weight or tile) and their digests, not one bool per weight."""
    tile = tuple(s.pattern_meta["tile"]) if "tile" in s.pattern_meta else None
    for name, module in mods.items():
        keep = s.masks.pop(name)
        target = s.targets[name]
        problems = matrix_violations(module.weight, keep, s.recipe.pattern.at(target), target, s.recipe.compare)
        if problems:
            s.violations[name] = problems
        s.packed[name] = encode_mask(keep, tile)
        s.digests[name] = mask_digest(keep)


def _prune_modules(s: PruneSession, mods: dict[str, nn.Linear], stats: cal.InputStats | None) -> None:
    """Prune each module of one layer in place; modules that read the same input share one HessianFactors."""
    factors: dict[int, HessianFactors] = {}
    for name, module in mods.items():
        hessian = stats.hessians.get(name) if stats is not None else None
        if hessian is not None and id(hessian) not in factors:
            factors[id(hessian)] = HessianFactors(hessian, s.cfg.percdamp)
        norms = stats.col_sq_norms(name) if stats is not None else None
        new, keep = prune_matrix(module.weight.data, s.recipe, s.targets[name], col_sq_norms=norms,
                                 factors=factors.get(id(hessian)) if hessian is not None else None)
        with torch.no_grad():
            module.weight.copy_(new.to(module.weight.dtype))
            module.weight.masked_fill_(~keep.to(module.weight.device), 0)  # exact zeros (boolean indexing: 6x slower)
        s.masks[name] = keep.cpu()
        s.matrices[name] = {"shape": list(s.shapes[name]), "target": s.targets[name],
                            "achieved": 1.0 - float(s.masks[name].float().mean())}


def owl_targets(s: PruneSession, inputs: cal.LayerInputs, progress: Progress) -> None:
    """OWL: each dense layer's outlier ratio on the calibration activations, then per-layer targets (see `owl`)."""
    t = time.perf_counter()
    walk = _Walk(dataclasses.replace(inputs, hidden=inputs.hidden.clone()), torch.empty_like(inputs.hidden))
    task = progress.add_task("OWL outlier ratios", total=len(s.layers))
    ratios: dict[int, float] = {}
    for i in range(len(s.layers)):
        layer = s.store.load(i, s.device)
        mods = layer_modules(s, i, layer)
        with cal.collecting(mods, hessian=False) as stats, s.precision.autocast():
            cal.run_layer(layer, walk.inputs, walk.outs)
        if mods:
            ratios[i] = outlier_ratio([wanda_scores(m.weight, stats.col_sq_norms(n)) for n, m in mods.items()],
                                      s.cfg.owl_m)
        s.store.release(i, layer)
        walk.advance()
        progress.advance(task)
    progress.remove_task(task)
    del walk
    _apply_owl(s, ratios)
    s.timings["owl_s"] = time.perf_counter() - t


def _apply_owl(s: PruneSession, ratios: dict[int, float]) -> None:
    by_layer = {i: [n for n in s.targets if n.startswith(f"{s.prefix}.{i}.")] for i in ratios}
    numel = {n: s.shapes[n][0] * s.shapes[n][1] for n in s.targets}
    order = sorted(ratios)
    params = [sum(numel[n] for n in by_layer[i]) for i in order]
    steps = [max(step_of(s.shapes[n], s.recipe.pattern, s.recipe.compare) for n in by_layer[i]) for i in order]
    lo, hi = target_range(s.recipe.pattern)  # every module's target stays one the pattern can hold
    bounds = [(max(lo - s.targets[n] for n in by_layer[i]), min(hi - s.targets[n] for n in by_layer[i])) for i in order]
    offsets = layer_offsets([ratios[i] for i in order], params, steps, s.cfg.owl_lambda, bounds)
    uniform = sum(s.targets[n] * numel[n] for n in numel) / sum(numel.values())
    for i, offset in zip(order, offsets, strict=True):
        for n in by_layer[i]:
            s.targets[n] = clamp_target(s.targets[n] + offset, s.recipe.pattern)
    overall = sum(s.targets[n] * numel[n] for n in numel) / sum(numel.values())
    s.record["owl"] = {
        "lambda": s.cfg.owl_lambda, "m": s.cfg.owl_m, "overall_target": overall, "uniform_target": uniform,
        "layers": {str(i): {"outlier_ratio": ratios[i], "offset": off, "params": p,
                            "target": sum(s.targets[n] * numel[n] for n in by_layer[i]) / p,
                            # OWL wanted more than the pattern holds here; the other layers took up the rest
                            "at_bound": not b[0] - 1e-9 <= want <= b[1] + 1e-9}
                   for i, off, p, b, want in zip(order, offsets, params, bounds,
                                                 wanted_offsets([ratios[i] for i in order], params, s.cfg.owl_lambda),
                                                 strict=True)},
    }
    # The overall target is the requested one up to the rounding of one layer's step.
    assert abs(overall - uniform) <= max(st * p for st, p in zip(steps, params, strict=True)) / sum(params) + 1e-9, \
        f"OWL moved the overall target from {uniform} to {overall}"
