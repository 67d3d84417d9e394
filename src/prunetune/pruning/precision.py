"""In which precision `prune` keeps the weights and runs its calibration forward passes (issues 13 and 22).

- `compute`: the dtype of the calibration forward passes (capture, every layer's forward, the block-wise stage,
  the `--eval` perplexity checks).
- `storage`: the dtype the model is loaded, pruned and saved in. On CPU always float32, whatever the compute dtype:
  the saved model keeps the dense checkpoint's precision, and bf16/fp16 compute runs under autocast (so an explicit
  `--dtype bfloat16` is exactly the calibration `auto` would run in bf16, never weights rounded to bf16). On CUDA
  the compute dtype, so a 7B model is held in bf16 (half the host memory).
- `--dtype auto` chooses the compute dtype by what it costs (issue 22): bf16 only where the device computes it
  natively (`devices.resolve_dtype`) *and* bf16 calibration was measured to give the same perplexity as float32
  within `TOLERANCE_PCT` on average for this method and pattern (`MEASURED`, from bench/bench_calib_precision.py).
  Anything else, an unmeasured recipe included, calibrates in float32: a few percent of perplexity lost silently
  is worth more than the minutes bf16 saves, and the reason (with the measured time saving) says how to trade.
- Always float32, whatever is chosen here: the activation statistics and Hessians (`calibration.InputStats`
  runs its hooks with autocast off), scores (`scores.py`: ranking ties from bf16 rounding would change the
  masks, and scoring is O(out*in), nothing to gain), and all of reconstruction and SparseGPT
  (`reconstruct.py`, `sparsegpt.py`: Cholesky factorisations of X^T X lose rank in bf16). What bf16 changes is
  the activations those statistics are taken from: rounded inputs to o_proj/down_proj, and rounding that
  accumulates through the residual stream layer after layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from prunetune.devices import DTYPE_NAMES, dtype_name, resolve_dtype
from prunetune.errors import UserError

TOLERANCE_PCT = 0.5
"""bf16 calibration is `auto`'s choice only where its mean perplexity cost over seeds is at most this (issue 22:
window sampling alone moves the perplexity +-1.5%, so a cost below 0.5% is lost in it; one above is a price paid
on every run)."""


@dataclass(frozen=True)
class CalibrationRecipe:
    """What decides bf16's measured cost: the method and the pattern's kind (unstructured | nm | block), and
    whether anything beyond plain calibration runs on the same forwards (reconstruction, OWL, block-wise)."""

    method: str
    pattern_kind: str
    extras: tuple[str, ...] = ()

    def label(self) -> str:
        kind = {"nm": "N:M", "block": "block"}.get(self.pattern_kind, self.pattern_kind)
        return " + ".join((f"{self.method} {kind}", *self.extras))


@dataclass(frozen=True)
class Bf16Cost:
    """bf16 calibration against float32 on the same windows (bench/RESULTS.md, section calib-precision)."""

    ppl_pct: float
    """Mean over seeds of perplexity(bf16) / perplexity(float32) - 1, in percent (WikiText-2 test, float32 eval)."""
    sd_pct: float
    """Its standard deviation over the seeds."""
    seeds: int
    time_x: float
    """float32 prune seconds / bf16 prune seconds, the two run back to back."""
    measured_on: str

    def record(self) -> dict[str, Any]:
        return {"ppl_pct": self.ppl_pct, "sd_pct": self.sd_pct, "seeds": self.seeds, "float32_time_x": self.time_x,
                "measured_on": self.measured_on}


_ON = "SmolLM2-135M, 32 x 512 WikiText-2 calibration windows, 2-core AMD EPYC with avx512_bf16"
MEASURED: dict[tuple[str, str], Bf16Cost] = {
    # Seeds 0/1/2: +1.05%, +4.33%, -2.92%. The sign is not settled at 3 seeds (sd 3.6%), but bf16 adds that much
    # run-to-run spread (and its result changes with the thread count, float32's does not): float32 (issue 22).
    ("wanda", "nm"): Bf16Cost(ppl_pct=0.82, sd_pct=3.63, seeds=3, time_x=1.6, measured_on=_ON),
}
"""bf16's cost per (method, pattern kind), plain calibration (no reconstruction, OWL or block-wise stage), from
bench/calib_precision.json: the (method, pattern) cells measured on at least 3 seeds, and only those."""


def measured_cost(recipe: CalibrationRecipe | None) -> Bf16Cost | None:
    """The measurement that covers `recipe`, or None (an unmeasured recipe: extras, magnitude, no recipe)."""
    if recipe is None or recipe.extras:
        return None
    return MEASURED.get((recipe.method, recipe.pattern_kind))


@dataclass(frozen=True)
class Precision:
    storage: torch.dtype
    compute: torch.dtype
    reason: str
    device: str
    cost: Bf16Cost | None = None
    """The measurement `auto` decided by (None: explicit, no native bf16, or unmeasured)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every calibration forward pass runs in (a no-op when compute == storage)."""
        if self.compute == self.storage:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.compute)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"storage": dtype_name(self.storage), "compute": dtype_name(self.compute),
                               "reason": self.reason}
        if self.cost is not None:
            rec["bf16_cost"] = self.cost.record() | {"tolerance_pct": TOLERANCE_PCT}
        return rec

    def describe(self) -> str:
        if self.compute == self.storage:
            return self.reason
        return f"{self.reason}; weights kept in {dtype_name(self.storage)}, forward passes under autocast"


def check_dtype_name(name: str | None) -> None:
    """UserError for a `--dtype` that is neither auto nor a known dtype (validated before any work)."""
    if name not in (None, "auto") and name not in DTYPE_NAMES:
        raise UserError(f"unknown --dtype {name!r}; choose auto, float32, bfloat16 or float16")


def resolve_precision(requested: str | None, device: str, recipe: CalibrationRecipe | None = None) -> Precision:
    """The prune's precision: an explicit `requested` dtype as asked; `auto` by the rule in the module docstring."""
    native, reason = resolve_dtype(requested or "auto", device, "calibration")
    cost = None
    if requested in (None, "auto") and native != torch.float32:
        native, reason, cost = choose_by_cost(native, reason, recipe)
    storage = native if torch.device(device).type == "cuda" else torch.float32
    return Precision(storage, native, reason, device, cost)


def choose_by_cost(native: torch.dtype, why_native: str, recipe: CalibrationRecipe | None
                   ) -> tuple[torch.dtype, str, Bf16Cost | None]:
    """(compute dtype, reason, the measurement used) for `auto` on a device with native half precision."""
    cost = measured_cost(recipe)
    what = recipe.label() if recipe is not None else "this recipe"
    if cost is None:
        return torch.float32, (f"float32: bf16 calibration is unmeasured for {what}, so not assumed free "
                               f"(--dtype bfloat16 to run it: {why_native})"), None
    measured = (f"{cost.ppl_pct:+.1f}% perplexity on average over {cost.seeds} seeds (sd {cost.sd_pct:.1f}%; "
                f"bench/RESULTS.md, calib-precision)")
    if cost.ppl_pct <= TOLERANCE_PCT:
        return native, (f"{why_native}; bf16 calibration costs {what} {measured}, within {TOLERANCE_PCT:g}%, and "
                        f"float32 would take {cost.time_x:.1f}x as long"), cost
    return torch.float32, (f"float32: bf16 calibration costs {what} {measured}, more than {TOLERANCE_PCT:g}%; "
                           f"it would be {cost.time_x:.1f}x faster (--dtype bfloat16 trades the quality for the "
                           f"time)"), cost
