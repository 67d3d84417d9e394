"""Channel permutation before tile selection, the pure part: which relabellings of a Llama-layout model's channels
leave its function unchanged, and a search for the one that puts the most score mass into the tiles a block mask
keeps. Tensors in, tensors out; `channels.py` gathers the scores and applies the result to a model.

Why: a 16x16 tile holds 16 consecutive input and 16 consecutive output channels, an accident of the checkpoint's
channel order. Relabelling channels (Pool & Yu 2021 do it for N:M) moves weights between tiles without changing
what the model computes, so the same Wanda scores can be grouped into tiles that hold more of them.

Permutable channel spaces (index i of the new model takes index p[i] of the old one):
  residual (hidden,), one for the whole model: embedding and lm_head columns, every RMSNorm weight, input columns
      of q/k/v/gate/up, output rows of o/down
  mlp (intermediate,), per layer: rows of gate and up, columns of down
  vo (kv_heads * head_dim,), per layer, within each KV head only: rows of v and, for every query head that reads
      that KV head, the same columns of o
Not permuted: q/k head dimensions (RoPE ties each rotary pair to its frequency, so moving one changes the
function) and whole heads (a head of 64 is whole tiles wide: moving it moves whole tiles and changes no ranking).

Objective: the mean over pruned matrices of the fraction of the matrix's score mass inside the tiles its mask
keeps (the selection of `block_mask` at the matrix's target and comparison group). Search: alternating
maximisation, one space at a time (per layer: mlp, then vo; then the residual space across all layers). With
the keep-masks fixed, placing units into positions is a linear assignment problem (value of unit u at position
p = the score mass u would bring into kept tiles there); then the masks are re-selected for the new order.
For matrices of whole tiles neither step can lower the objective (edge tiles are ranked by mean, so there a
re-selection may trade a little mass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from prunetune.sparsity.patterns import tile_keep, tile_sums

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
"""The seven projections of a Llama-layout decoder layer (q_proj ... down_proj)."""

AXES: dict[str, tuple[str | None, str | None]] = {
    "q": (None, "residual"), "k": (None, "residual"), "v": ("vo", "residual"), "o": ("residual", "o_in"),
    "gate": ("mlp", "residual"), "up": ("mlp", "residual"), "down": ("residual", "mlp"),
}
"""The channel space of each role's (out, in) axes; None: not permutable. `o_in` is `vo` repeated per query head."""


@dataclass(frozen=True)
class Dims:
    """The sizes that decide which permutations exist."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not share {self.kv_heads} KV heads evenly")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


@dataclass
class Permutation:
    """New index i takes old index p[i], per channel space."""

    residual: torch.Tensor
    mlp: list[torch.Tensor]
    vo: list[torch.Tensor]

    @classmethod
    def identity(cls, d: Dims) -> Permutation:
        return cls(torch.arange(d.hidden), [torch.arange(d.intermediate) for _ in range(d.layers)],
                   [torch.arange(d.kv_heads * d.head_dim) for _ in range(d.layers)])

    def index(self, space: str | None, layer: int, d: Dims) -> torch.Tensor | None:
        """The index of `space` in `layer` (None for a space that is not permuted)."""
        if space is None:
            return None
        if space == "residual":
            return self.residual
        if space == "mlp":
            return self.mlp[layer]
        if space == "vo":
            return self.vo[layer]
        return o_columns(self.vo[layer], d)

    def layer_indices(self, layer: int, d: Dims) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """role -> (row index, column index) of that role's matrix in `layer`."""
        return {role: (self.index(rows, layer, d), self.index(cols, layer, d)) for role, (rows, cols) in AXES.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> int64 tensor (what prunetune/permutation.safetensors holds)."""
        out = {"residual": self.residual}
        out |= {f"mlp.{i}": p for i, p in enumerate(self.mlp)}
        out |= {f"vo.{i}": p for i, p in enumerate(self.vo)}
        return {k: v.to(torch.int64).contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Permutation:
        layers = sum(1 for k in tensors if k.startswith("mlp."))
        return cls(tensors["residual"], [tensors[f"mlp.{i}"] for i in range(layers)],
                   [tensors[f"vo.{i}"] for i in range(layers)])

    def is_identity(self) -> bool:
        return all(bool((p == torch.arange(p.numel())).all()) for p in self.tensors().values())


def o_columns(vo: torch.Tensor, d: Dims) -> torch.Tensor:
    """o_proj's column index (heads * head_dim,) from v's row index `vo` (kv_heads * head_dim,): query head h reads
    KV head h // group (Transformers' repeat_kv), so its columns move as that KV head's rows do."""
    local = vo.view(d.kv_heads, d.head_dim) - (torch.arange(d.kv_heads) * d.head_dim)[:, None]  # (kv, hd)
    per_head = local.repeat_interleave(d.group, dim=0)  # (heads, hd)
    return (per_head + (torch.arange(d.heads) * d.head_dim)[:, None]).flatten()


def is_valid(p: Permutation, d: Dims) -> bool:
    """Each index a permutation of its space, and vo's within each KV head (a bad index would change the model)."""
    def perm_of(t: torch.Tensor, n: int) -> bool:
        return t.shape == (n,) and bool((torch.sort(t).values == torch.arange(n)).all())

    heads_ok = all(bool((v.view(d.kv_heads, d.head_dim) // d.head_dim == torch.arange(d.kv_heads)[:, None]).all())
                   for v in p.vo)
    return (perm_of(p.residual, d.hidden) and len(p.mlp) == len(p.vo) == d.layers and heads_ok
            and all(perm_of(m, d.intermediate) for m in p.mlp)
            and all(perm_of(v, d.kv_heads * d.head_dim) for v in p.vo))


def permute_matrix(m: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """`m` relabelled: m[rows][:, cols] (None leaves that axis)."""
    if rows is not None:
        m = m.index_select(0, rows.to(m.device))
    if cols is not None:
        m = m.index_select(1, cols.to(m.device))
    return m


# ---- the objective and the search ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """How the masks select tiles: the tile shape, the comparison group, and each matrix's target."""

    h: int
    w: int
    compare: str
    targets: Sequence[Mapping[str, float]]
    """Per layer, role -> sparsity; a role absent from a layer is not pruned (it keeps everything)."""


@dataclass
class SearchResult:
    permutation: Permutation
    history: list[float] = field(default_factory=list)
    """The objective before the search, then after each round."""


class _State:
    """Normalised scores in the original channel order and the permutation found so far."""

    def __init__(self, scores: Sequence[Mapping[str, torch.Tensor]], d: Dims, plan: TilePlan) -> None:
        self.d, self.plan = d, plan
        # Each pruned matrix weighs the same in the objective, whatever its size or score scale.
        self.scores = [{r: s.float() / s.float().sum().clamp_min(1e-30) for r, s in layer.items()
                        if r in plan.targets[i]} for i, layer in enumerate(scores)]
        self.perm = Permutation.identity(d)

    def view(self, i: int, role: str) -> torch.Tensor:
        rows, cols = AXES[role]
        return permute_matrix(self.scores[i][role], self.perm.index(rows, i, self.d), self.perm.index(cols, i, self.d))

    def keep(self, i: int, role: str, view: torch.Tensor) -> torch.Tensor:
        """(R, C) kept tiles of this matrix in its current order."""
        p = self.plan
        return tile_keep(tile_sums(view, p.h, p.w), tuple(view.shape), p.targets[i][role], p.h, p.w, p.compare)

    def kept_mass(self, i: int, role: str) -> float:
        v = self.view(i, role)
        return float((tile_sums(v, self.plan.h, self.plan.w) * self.keep(i, role, v)).sum())

    def objective(self) -> float:
        masses = [self.kept_mass(i, r) for i, layer in enumerate(self.scores) for r in layer]
        return sum(masses) / max(len(masses), 1)

    def value(self, i: int, role: str, axis: int) -> torch.Tensor:
        """(units, positions): score mass of the matrix's unit u (current order, along `axis`) inside kept tiles
        if it sat at position p, the keep-mask fixed."""
        p = self.plan
        v = self.view(i, role)
        keep = self.keep(i, role, v).float()  # (R, C)
        if axis == 0:  # units are rows: their mass per column-tile, against each row-tile's kept columns
            per_group = tile_sums(v, 1, p.w) @ keep.T  # (out, R)
            return per_group[:, torch.arange(v.shape[0]) // p.h]
        per_group = tile_sums(v, p.h, 1).T @ keep  # (in, C)
        return per_group[:, torch.arange(v.shape[1]) // p.w]


def assign(value: torch.Tensor) -> torch.Tensor:
    """The order (positions -> units) maximising the summed value of units x positions."""
    rows, cols = linear_sum_assignment(value.double().numpy(), maximize=True)
    order = torch.empty(value.shape[0], dtype=torch.long)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return order


def _step_mlp(st: _State, i: int) -> None:
    layer = st.scores[i]
    n = st.d.intermediate
    val = torch.zeros(n, n)
    for role, axis in (("gate", 0), ("up", 0), ("down", 1)):
        if role in layer:
            val += st.value(i, role, axis)
    if val.any():
        st.perm.mlp[i] = st.perm.mlp[i][assign(val)]


def _step_vo(st: _State, i: int) -> None:
    d, layer = st.d, st.scores[i]
    n, hd = d.kv_heads * d.head_dim, d.head_dim
    val = st.value(i, "v", 0) if "v" in layer else torch.zeros(n, n)
    if "o" in layer:
        vo_ = st.value(i, "o", 1)  # (heads*hd, heads*hd) in o's current column order
        for qh in range(d.heads):  # query head qh's columns are KV head qh // group's rows
            kv = qh // d.group
            val[kv * hd:(kv + 1) * hd, kv * hd:(kv + 1) * hd] += vo_[qh * hd:(qh + 1) * hd, qh * hd:(qh + 1) * hd]
    if not val.any():
        return
    order = torch.cat([kv * hd + assign(val[kv * hd:(kv + 1) * hd, kv * hd:(kv + 1) * hd])
                       for kv in range(d.kv_heads)])  # never across heads
    st.perm.vo[i] = st.perm.vo[i][order]


def _step_residual(st: _State) -> None:
    val = torch.zeros(st.d.hidden, st.d.hidden)
    for i, layer in enumerate(st.scores):
        for role in layer:
            rows, cols = AXES[role]
            val += st.value(i, role, 0 if rows == "residual" else 1)
    if val.any():
        st.perm.residual = st.perm.residual[assign(val)]


def _step_layer(st: _State, i: int) -> None:
    _step_mlp(st, i)
    _step_vo(st, i)


def search(scores: Sequence[Mapping[str, torch.Tensor]], d: Dims, plan: TilePlan, rounds: int,
           min_gain: float = 1e-4, log: Callable[[str], None] | None = None, workers: int = 1) -> SearchResult:
    """The permutation that (locally) maximises the kept score mass. `scores[i][role]` is layer i's (out, in)
    score matrix of `role` in the model's own channel order (Wanda |W| * ||x||, or |W|). Stops after `rounds`
    rounds, or earlier when a round gains less than `min_gain`.

    The per-layer steps touch disjoint matrices and indices (the residual index is fixed meanwhile), so they run
    on `workers` threads; the assignments (scipy, which releases the GIL) are most of the time, and the result does
    not depend on the order."""
    st = _State(scores, d, plan)
    result = SearchResult(st.perm, [st.objective()])
    for r in range(rounds):
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda i: _step_layer(st, i), range(d.layers)))
        else:
            for i in range(d.layers):
                _step_layer(st, i)
        _step_residual(st)
        result.history.append(st.objective())
        result.permutation = st.perm
        if log is not None:
            log(f"round {r + 1}: kept score mass {result.history[-2]:.4f} -> {result.history[-1]:.4f}")
        if result.history[-1] - result.history[-2] < min_gain:
            break
    return result
