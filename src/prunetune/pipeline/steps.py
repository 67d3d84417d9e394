"""The four stages of the pipeline, each a thin adapter around its command's library function:
prune (`run_prune`), finetune (`run_finetune`), eval (`run_evaluate` on dense, pruned and recovered) and report
(`run_report`). This module only joins them: who reads whose output directory, and which fields are chosen by
the pipeline rather than the YAML."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.data import data_dirs, load_text
from prunetune.errors import UserError
from prunetune.pipeline.config import PipelineConfig, build_stage_config
from prunetune.pipeline.stages import RunLayout, Stage, StageContext, StageInterrupted
from prunetune.runinfo import write_json

EVAL_MODELS = ("dense", "pruned", "recovered")


@dataclass(frozen=True)
class DataChoice:
    """The corpus the stages read, and why (the console states it)."""

    dataset: str
    data_dir: str | None
    origin: str
    reason: str
    fallback_used: bool = False
    note: str | None = None


def _data_dir_text(data_dir: str | None) -> str:
    if data_dir:
        return f"--data-dir {data_dir}"
    env = os.environ.get("PRUNETUNE_DATA_DIR")
    return f"PRUNETUNE_DATA_DIR={env}" if env else "no local data directory configured"


def choose_data(dataset: str, data_dir: str | None, fallback: str | None,
                splits: Sequence[str] = ("train", "validation", "test")) -> DataChoice:
    """`dataset` when every split the stages need loads (locally, or from the hub when online), else `fallback`."""
    try:
        loaded = [load_text(dataset, split, data_dir) for split in splits]
        note = next((t.note for t in loaded if t.note), None)
        origin = loaded[-1].origin
        where = f"local copy in {Path(origin).parent} ({_data_dir_text(data_dir)})" if Path(origin).exists() \
            else f"from {origin}"
        return DataChoice(dataset, data_dir, origin, f"{dataset}, {where}", note=note)
    except UserError as err:
        if fallback is None or fallback == dataset:
            raise
        dirs = data_dirs(data_dir)
        why = (
            f"no local {dataset} copy is configured (set PRUNETUNE_DATA_DIR or pass --data-dir)"
            if not dirs else f"{dataset} is not in {', '.join(map(str, dirs))}: {str(err).split(': ', 1)[-1]}"
        )
    loaded = [load_text(fallback, split, data_dir) for split in splits]
    return DataChoice(fallback, data_dir, loaded[-1].origin, f"{fallback} instead of {dataset}: {why}",
                      fallback_used=True)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _prune_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    from prunetune.pruning.config import PruneConfig

    out = layout.stage_dir("prune")
    section = dict(cfg.prune)
    section.setdefault("calib_dataset", data.dataset)
    config = build_stage_config(
        "prune", section, model=cfg.model, out=str(out), data_dir=data.data_dir, overwrite=True
    )
    assert isinstance(config, PruneConfig)

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.pruning.engine import run_prune

        run_prune(config, console=ctx.console)
        info = json.loads((ctx.dir / "prune.json").read_text())
        return {
            "sparsity": (info.get("overall") or {}).get("achieved"),
            "pattern_ok": (info.get("pattern_check") or {}).get("ok"),
            "dense_perplexity": info.get("dense_perplexity"),
            "pruned_perplexity": info.get("pruned_perplexity"),
            "timings": info.get("timings"),
        }

    reconstruct = " + reconstruction" if config.reconstruct else ""
    title = f"{config.method} {config.pattern} at {config.sparsity:.0%}{reconstruct}, calibrated on {config.calib_dataset}"
    return Stage(
        name="prune", deps=(), title=title, config=config, run=run,
        outputs=("prune.json", "masks.safetensors", "config.json"),
        volatile=frozenset(set(config.to_dict()) - set(config.identity())),
    )


def adapter_dir(finetune_dir: Path) -> Path:
    """Where the finetune stage's final adapter is (the run directory itself, or its `adapter/`)."""
    for candidate in (finetune_dir / "adapter", finetune_dir):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return finetune_dir / "adapter"


def _finetune_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    out = layout.stage_dir("finetune")
    section = dict(cfg.finetune)
    section.setdefault("dataset", data.dataset)
    config = build_stage_config(
        "finetune", section, pruned=str(layout.stage_dir("prune")), out=str(out), data_dir=data.data_dir
    )

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.finetune.engine import run_finetune

        # The pipeline owns this directory: it was cleared before a fresh run, so the engine may write into it.
        this = dataclasses.replace(config, resume_from_checkpoint="auto", overwrite=False) if ctx.resume \
            else dataclasses.replace(config, overwrite=True)
        result = run_finetune(this) or {}
        status = result.get("status", "completed")
        if status == "interrupted":
            raise StageInterrupted("fine-tuning stopped before the end; its checkpoint is kept")
        if status == "diverged":
            raise UserError(
                f"fine-tuning diverged (NaN/Inf loss; last good checkpoint: {result.get('last_good_checkpoint')}); "
                f"lower finetune.lr (now {config.lr:g}, try {config.lr / 10:g}) in the YAML and run again"
            )
        return _jsonable_summary(result)

    targets = ",".join(config.lora_targets)
    steps = f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)"
    title = (f"LoRA r={config.lora_r} on {targets}, lr {config.lr:g}, block {config.block_size}, {steps}, "
             f"on {config.dataset}")
    return Stage(
        name="finetune", deps=("prune",), title=title, config=config, run=run,
        outputs=("metrics.jsonl",),
        volatile=frozenset({"out", "pruned", "data_dir", "resume_from_checkpoint", "overwrite", "report_to",
                            "probe_steps"}),
        resumable=True,
    )


def _jsonable_summary(result: dict[str, Any]) -> dict[str, Any]:
    keep: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            keep[key] = str(value)
        elif isinstance(value, (str, int, float, bool)) or value is None:
            keep[key] = value
        elif isinstance(value, Path):
            keep[key] = str(value)
        elif isinstance(value, (dict, list)):
            try:
                json.dumps(value)
            except TypeError:
                continue
            keep[key] = value
    return keep


def _eval_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice, finetune: Any) -> Stage:
    out = layout.stage_dir("eval")
    section = dict(cfg.eval)
    section.setdefault("dataset", data.dataset)
    data_dir = [data.data_dir] if data.data_dir else None
    # One template config; the evaluations differ only in model/adapter (fixed by the run directory) and, for
    # the dense model on the fine-tuning eval set, in split/seqlen/windows (fixed by the finetune config).
    config = build_stage_config("eval", section, model=cfg.model, out=str(out / "dense.json"),
                                data_dir=data_dir, quiet=False)

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.evaluate_command import run_evaluate

        prune_dir = layout.stage_dir("prune")
        variants = {
            "dense": dict(model=cfg.model, adapter=None),
            "pruned": dict(model=str(prune_dir), adapter=None),
            "recovered": dict(model=str(prune_dir), adapter=str(adapter_dir(layout.stage_dir("finetune")))),
        }
        test: dict[str, Any] = {"dataset": config.dataset, "split": config.split, "seqlen": config.seqlen,
                                "max_windows": config.max_windows}
        for name, which in variants.items():
            ctx.console.print(f"[bold]{name} model[/] on {config.dataset}/{config.split}")
            r = run_evaluate(dataclasses.replace(config, out=str(ctx.dir / f"{name}.json"), **which),
                             console=ctx.console)
            test[name] = _eval_numbers(r)
        # The fine-tuning console measured pruned and recovered perplexity on its own eval set (the validation
        # split cut into block_size sequences: the same windows as this protocol). The dense model on that set
        # completes the comparison, so the report rates the recovery against the right reference.
        same_set = dataclasses.replace(
            config, model=cfg.model, adapter=None, dataset=finetune.dataset, split="validation",
            seqlen=finetune.block_size, max_windows=finetune.max_eval_samples,
            out=str(ctx.dir / "dense-finetune-eval-set.json"),
        )
        ctx.console.print(f"[bold]dense model[/] on the fine-tuning eval set ({finetune.dataset}/validation)")
        r = run_evaluate(same_set, console=ctx.console)
        summary = {
            "test": test,
            "finetune_eval_set": {"dataset": finetune.dataset, "split": "validation", "seqlen": finetune.block_size,
                                  "max_windows": finetune.max_eval_samples, "dense": _eval_numbers(r)},
        }
        write_json(ctx.dir / "eval.json", summary)
        return summary

    windows = f", first {config.max_windows} windows" if config.max_windows else ""
    title = (f"perplexity of dense, pruned and recovered on {config.dataset}/{config.split}, "
             f"seqlen {config.seqlen}{windows}")
    return Stage(
        name="eval", deps=("prune", "finetune"), title=title, config=config, run=run,
        outputs=("eval.json", *(f"{m}.json" for m in EVAL_MODELS)),
        volatile=frozenset({"out", "model", "adapter", "data_dir", "quiet"}),
    )


def _eval_numbers(r: dict[str, Any]) -> dict[str, Any]:
    return {"perplexity": r["perplexity"], "nll": r["nll"], "tokens": r["tokens"], "windows": r["windows"],
            "sparsity": (r.get("sparsity") or {}).get("overall")}


def _report_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    out = layout.stage_dir("report")
    config = build_stage_config("report", dict(cfg.report), source=str(layout.stage_dir("finetune")),
                                out=str(out), dense_ppl=None)

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.analysis.report import render_console, run_report

        same_set = ctx.upstream.get("eval", {}).get("finetune_eval_set") or {}
        dense = (same_set.get("dense") or {}).get("perplexity")
        data = run_report(dataclasses.replace(config, dense_ppl=dense))
        ctx.console.print(render_console(data), markup=False, highlight=False)
        files = data.get("files") or {}
        ctx.console.print(f"Report: {files.get('report.html')} | {files.get('report.md')} | {files.get('report.json')}")
        rating = data.get("perplexity_rating") or {}
        return {"summary": data.get("summary"), "rating": rating.get("band"), "ratio": rating.get("ratio"),
                "anomalies": [a.get("kind") for a in data.get("anomalies") or []], "files": files}

    return Stage(
        name="report", deps=("finetune", "eval"), title="plots and diagnosis of the fine-tuning run",
        config=config, run=run, outputs=("report.md", "report.html", "report.json"),
        volatile=frozenset({"out", "source", "dense_ppl", "pruned_ppl"}),
    )


def build_stages(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> list[Stage]:
    """The pipeline's stages in order, their configs built (and so validated) from the YAML."""
    finetune = _finetune_stage(cfg, layout, data)
    return [
        _prune_stage(cfg, layout, data),
        finetune,
        _eval_stage(cfg, layout, data, finetune.config),
        _report_stage(cfg, layout, data),
    ]
