"""The stages of the pipeline, each a thin adapter around its command's library function: prune (`run_prune`),
finetune (`run_finetune`), merge (`run_merge`: the deployable sparse model), eval (`run_evaluate` on dense,
pruned and the recovered deployable model), report (`run_report`) and export (`run_export`, off by default).
This module only joins them: who reads whose output directory, and which fields the pipeline sets (the
configs themselves were built once from the YAML, in `pipeline.config`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune import rundir
from prunetune.analysis import fixes
from prunetune.data import data_dirs, load_text
from prunetune.errors import UserError
from prunetune.fmt import json_safe
from prunetune.pipeline.config import DATA_DEFAULTS, PipelineConfig, joined_fields
from prunetune.pipeline.runner import RunLayout, Stage, StageContext, StageInterrupted
from prunetune.recovery import registry as recovery_methods
from prunetune.rundir import RecoveryResult
from prunetune.runinfo import write_json

EVAL_MODELS = ("dense", "pruned", "recovered")
DENSE_SAME_SET = "dense-finetune-eval-set.json"


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
            if not dirs else f"{dataset} could not be loaded from {', '.join(map(str, dirs))} ({err})"
        )
    loaded = [load_text(fallback, split, data_dir) for split in splits]
    return DataChoice(fallback, data_dir, loaded[-1].origin, f"{fallback} instead of {dataset}: {why}",
                      fallback_used=True)


def stage_config(cfg: PipelineConfig, stage: str, layout: RunLayout, data: DataChoice) -> Any:
    """The stage's config (built once from the YAML) with this run's directories and data choice set."""
    config = cfg.configs[stage]
    names = {f.name for f in dataclasses.fields(config)}
    joined = joined_fields(stage, layout.root, cfg.model, data.dataset, data.data_dir)
    section = getattr(cfg, stage)
    changes = {k: v for k, v in joined.items() if k in names and not (k in DATA_DEFAULTS and k in section)}
    return dataclasses.replace(config, **changes)


# ---- prune ---------------------------------------------------------------------------------------------


def _prune_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    config = stage_config(cfg, "prune", layout, data)

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.pruning.engine import run_prune

        run_prune(config, console=ctx.console)
        info = rundir.read_pruned(ctx.dir).prune_json
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
        outputs=(rundir.PRUNE_JSON, "config.json"),
        volatile=frozenset(set(config.to_dict()) - set(config.identity())),
    )


# ---- finetune ------------------------------------------------------------------------------------------


def finetune_result(layout: RunLayout) -> RecoveryResult:
    """What the finetune stage saved, as its run records it (an adapter, or a model it trained itself)."""
    result = rundir.recovery_result(layout.stage_dir("finetune"))
    if result is None:
        raise UserError(f"the finetune stage saved no result in {layout.stage_dir('finetune')}; run it again "
                        "(`prunetune run CONFIG --stage finetune`)")
    return result


def _finetune_result_problem(stage_dir: Path) -> str | None:
    """A finished fine-tuning whose result (as its records name it) is gone must train again: the records,
    not the presence of a directory, say what the result is."""
    if rundir.recovery_result(stage_dir) is None:
        return "its result (as its records name it) is missing"
    return None


def _finetune_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    config = stage_config(cfg, "finetune", layout, data)

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
                f"set {fixes.lower_lr_after_nan(config.lr, flavour='pipeline')} in the YAML and run again"
            )
        return json_safe({k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, dict, list, Path))
                          or v is None})

    if config.method == recovery_methods.AUTO:
        what = "the method `auto` picks for the pruned model"
    else:
        method = recovery_methods.get(config.method)
        lora = f" r={config.lora_r} on {','.join(config.lora_targets)}" if method.makes_adapter else ""
        what = f"{method.summary}{lora}"
    steps = f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.epochs:g} epoch(s)"
    title = f"{what}, lr {config.lr:g}, block {config.block_size}, {steps}, on {config.dataset}"
    return Stage(
        name="finetune", deps=("prune",), title=title, config=config, run=run,
        outputs=(rundir.METRICS,), usable=_finetune_result_problem,
        volatile=frozenset({"out", "pruned", "data_dir", "resume_from_checkpoint", "overwrite", "report_to",
                            "probe_steps"}),
        resumable=True,
    )


# ---- merge: the deployable sparse model ---------------------------------------------------------------


def deployable_model(layout: RunLayout, merge_enabled: bool) -> dict[str, Any]:
    """The recovered model a user deploys, and what it is: a model the finetune stage trained itself; the merge
    stage's output (an adapter merged, pattern kept); or (merge turned off) the pruned model plus its adapter."""
    result = finetune_result(layout)
    if not result.is_adapter:
        return {"model": str(result.path), "adapter": None, "deployable": True,
                "describes": "deployable sparse model (trained directly, no adapter)"}
    if merge_enabled:
        return {"model": str(layout.stage_dir("merge")), "adapter": None, "deployable": True,
                "describes": "deployable sparse model (adapter merged, pattern kept)"}
    return {"model": str(layout.stage_dir("prune")), "adapter": str(result.path), "deployable": False,
            "describes": "pruned model + unmerged adapter (evaluated with its update masked by the pattern; "
                         "enable merge for the deployable directory)"}


def _merge_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    config = stage_config(cfg, "merge", layout, data)

    def run(ctx: StageContext) -> dict[str, Any]:
        result = finetune_result(layout)
        if not result.is_adapter:
            ctx.console.print(f"Nothing to merge: fine-tuning trained the sparse model itself ({result.path}).")
            return {"deployable": str(result.path), "merged": False}
        from prunetune.merge import run_merge

        this = dataclasses.replace(config, adapter=str(result.path))
        record = run_merge(this, console=ctx.console)
        after = record.get("sparsity_after") or {}
        return json_safe({"deployable": str(ctx.dir), "merged": True, "keep_sparsity": record.get("keep_sparsity"),
                          "sparsity": after.get("overall"), "perplexity": record.get("perplexity")})

    how = "pattern kept (LoRA delta masked by the keep-mask)" if config.keep_sparsity else "plain merge (dense)"
    return Stage(
        name="merge", deps=("prune", "finetune"), title=f"merge the adapter into the pruned model, {how}",
        config=config, run=run, outputs=(),
        volatile=frozenset({"out", "adapter", "model", "data_dir", "overwrite", "device"}),
    )


# ---- eval ----------------------------------------------------------------------------------------------


def _eval_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice, finetune: Any) -> Stage:
    # One template config; the evaluations differ only in model/adapter (fixed by the run directory) and, for
    # the dense model on the fine-tuning eval set, in split/seqlen/windows (fixed by the finetune config).
    config = stage_config(cfg, "eval", layout, data)
    merge_enabled = "merge" in cfg.stages

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.evaluate import run_evaluate

        recovered = deployable_model(layout, merge_enabled)
        variants = {
            "dense": dict(model=cfg.model, adapter=None),
            "pruned": dict(model=str(layout.stage_dir("prune")), adapter=None),
            "recovered": dict(model=recovered["model"], adapter=recovered["adapter"]),
        }
        test: dict[str, Any] = {"dataset": config.dataset, "split": config.split, "seqlen": config.seqlen,
                                "max_windows": config.max_windows, "recovered_model": recovered}
        # Listed in the stage directory's marker before they are written: a re-run replaces these, nothing else.
        rundir.claim(ctx.dir, [f"{m}.json" for m in EVAL_MODELS] + ["eval.json", DENSE_SAME_SET], "run")
        for name, which in variants.items():
            label = f"recovered ({recovered['describes']})" if name == "recovered" else name
            ctx.console.print(f"[bold]{label}[/] on {config.dataset}/{config.split}")
            r = run_evaluate(dataclasses.replace(config, out=str(ctx.dir / f"{name}.json"), **which),
                             console=ctx.console)
            test[name] = _eval_numbers(r)
        # The fine-tuning console measured pruned and recovered perplexity on its own eval set (the validation
        # split cut into block_size sequences: the same windows as this protocol). The dense model on that set
        # completes the comparison, so the report rates the recovery against the right reference.
        same_set = dataclasses.replace(
            config, model=cfg.model, adapter=None, dataset=finetune.dataset, split="validation",
            seqlen=finetune.block_size, max_windows=finetune.max_eval_samples, tasks=(),
            out=str(ctx.dir / DENSE_SAME_SET),
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
    recovered = "the deployable recovered model" if merge_enabled else "recovered (adapter)"
    measured = [] if config.dataset == "none" else [f"perplexity on {config.dataset}/{config.split}, seqlen {config.seqlen}{windows}"]
    if config.tasks:
        measured.append(f"zero-shot accuracy on {','.join(config.tasks)}" + (f" (first {config.limit})" if config.limit else ""))
    title = f"dense, pruned and {recovered}: {'; '.join(measured)}"
    deps = ("prune", "finetune", "merge") if merge_enabled else ("prune", "finetune")
    return Stage(
        name="eval", deps=deps, title=title, config=config, run=run,
        outputs=("eval.json", *(f"{m}.json" for m in EVAL_MODELS)),
        volatile=frozenset({"out", "model", "adapter", "data_dir", "quiet"}),
    )


def _eval_numbers(r: dict[str, Any]) -> dict[str, Any]:
    """What the story needs of one evaluation: perplexity (absent with `dataset: none`), sparsity, and the
    zero-shot accuracies when `tasks:` were given."""
    numbers = {key: r.get(key) for key in ("perplexity", "nll", "tokens", "windows")}
    numbers["sparsity"] = (r.get("sparsity") or {}).get("overall")
    if r.get("zeroshot"):
        zs = r["zeroshot"]
        numbers["zeroshot"] = {"tasks": {name: {m: t.get(m) for m in ("acc", "acc_norm", "samples")}
                                         for name, t in (zs.get("tasks") or {}).items()},
                               "mean_acc": zs.get("mean_acc"), "limit": zs.get("limit")}
    return numbers


# ---- report ------------------------------------------------------------------------------------------


def _report_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    config = stage_config(cfg, "report", layout, data)

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


# ---- export ------------------------------------------------------------------------------------------


def _export_stage(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> Stage:
    config = stage_config(cfg, "export", layout, data)
    merge_enabled = "merge" in cfg.stages

    def run(ctx: StageContext) -> dict[str, Any]:
        from prunetune.export.run import run_export

        source = deployable_model(layout, merge_enabled)
        if not source["deployable"]:
            raise UserError("export needs the deployable sparse model: turn the merge stage on (merge: {enabled: true})")
        result = run_export(dataclasses.replace(config, model_dir=source["model"]), log=ctx.console.print)
        return json_safe({k: v for k, v in dataclasses.asdict(result).items() if k != "record"})

    return Stage(
        name="export", deps=("merge",) if merge_enabled else ("finetune",),
        title=f"export the deployable sparse model as {config.format} ({config.compressor} compressor)",
        config=config, run=run, outputs=("config.json",), volatile=frozenset({"out", "model_dir", "overwrite"}),
    )


def build_stages(cfg: PipelineConfig, layout: RunLayout, data: DataChoice) -> list[Stage]:
    """The job's stages in order, each config set to this run's directories."""
    finetune = _finetune_stage(cfg, layout, data)
    build = {
        "prune": lambda: _prune_stage(cfg, layout, data),
        "finetune": lambda: finetune,
        "merge": lambda: _merge_stage(cfg, layout, data),
        "eval": lambda: _eval_stage(cfg, layout, data, finetune.config),
        "report": lambda: _report_stage(cfg, layout, data),
        "export": lambda: _export_stage(cfg, layout, data),
    }
    return [build[name]() for name in cfg.stages]
