"""Issue 22: would a channel permutation help N:M the way it helps 16x16 tiles? A proxy, before any claim.

N:M groups M consecutive *input* columns of each row, so only a matrix's input space matters: the residual stream
for q/k/v/gate/up, the MLP units for down, the v/o dims for o. Measured here on SmolLM2-135M's Wanda scores (dense
activations, 16 x 512 WikiText-2 train tokens): the kept Wanda mass of a 2:4 mask (mean over matrices, each matrix
normalised) for the identity order, for random relabellings (how much the order matters at all), and after a
greedy swap search on down_proj's input (the MLP units: one matrix per space, the most favourable case, as in
Pool & Yu 2021). Compare: block16x16 50% 0.581 -> 0.633 with the tile search (prune.json "permutation").

  .venv/bin/python bench/experiments/nm_permutation_proxy.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from prunetune.architecture import find_decoder_layers
from prunetune.data import load_text, tokenize
from prunetune.models import load_model
from prunetune.pruning import calibration as cal
from prunetune.pruning import channels
from prunetune.pruning.permutation import Permutation
from prunetune.pruning.scores import wanda_scores
from prunetune.sparsity.patterns import nm_mask


def kept(s: torch.Tensor) -> float:
    s = s / s.sum()
    return float((s * nm_mask(s, 2, 4)).sum())


@torch.no_grad()
def scores_of(model, windows) -> list[dict[str, torch.Tensor]]:
    prefix, layers = find_decoder_layers(model)
    roles = [channels.layer_roles(layer) for layer in layers]
    mods = {f"{i}.{r}": m for i, rl in enumerate(roles) for r, m in rl.items()}
    with cal.collecting(mods, hessian=False) as stats:
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    return [{r: wanda_scores(m.weight, stats.col_sq_norms(f"{i}.{r}")) for r, m in rl.items()}
            for i, rl in enumerate(roles)]


def mean_kept(scores, perm: Permutation, d) -> float:
    vals = []
    for i, layer in enumerate(scores):
        idx = perm.layer_indices(i, d)
        for role, s in layer.items():
            cols = idx[role][1]
            vals.append(kept(s if cols is None else s[:, cols]))
    return sum(vals) / len(vals)


def group_mass(s: torch.Tensor, order: torch.Tensor, groups: tuple[int, ...]) -> float:
    """2:4 kept mass of the given 4-column groups of `s` under column `order`."""
    return sum(float((c * nm_mask(c, 2, 4)).sum()) for c in (s[:, order[g:g + 4]] for g in groups))


def greedy_swaps(s: torch.Tensor, sweeps: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Columns of one matrix reordered by accepted random pair swaps that raise the 2:4 kept mass."""
    s = s / s.sum()
    order = torch.arange(s.shape[1])
    best = kept(s)
    for _ in range(sweeps * s.shape[1]):
        a, b = torch.randint(0, s.shape[1], (2,), generator=gen).tolist()
        if a // 4 == b // 4:
            continue
        trial = order.clone()
        trial[a], trial[b] = order[b], order[a]
        groups = (a // 4 * 4, b // 4 * 4)  # only these two groups change
        before, after = group_mass(s, order, groups), group_mass(s, trial, groups)
        if after > before:
            order, best = trial, best + after - before
    return order, best


def main() -> None:
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu", log=lambda m: None)
    ids = tokenize(load_text("wikitext2", "train", os.environ.get("PRUNETUNE_DATA_DIR", "/work/shared/data")),
                   tok).input_ids
    windows = cal.calibration_windows(ids, 16, 512, 0)
    t = time.perf_counter()
    scores = scores_of(model, windows)
    prefix, layers = find_decoder_layers(model)
    d = channels.dims_of(model, len(layers))
    print(f"scores in {time.perf_counter() - t:.0f}s")
    ident = Permutation.identity(d)
    print(f"2:4 kept Wanda mass, identity order: {mean_kept(scores, ident, d):.4f}")
    gen = torch.Generator().manual_seed(0)
    rand = []
    for k in range(5):
        p = Permutation(torch.randperm(d.hidden, generator=gen),
                        [torch.randperm(d.intermediate, generator=gen) for _ in range(d.layers)],
                        [torch.cat([h * d.head_dim + torch.randperm(d.head_dim, generator=gen)
                                    for h in range(d.kv_heads)]) for _ in range(d.layers)])
        rand.append(mean_kept(scores, p, d))
        print(f"random relabelling {k + 1}: {rand[-1]:.4f}")
    t = time.perf_counter()
    for i in (0, 15, 29):
        s = scores[i]["down"]
        _, best = greedy_swaps(s, 2, gen)
        print(f"layer {i} down_proj: identity {kept(s):.4f} -> greedy swaps {best:.4f} "
              f"({time.perf_counter() - t:.0f}s so far)")


if __name__ == "__main__":
    main()
