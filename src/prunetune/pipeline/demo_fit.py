"""Sizing the full demo to the machine it runs on, so it finishes in about 15 minutes on a slow CPU too.

The demo's cost has two parts. Its two training stages carry time budgets (`block_reconstruct_minutes`,
`max_train_minutes`) and fit any machine by themselves. Everything else (calibration passes, Hessian sums, least
squares, the evaluations) is a fixed amount of model work whose time depends on how fast the machine runs the
model: ~4 minutes on a 2-core Zen 5 in float32, over 13 on a 2-core Zen 2 without native bf16. Before the demo
starts, one 512-token forward of the dense model is timed in the precision the prune will use; when the fixed
work at that speed would take the demo past `TARGET_S`, the sizes that drive it (calibration windows, evaluation
windows) shrink in proportion, down to floors, and the console says so beside the numbers. On a machine fast
enough nothing changes. A rerun into the same run directory reuses the sizes recorded there, so finished stages
stay finished; `prunetune run configs/demo-cpu.yaml` always runs the full sizes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune.pipeline.runner import RunLayout

TARGET_S = 14 * 60
"""The whole demo, in seconds: under the 15 minutes it promises, with a minute of margin."""

FIXED_WINDOW_FORWARDS = {"float32": 280, "bfloat16": 485}
"""The demo's work outside its two time budgets, in units of one 512-token forward of the dense model (the probe
below), by the precision the probe ran in. Measured on a 2-core Zen 5 from an empty cache (bench/RESULTS.md,
section demo): in float32 234 s of a 654 s demo at 0.85 s per probe forward; in bf16 165 s of 440 s at 0.34 s.
bf16 makes the forward 2.5x faster but not the float32 Hessian sums, least squares and loss, hence more units.
Any other precision (float16 on a GPU) counts as bf16, the larger."""

def fixed_window_forwards(precision: str) -> int:
    return FIXED_WINDOW_FORWARDS.get(precision, FIXED_WINDOW_FORWARDS["bfloat16"])


SCALED: tuple[tuple[str, str, int], ...] = (
    ("prune", "nsamples", 8),            # calibration windows: the prune's passes and Hessian sums
    ("eval", "max_windows", 5),          # dense / pruned / recovered on the held-out set
    ("finetune", "max_eval_samples", 4),  # the fine-tuning evaluations
)
"""(stage, option, floor): the sizes the fixed work is proportional to, and the least each may shrink to."""


@dataclass(frozen=True)
class DemoFit:
    """The measured speed and the sizes the demo runs with (`sizes`: only what changed, stage -> option -> value)."""

    window_s: float
    precision: str
    scale: float
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    full: dict[str, dict[str, int]] = field(default_factory=dict)
    reused: bool = False

    def record(self) -> dict[str, Any]:
        return {"window_s": self.window_s, "precision": self.precision, "scale": self.scale, "sizes": self.sizes,
                "full": self.full, "target_s": TARGET_S,
                "fixed_window_forwards": fixed_window_forwards(self.precision)}

    def describe(self) -> str:
        speed = f"a 512-token forward takes {self.window_s:.2f} s here ({self.precision})"
        if not self.sizes:
            return f"Demo sizes: full ({speed}; the demo fits {TARGET_S // 60} minutes as it is)."
        changes = ", ".join(f"{stage} {key} {self.full[stage][key]} -> {value}"
                            for stage, values in self.sizes.items() for key, value in values.items())
        source = "as fitted by this run directory's first run; " if self.reused else ""
        smaller = [what for stage, what in (("prune", "the pruning calibrates on fewer windows"),
                                            ("eval", "perplexities are measured on fewer held-out windows (noisier)"))
                   if stage in self.sizes]
        return (f"Demo sizes fitted to this machine ({source}{speed}, so the full sizes would take the demo past "
                f"{TARGET_S // 60} minutes): {changes}; {'; '.join(smaller) or 'smaller evaluation sets'}. "
                "`prunetune run configs/demo-cpu.yaml` or `prunetune demo --full-size` runs the full sizes.")


def budgets_s(doc: dict[str, Any]) -> float:
    """Seconds the demo's two time budgets may take."""
    prune, finetune = doc.get("prune", {}), doc.get("finetune", {})
    block = (prune.get("block_reconstruct_minutes") or 0) if prune.get("block_reconstruct_epochs") else 0
    return 60.0 * (block + (finetune.get("max_train_minutes") or 0))


def fit_sizes(doc: dict[str, Any], window_s: float, precision: str) -> DemoFit:
    """The sizes that keep the demo `doc` within TARGET_S at `window_s` seconds per probe forward (pure)."""
    available = TARGET_S - budgets_s(doc)
    need = fixed_window_forwards(precision) * window_s
    scale = 1.0 if need <= available else max(available, 0.0) / need
    full = {stage: {key: doc[stage][key]} for stage, key, _ in SCALED if key in doc.get(stage, {})}
    sizes: dict[str, dict[str, int]] = {}
    if scale < 1.0:
        for stage, key, floor in SCALED:
            if key not in doc.get(stage, {}):
                continue
            value = max(floor, min(doc[stage][key], round(doc[stage][key] * scale)))
            if value != doc[stage][key]:
                sizes.setdefault(stage, {})[key] = value
    return DemoFit(window_s, precision, scale, sizes, full)


def apply_fit(doc: dict[str, Any], fit: DemoFit) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for stage, values in fit.sizes.items():
        out[stage].update(values)
    return out


def recorded_fit(run_dir: Path) -> DemoFit | None:
    """The fit a previous demo run recorded in `run_dir`'s pipeline.json, if any."""
    try:
        rec = json.loads(RunLayout(run_dir).pipeline_json.read_text()).get("demo_fit")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("sizes"), dict):
        return None
    try:
        return DemoFit(float(rec["window_s"]), str(rec["precision"]), float(rec["scale"]),
                       {s: {k: int(v) for k, v in vals.items()} for s, vals in rec["sizes"].items()},
                       {s: {k: int(v) for k, v in vals.items()} for s, vals in rec.get("full", {}).items()},
                       reused=True)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def time_window(model_spec: str, seqlen: int, log: Any = None) -> tuple[float, str]:
    """Seconds of one `seqlen`-token forward of the dense model on this machine, in the precision `prune
    --dtype auto` calibrates in (the second of two: the first pays one-off costs); and that precision's name."""
    import torch

    from prunetune.devices import default_device, dtype_name
    from prunetune.models import load_model
    from prunetune.pruning.precision import resolve_precision

    device = default_device(None)
    precision = resolve_precision(None, device)
    model, _ = load_model(model_spec, dtype=precision.storage, device=device, log=log or (lambda *_: None))
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    seconds = 0.0
    with torch.no_grad(), precision.autocast():
        for _ in range(2):
            start = time.perf_counter()
            model(input_ids=ids.to(device), use_cache=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
    return seconds, dtype_name(precision.compute)
