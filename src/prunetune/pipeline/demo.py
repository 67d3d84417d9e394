"""The demo job: the whole pipeline on the bundled SmolLM2-135M, offline, sized for a 2-core CPU.

It is an ordinary pipeline config run by the same stage runner as `prunetune run` (configs/demo-cpu.yaml and
configs/demo-quick.yaml are these dicts written out; a test keeps them identical). Rerunning skips the
stages that are done.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from prunetune.pipeline.config import PipelineConfig, parse_pipeline
from prunetune.pipeline.demo_fit import DemoFit, apply_fit, fit_sizes, recorded_fit, time_window
from prunetune.pipeline.job import make_console, run_pipeline
from prunetune.pipeline.runner import RunLayout
from prunetune.pipeline.stages import deployable_model
from prunetune.recovery import registry as recovery_methods
from prunetune.recovery.auto import choose

# Full demo: sized for a 2-core CPU and a 15-minute budget (the README states the measured time). Every number
# is chosen for that budget; configs/llama2-7b-wanda-block16-lora.yaml shows the research-scale values.
DEMO: dict[str, Any] = {
    "name": "demo",
    "model": "smollm2-135m",
    "data": {
        "dataset": "wikitext2",        # when a local copy is configured (PRUNETUNE_DATA_DIR / --data-dir)
        "fallback": "wikipedia-vital",  # otherwise: the offline Wikipedia summaries that ship as a package
    },
    "prune": {
        "method": "wanda",
        "pattern": "block16x16",
        "sparsity": 0.5,
        # Channels relabelled (function-preserving) so that the important weights share tiles, before the tiles
        # are chosen; the default for block patterns, written out here. bench/RESULTS.md (permutation): the demo's
        # prune 486 -> 265 (5-round prototype, bf16), sparse-ft at 61k tokens 195 -> 112; this demo 490 -> 302.
        "permute": True,
        "reconstruct": True,   # least-squares update of the kept weights: ~10x lower pruned perplexity
        # Block-wise stage (EBFT-style): each pruned layer trained to reproduce the dense layer on the calibration
        # windows. bench/bench_recovery.py: pruned 2,091 -> 489 and recovered 356 -> 224 at 32k tokens.
        "block_reconstruct_epochs": 3,
        # Time budgets keep the demo under 15 minutes on a slower CPU (no native bf16): the steps that fit are
        # fitted from a timed step before the stage trains. On a CPU with native bf16 neither binds.
        "block_reconstruct_minutes": 3,
        "nsamples": 32,        # Wanda uses 128 x 2048 tokens; 32 x 512 is plenty for a 135M model
        "seqlen": 512,
        "seed": 0,
    },
    "finetune": {
        # `auto` picks by the pattern (prunetune.recovery.auto): for 16x16 blocks sparse fine-tuning of the kept
        # weights, which at an equal token budget recovered most in bench/bench_recovery.py (32k tokens: 285 vs
        # masked LoRA 410, LoRA merged masked 657, the Wanda recipe 3,261).
        "method": "auto",
        "lr": 3e-4,                      # 1e-4: 249, 3e-4: 224, 1e-3: 2,238 (undoes the block-wise stage)
        "block_size": 512,
        "max_steps": 120,                # 61k tokens, ~0.9 epoch of the local WikiText-2 train head
        "max_train_minutes": 4,          # fewer steps where 120 would not fit (the schedule is sized to them)
        "warmup_steps": 10,
        "logging_steps": 5,              # 16-25 train-loss points: enough for the rules to judge the demo's own curve
        "eval_steps": 40,
        "save_steps": 40,
        "max_eval_samples": 16,
        "per_device_eval_batch_size": 2,  # larger eval batches ran slower on CPU (evaluate's BatchTuner)
        "dtype": "auto",                 # bf16 where the CPU/GPU computes it natively, float32 elsewhere
    },
    "eval": {
        "split": "test",
        "seqlen": 512,
        "max_windows": 20,  # dense, pruned and recovered on the same 20 x 512 held-out tokens
    },
    "merge": {"enabled": True},  # LoRA methods: the adapter folded in with the 16x16 pattern kept (sparse-ft: no-op)
    "report": {},
}

# Smoke test (CI, `make demo-quick`): the same stages with tiny budgets, under 3 minutes. No reconstruction:
# its least-squares solves are the slowest part of pruning, and the smoke test proves the path, not the quality.
QUICK_OVERRIDES: dict[str, Any] = {
    "name": "demo-quick",
    # No permutation search (a minute of CPU on SmolLM2) and no reconstruction (the slowest part of pruning).
    "prune": {"permute": False, "reconstruct": False, "block_reconstruct_epochs": 0, "block_reconstruct_minutes": None, "nsamples": 8,
              "seqlen": 128},
    "finetune": {"block_size": 128, "max_steps": 8, "warmup_steps": 0, "logging_steps": 2, "eval_steps": 4,
                 "save_steps": 4, "max_eval_samples": 4},
    "eval": {"seqlen": 128, "max_windows": 4},
}


def demo_dict(quick: bool = False) -> dict[str, Any]:
    """The demo pipeline as a YAML-shaped dict (full, or the --quick smoke test)."""
    doc = copy.deepcopy(DEMO)
    if quick:
        for key, value in QUICK_OVERRIDES.items():
            if isinstance(value, dict):  # an option overridden with None is removed (its default applies)
                doc[key] = {k: v for k, v in (doc[key] | value).items() if v is not None}
            else:
                doc[key] = value
    return doc


def demo_config(quick: bool = False, model: str | None = None, data_dir: str | None = None,
                fit: DemoFit | None = None) -> PipelineConfig:
    doc = demo_dict(quick)
    if model is not None:
        doc["model"] = model
    if data_dir is not None:
        doc["data"]["data_dir"] = data_dir
    if fit is not None:
        doc = apply_fit(doc, fit)
    return parse_pipeline(doc, source="demo")


def fit_demo(cfg: DemoConfig, out: Path, console: Console) -> DemoFit | None:
    """The full demo's sizes for this machine (see `demo_fit`); None for the quick demo or `--full-size`."""
    if cfg.quick or not cfg.fit:
        return None
    fit = None if cfg.force else recorded_fit(out)
    if fit is None:
        doc = demo_dict()
        window_s, precision = time_window(cfg.model or doc["model"], doc["prune"]["seqlen"], log=console.print)
        fit = fit_sizes(doc, window_s, precision)
    console.print(fit.describe())
    return fit


@dataclass
class DemoConfig:
    """One invocation of `prunetune demo`."""

    quick: bool = False
    """The smoke-test sizes (under 3 minutes) instead of the full demo (7 minutes on a 2-core CPU with native
    bf16; where it trains in float32 its time budgets and `fit` keep it to about 15)."""
    out: str | None = None
    """Run directory (default runs/demo, or runs/demo-quick)."""
    data_dir: str | None = None
    """Local data directory holding WikiText-2 (else $PRUNETUNE_DATA_DIR; without one: wikipedia-vital)."""
    force: bool = False
    """Re-run every stage even when it is up to date."""
    model: str | None = None
    """Replace SmolLM2-135M (tests run the demo's code path on a tiny model)."""
    fit: bool = True
    """Fit the full demo's calibration and evaluation sizes to this machine's measured speed so it finishes in
    about 15 minutes (a no-op where it does anyway); `--full-size` runs the sizes of configs/demo-cpu.yaml."""


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the demo pipeline; returns the perplexity story (dense, pruned, recovered, report path)."""
    # The demo is offline by definition: never wait on an unreachable hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    console = console or make_console()
    quick = cfg.quick
    out = Path(cfg.out) if cfg.out is not None else Path("runs") / ("demo-quick" if quick else "demo")
    pipeline = demo_config(quick, cfg.model, cfg.data_dir)
    budget = "under 3 minutes" if quick else "in about 15 minutes on a 2-core CPU"
    console.print(
        f"[bold]prunetune demo[/]{' --quick' if quick else ''}: prune {pipeline.model} to 50% in 16x16 blocks "
        f"(Wanda{' + reconstruction' if pipeline.prune.get('reconstruct') else ''}"
        f"{' + block-wise stage' if pipeline.prune.get('block_reconstruct_epochs') else ''}), recover it "
        f"({_recovery(pipeline)}) into a deployable sparse model, evaluate and report — offline, {budget}. "
        "Finished stages are skipped when you run it again."
    )
    fit = fit_demo(cfg, out, console)  # after the banner: it loads the model (converting it on a first run)
    if fit is not None:
        pipeline = demo_config(quick, cfg.model, cfg.data_dir, fit)
    story = run_pipeline(pipeline, out, force=cfg.force, console=console, source="demo-quick" if quick else "demo",
                         notes={"demo_fit": fit.record()} if fit is not None else None)
    console.print(
        "Next: `prunetune monitor " f"{out}/finetune --once` shows the training run; `prunetune verify "
        f"{deployable_model(RunLayout(out), 'merge' in pipeline.stages)['model']}` "
        "checks the deployable model's pattern; `prunetune run configs/demo-cpu.yaml` runs this demo from its YAML, "
        "which you can edit."
    )
    return story


def _recovery(pipeline: PipelineConfig) -> str:
    """How the demo recovers, in words (`auto` resolved the way finetune will resolve it for this pattern)."""
    name = pipeline.finetune.get("method", recovery_methods.AUTO)
    if name == recovery_methods.AUTO:
        name = choose({"config": pipeline.prune})[0]
    return recovery_methods.get(name).summary
