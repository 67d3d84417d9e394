"""`prune --permute`: the channel permutation as a prune phase (model walking; the math is `permutation.py`).

Before the layer walk: one pass over the dense layers on the calibration windows gathers each matrix's Wanda
scores |W| * ||x|| (magnitude: |W|, no pass), the search picks the permutation, and the layer store relabels the
model from then on (`LayerStore.relabel`: the outer weights and every layer as it is read, so a model streamed
from its shards is relabelled one layer at a time), as well as the captured inputs of the first layer (the
embedding output: residual space). The walk then prunes an ordinary model whose channels are relabelled; the saved
directory loads in Transformers as any other. The logits on seeded token ids, layer by layer before and after,
assert that the function did not change, and the permutation is saved beside the masks
(`prunetune/permutation.safetensors`) so a dense teacher can be relabelled the same way (layer-wise distillation
compares hidden states).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from prunetune.architecture import find_decoder_layers, linear_modules, module_type
from prunetune.devices import free_memory
from prunetune.errors import UserError
from prunetune.pruning import calibration as cal
from prunetune.pruning.layer_eval import layerwise_logits
from prunetune.pruning.permutation import (
    ROLES,
    Dims,
    Permutation,
    TilePlan,
    is_valid,
    permute_matrix,
    search,
)
from prunetune.pruning.scores import magnitude_scores, wanda_scores
from prunetune.pruning.setup import PruneSession
from prunetune.rundir import META_DIR, PERMUTATION_FILE

ROLE_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}
"""The Llama layout's projections; a layer made of other modules has no known function-preserving relabelling."""
HEAD_NORMS = ("q_norm", "k_norm")
"""Per-head norms over q/k head dimensions (Qwen3): untouched, as q/k dimensions are never permuted."""
CHECK_TOKENS = 64
SEARCH_MEMORY_SHARE = 0.5
"""The search is the one phase of a prune that is not layer by layer: it holds every pruned matrix's dense scores
(float32, 4 bytes a weight) and their normalised copy, ~2x a float32 model's pruned weights (SmolLM2-135M: 0.85
GB, the prune's peak 1.5x the model's weight bytes instead of 0.25x). By default it runs only when that fits in
this share of the available memory, so a 70B prune (~550 GB of scores) stays streamed; --permute asked for on a
machine where it does not fit is a one-line error."""


def dims_of(model: nn.Module, layers: int) -> Dims:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Dims(layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim)


def layer_roles(layer: nn.Module) -> dict[str, nn.Linear]:
    """role -> linear module of a Llama-layout layer; UserError for any other layout."""
    mods = linear_modules(layer)
    roles = {ROLE_OF.get(module_type(n)): m for n, m in mods.items()}
    if set(roles) != set(ROLES) or len(mods) != len(ROLES):
        raise UserError(f"--permute needs Llama-layout layers (q/k/v/o_proj, gate/up/down_proj); this layer has "
                        f"{', '.join(sorted(mods))}; run without --permute")
    return roles


def check_permutable(model: nn.Module, prefix: str, layers: list[nn.Module]) -> Dims:
    """The model's dims, after checking that every parameter is one `apply_*` relabels or may leave alone."""
    d = dims_of(model, len(layers))
    for layer in layers:
        roles = layer_roles(layer)
        linear_params = {id(p) for m in roles.values() for p in m.parameters()}
        for name, p in layer.named_parameters():
            if id(p) in linear_params:
                continue
            head_norm = name.split(".")[-2] in HEAD_NORMS if "." in name else False
            if not ((p.dim() == 1 and p.shape[0] == d.hidden and name.count(".") == 1)
                    or (head_norm and p.shape == (d.head_dim,))):
                raise UserError(f"--permute does not know how to relabel parameter {name} {tuple(p.shape)} of "
                                f"{type(layer).__name__}; run without --permute")
    stack = {id(p) for layer in layers for p in layer.parameters()}
    for name, p in model.named_parameters():
        if id(p) in stack:
            continue
        if not (p.dim() == 1 and p.shape[0] == d.hidden) and not (p.dim() == 2 and p.shape[1] == d.hidden):
            raise UserError(f"--permute does not know how to relabel {name} {tuple(p.shape)} (outside {prefix}); "
                            "run without --permute")
    return d


@torch.no_grad()
def apply_to_layer(layer: nn.Module, perm: Permutation, i: int, d: Dims) -> None:
    """Relabel decoder layer i in place: its projections by `AXES`, its residual norms by the residual index."""
    roles = layer_roles(layer)
    for role, (rows, cols) in perm.layer_indices(i, d).items():
        lin = roles[role]
        lin.weight.data = permute_matrix(lin.weight.data, rows, cols).contiguous()
        if lin.bias is not None and rows is not None:
            lin.bias.data = lin.bias.data.index_select(0, rows.to(lin.bias.device)).contiguous()
    linear_params = {id(p) for m in roles.values() for p in m.parameters()}
    for name, p in layer.named_parameters():
        if id(p) not in linear_params and name.count(".") == 1 and p.dim() == 1 and p.shape[0] == d.hidden:
            p.data = p.data.index_select(0, perm.residual.to(p.device)).contiguous()  # input/post-attention norms


def relabel_outer(t: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """A weight outside the decoder stack relabelled: its last dimension is the residual stream (embedding and
    head columns, the final norm; `check_permutable` allows no other)."""
    return t.index_select(t.dim() - 1, perm.residual.to(t.device)).contiguous()


@torch.no_grad()
def apply_to_outer(model: nn.Module, layers: list[nn.Module], perm: Permutation) -> None:
    """Relabel every weight outside the decoder stack of a resident model in place (a tied head once)."""
    stack = {id(p) for layer in layers for p in layer.parameters()}
    seen: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in stack or id(p) in seen:
            continue
        seen.add(id(p))
        p.data = relabel_outer(p.data, perm)


def apply(model: nn.Module, layers: list[nn.Module], perm: Permutation, d: Dims) -> None:
    """Relabel a resident model in place (a teacher, a test model); `prune` relabels through its layer store."""
    apply_to_outer(model, layers, perm)
    for i, layer in enumerate(layers):
        apply_to_layer(layer, perm, i, d)


def check_ids(vocab: int, seqlen: int, seed: int) -> torch.Tensor:
    """(1, T) seeded token ids for the function check."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, min(CHECK_TOKENS, seqlen)), generator=gen)


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A resident model's float32 logits, in its weights' dtype (no autocast: the check compares like with like)."""
    return model(input_ids=ids, use_cache=False).logits.float()


def function_check(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """How far the relabelled model's logits are from the original's; `ok` within float rounding of `dtype`
    (a wrong index moves logits by their own size)."""
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    rel = diff / max(scale, 1e-30)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "relative": rel, "tolerance": tol,
            "tokens": int(before.shape[1]), "ok": rel <= tol}


# ---- the prune phase ---------------------------------------------------------------------------------------------


def layer_scores(s: PruneSession, inputs: cal.LayerInputs | None, progress: Progress) -> list[dict[str, torch.Tensor]]:
    """Per layer, role -> the dense matrix's scores (Wanda on the dense activations; |W| for magnitude)."""
    use_norms = s.cfg.method != "magnitude" and inputs is not None
    if use_norms:  # the dense model's own activations, layer by layer (as OWL's pass)
        cur = dataclasses.replace(inputs, hidden=inputs.hidden.clone())
        buf = torch.empty_like(cur.hidden)
    task = progress.add_task("permutation scores", total=len(s.layers))
    out = []
    for i in range(len(s.layers)):
        layer = s.store.load(i, s.device)
        try:
            roles = layer_roles(layer)
            if use_norms:
                with cal.collecting(roles, hessian=False) as stats, s.precision.autocast():
                    cal.run_layer(layer, cur, buf)
                out.append({r: wanda_scores(m.weight, stats.col_sq_norms(r)).cpu() for r, m in roles.items()})
                cur.hidden, buf = buf, cur.hidden
            else:
                out.append({r: magnitude_scores(m.weight).cpu() for r, m in roles.items()})
        finally:
            s.store.release(i, layer)
        progress.advance(task)
    progress.remove_task(task)
    return out


def search_bytes(model: nn.Module, targets: dict[str, float]) -> int:
    """Host memory the search holds: two float32 values per pruned weight (shapes read from the skeleton, which
    a streamed model has on the meta device)."""
    return 8 * sum(model.get_submodule(name).weight.numel() for name in targets)


def check_search_memory(s: PruneSession) -> None:
    """UserError when the search would not fit in `SEARCH_MEMORY_SHARE` of the available host memory."""
    need, free = search_bytes(s.model, s.targets), free_memory("cpu")
    if free is not None and need > SEARCH_MEMORY_SHARE * free:
        raise UserError(f"--permute's search holds every pruned matrix's scores ({need / 2**30:.1f} GiB) and "
                        f"{free / 2**30:.1f} GiB of memory is available (at most {SEARCH_MEMORY_SHARE:.0%} of it is "
                        "used); run with --no-permute, or on a machine with more memory")


def permute_channels(s: PruneSession, inputs: cal.LayerInputs | None, progress: Progress) -> None:
    """Search the permutation on the dense model, relabel the model (through its store) and `inputs`, check the
    function, record it (`prune.json` "permutation") and keep it for the save."""
    t = time.perf_counter()
    try:
        d = check_permutable(s.model, s.prefix, s.layers)
        check_search_memory(s)
    except UserError as err:
        if s.cfg.permute:  # asked for: the user learns why it cannot run
            raise
        s.record["permutation"] = {"skipped": str(err)}  # the default for blocks, on a model or machine it does not fit
        progress.console.print(f"Channel permutation skipped: {err}")
        return
    ids = check_ids(int(s.model.config.vocab_size), s.cfg.seqlen, s.cfg.seed)
    before = layerwise_logits(s.store, ids, s.device)
    scores = layer_scores(s, inputs, progress)
    scores_s = time.perf_counter() - t
    pattern = s.recipe.pattern
    targets = [{ROLE_OF[module_type(n)]: s.targets[n] for n in s.targets if n.startswith(f"{s.prefix}.{i}.")}
               for i in range(len(s.layers))]
    plan = TilePlan(pattern.h, pattern.w, s.recipe.compare, targets)
    t_search, cpu_search = time.perf_counter(), time.process_time()
    result = search(scores, d, plan, s.cfg.permute_rounds, log=progress.console.print,
                    workers=torch.get_num_threads())
    del scores
    search_s = time.perf_counter() - t_search
    search_cpu_s = time.process_time() - cpu_search  # what a busy machine does not inflate (all threads)
    perm = result.permutation
    assert is_valid(perm, d), "the search returned an invalid permutation (a bug in prunetune)"
    s.store.relabel(lambda name, w: relabel_outer(w, perm), lambda i, layer: apply_to_layer(layer, perm, i, d))
    if inputs is not None:  # the first layer's inputs are the embedding output: residual space
        inputs.hidden = inputs.hidden.index_select(-1, perm.residual.to(inputs.hidden.device))
    check = function_check(before, layerwise_logits(s.store, ids, s.device), s.precision.storage)
    if not check["ok"]:
        raise RuntimeError(f"the channel permutation changed the model's logits by {check['relative']:.2e} of "
                           f"their scale (tolerance {check['tolerance']:g}): a bug; run without --permute")
    s.permutation = perm
    s.record["permutation"] = {
        "file": f"{META_DIR}/{PERMUTATION_FILE}", "rounds": len(result.history) - 1,
        "max_rounds": s.cfg.permute_rounds,
        "scores": "magnitude" if s.cfg.method == "magnitude" or inputs is None else "wanda",
        "kept_mass_before": result.history[0], "kept_mass_after": result.history[-1],
        "kept_mass_history": result.history, "function_check": check,
        "spaces": {"residual": d.hidden, "mlp": [d.intermediate, d.layers], "vo": [d.kv_heads * d.head_dim, d.layers]},
        "scores_s": round(scores_s, 3), "search_s": round(search_s, 3), "search_cpu_s": round(search_cpu_s, 3),
        "search_threads": torch.get_num_threads()}
    s.timings["permute_s"] = time.perf_counter() - t
    progress.console.print(
        f"Channel permutation: kept score mass {result.history[0]:.4f} -> {result.history[-1]:.4f} in "
        f"{len(result.history) - 1} round(s) ({search_s:.0f}s search); logits unchanged within "
        f"{check['max_abs_logit_diff']:.1e}")


def save_permutation(perm: Permutation, directory: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(directory) / META_DIR / PERMUTATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(perm.tensors(), str(path))
    return path


def load_permutation(directory: str | Path) -> Permutation | None:
    """The permutation a pruned directory was made with; None when it has none."""
    from safetensors.torch import load_file

    path = Path(directory) / META_DIR / PERMUTATION_FILE
    return Permutation.from_tensors(load_file(str(path))) if path.is_file() else None


def relabel_teacher(teacher: nn.Module, pruned_dir: str | Path) -> bool:
    """Give a dense teacher the channel order of a model pruned with --permute (hidden states compared by
    layer-wise distillation must share their channel order). False when `pruned_dir` has no permutation."""
    perm = load_permutation(pruned_dir)
    if perm is None:
        return False
    prefix, layers = find_decoder_layers(teacher)
    d = check_permutable(teacher, prefix, list(layers))
    if not is_valid(perm, d):
        raise UserError(f"{pruned_dir} was pruned with --permute from a model of other sizes than the teacher; "
                        "layer-wise distillation needs the model it was pruned from as --teacher")
    apply(teacher, list(layers), perm, d)
    return True
