"""`prunetune evaluate` as a library: perplexity of a model (optionally with a LoRA adapter), by the protocol
of the Wanda/SparseGPT evaluation code so numbers sit beside published tables: the split's rows joined with
"\\n\\n", tokenised once, cut into non-overlapping windows of `seqlen` (the remainder dropped), mean token
negative log-likelihood, perplexity = exp(mean).

`EvalConfig` + `run_evaluate(cfg)` are what the CLI and the pipeline call; `prunetune.perplexity` is the measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn

from prunetune import phases
from prunetune.data import load_text, tokenize, windows_of
from prunetune.devices import DTYPE_NAMES, default_device, dtype_name, resolve_dtype
from prunetune.errors import UserError
from prunetune.models import ModelRef, apply_adapter, context_length, load_config, load_model, resolve_model
from prunetune.oserrors import user_error
from prunetune.perplexity import BatchTuner, PerplexityResult, auto_batch_size, perplexity
from prunetune.recovery import registry as recovery_methods
from prunetune.recovery.base import RecoveryMethod
from prunetune.rundir import adapter_base, check_writable_file, load_keep_masks, masks_file, read_adapter_meta
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity.measure import sparsity_report

__all__ = ["EvalConfig", "PerplexityResult", "perplexity", "run_evaluate", "windows_of"]

@dataclass
class EvalConfig:
    model: str | None = None
    """Alias, hub id, model directory or .gguf file. Optional with --adapter (its base is recorded there)."""
    adapter: str | None = None
    """A LoRA adapter directory (PEFT format) applied on top of the model."""
    dataset: str = "wikitext2"
    """Registry name (wikitext2, c4, wikipedia-vital) or a local data file."""
    split: str = "test"
    """train, validation or test (the published tables use test)."""
    seqlen: int = 2048
    """Window length in tokens; 2048 is the Wanda/SparseGPT tables' setting for Llama models."""
    max_windows: int | None = None
    """Evaluate only the first N windows (quick checks); None = the whole split."""
    batch_size: int | None = None
    """Windows per forward pass; default: automatic, up to 4 on CPU (16 on a GPU) while the logits fit in a
    quarter of the free memory. The perplexity does not depend on it."""
    dtype: str = "auto"
    """auto: bf16 where the device computes it natively (bf16 GPUs, CPUs with avx512_bf16/amx_bf16), fp16 on
    older GPUs, else float32; or float32, bfloat16, float16. The loss is computed in float32 whatever is chosen."""
    device: str | None = None
    """cuda when available, else cpu."""
    data_dir: list[str] | None = None
    """Directories holding local copies of the named datasets (repeatable; default $PRUNETUNE_DATA_DIR)."""
    out: str | None = None
    """Write the results JSON here."""
    tasks: tuple[str, ...] = ()
    """Zero-shot accuracy through lm-eval: task names or task YAML files, comma separated (`paper` = the seven
    tasks of Wanda/SparseGPT: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa). Empty: perplexity
    only; with tasks, `--dataset none` skips the perplexity."""
    limit: int | None = None
    """With --tasks: only the first N examples of each task (quick checks, not comparable with papers)."""
    task_dir: str | None = None
    """With --tasks: a directory of your own lm-eval task YAMLs (e.g. over a local .jsonl, works offline)."""
    quiet: bool = False
    """No console output (library and pipeline use; not a flag)."""

    def __post_init__(self) -> None:
        if self.tasks:
            from prunetune.zeroshot import ZeroShotConfig, parse_tasks

            self.tasks = parse_tasks(self.tasks)
            ZeroShotConfig(tasks=self.tasks, limit=self.limit, task_dir=self.task_dir)  # validates
        elif self.dataset == "none":
            raise UserError("--dataset none leaves nothing to evaluate; give --tasks, or a dataset for perplexity")
        if self.model is None and self.adapter is None:
            raise UserError("give --model (or --adapter, whose base model is recorded in it)")
        if self.seqlen < 2:
            raise UserError(f"--seqlen {self.seqlen} is too short; use at least 2 (2048 for published tables)")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1 (omit it for automatic)")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows {self.max_windows} must be at least 1 (omit it for the whole split)")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of: auto, float32, bfloat16, float16")


FORMAT = "prunetune-eval/1"
"""Written into every results file: the file's own statement that prunetune wrote it (what makes it ours)."""


def _check_out(out: Path) -> None:
    """An existing results file of ours (it says so: `format`) may be refreshed; anything else is the user's and
    is kept, whatever it holds."""
    check_writable_file(out, "--out", form=FORMAT)


@dataclass
class _Loaded:
    model: nn.Module
    tokenizer: Any
    spec: str
    device: str
    dtype: torch.dtype
    dtype_reason: str
    vocab: int
    sparsity: dict[str, Any]
    adapter_method: RecoveryMethod | None = None
    """The adapter's recovery method when the pruned pattern is attached (deployable evaluation), else None."""


def run_evaluate(cfg: EvalConfig, console: Console | None = None) -> dict[str, Any]:
    """Load, evaluate (perplexity and/or zero-shot), print and (with `cfg.out`) write the results JSON."""
    console = console or Console(quiet=cfg.quiet)
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:
        _check_out(out)
    plan = _plan(cfg, console)
    text = None if cfg.dataset == "none" else load_text(cfg.dataset, cfg.split, cfg.data_dir)
    loaded = _load(cfg, plan, console)
    results: dict[str, Any] = {}
    if text is not None:
        results |= _perplexity_results(cfg, loaded, text, console)
    if cfg.tasks:
        from prunetune.zeroshot import ZeroShotConfig, run_zeroshot

        results["zeroshot"] = run_zeroshot(loaded.model, loaded.tokenizer, ZeroShotConfig(
            tasks=cfg.tasks, limit=cfg.limit, task_dir=cfg.task_dir, batch_size=cfg.batch_size or 1),
            log=console.print)
    results |= {
        "format": FORMAT, "dtype": dtype_name(loaded.dtype), "dtype_reason": loaded.dtype_reason,
        "sparsity": loaded.sparsity,
        "evaluated": {**asdict(cfg), "model": loaded.spec, "device": loaded.device,
                      **({"origin": text.origin, "data_note": text.note,
                          "total_tokens": results.pop("total_tokens")} if text else {})},
        **provenance(),
    }
    _print_results(console, results)
    if out is not None:
        phases.boundary("measured")
        try:
            write_json(out, results)
        except OSError as err:
            raise user_error(err, f"writing {out}", out, f"{out} is unchanged (written whole or not at all)") \
                or err from None
        console.print(f"Wrote {out}")
    return results


@dataclass(frozen=True)
class _Plan:
    spec: str
    ref: ModelRef
    config: Any
    device: str
    dtype: torch.dtype
    dtype_reason: str


def _plan(cfg: EvalConfig, console: Console) -> _Plan:
    """What to load, where and in which dtype: the cheap checks, before any data or weights are read."""
    spec = cfg.model
    if spec is None:
        spec = adapter_base(Path(cfg.adapter).expanduser())
        if spec is None:
            raise UserError(f"adapter {cfg.adapter!r} does not record its base model; pass --model")
    device = default_device(cfg.device)
    dtype, dtype_reason = resolve_dtype(cfg.dtype, device, "eval")
    ref = resolve_model(spec)
    config = load_config(ref, log=console.print)
    limit = context_length(config)
    if cfg.dataset != "none" and limit is not None and cfg.seqlen > limit:
        raise UserError(f"--seqlen {cfg.seqlen} exceeds the model's context of {limit} tokens; use --seqlen {limit} or less")
    return _Plan(spec, ref, config, device, dtype, dtype_reason)


def _load(cfg: EvalConfig, plan: _Plan, console: Console) -> _Loaded:
    """The model (+ adapter) to evaluate, in the planned dtype."""
    spec, ref, config, device, dtype, dtype_reason = (plan.spec, plan.ref, plan.config, plan.device, plan.dtype,
                                                      plan.dtype_reason)
    console.print(f"[bold]Evaluating[/] {spec}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""))
    console.print(f"  dtype {dtype_name(dtype)} ({dtype_reason}), device {device}")
    with console.status("Loading model ..."):
        model, tokenizer = load_model(ref, dtype=dtype, device=device, log=console.print)
    # Sparsity is a property of the base weights; measure it before an adapter wraps them.
    loaded = _Loaded(model, tokenizer, spec, device, dtype, dtype_reason, int(config.vocab_size),
                     sparsity_report(model))
    if cfg.adapter:
        base_dir = Path(ref.location)
        masks = load_keep_masks(base_dir, model)[0] if masks_file(base_dir) is not None else None
        loaded.model = apply_adapter(model, cfg.adapter)
        if masks is not None:
            loaded.adapter_method = _attach_pattern(loaded.model, cfg.adapter, masks)
    return loaded


def _attach_pattern(model: nn.Module, adapter: str, masks: dict[str, torch.Tensor]) -> RecoveryMethod | None:
    """Give the LoRA layers the pruned pattern, so the evaluated model can be the deployable (masked-merge) one.

    Returns the method that trained the adapter (prunetune's record; plain LoRA for a PEFT adapter without one),
    or None when no LoRA layer was pruned (nothing to mask: the adapter's model is the deployable one).
    """
    method = recovery_methods.for_adapter(read_adapter_meta(Path(adapter).expanduser()))
    return method if method.attach(model, masks) else None


def _perplexity_results(cfg: EvalConfig, loaded: _Loaded, text: Any, console: Console) -> dict[str, Any]:
    if text.note:
        console.print(f"  [yellow]note:[/] {text.note}")
    tokens = tokenize(text, loaded.tokenizer)
    total = tokens.input_ids.numel()
    if total < cfg.seqlen:
        raise UserError(f"{text.dataset}/{text.split} has {total} tokens, fewer than --seqlen {cfg.seqlen}; lower --seqlen")
    windows = windows_of(tokens.input_ids, cfg.seqlen, cfg.max_windows).shape[0]
    tune = cfg.batch_size is None
    if tune:
        batch_size, batch_reason = auto_batch_size(cfg.seqlen, loaded.vocab, windows, loaded.device)
        if BatchTuner.applies(batch_size, windows):
            batch_reason = f"batch up to {batch_reason.removeprefix('batch ')}; the fastest is measured on the first windows"
    else:
        batch_size, batch_reason = cfg.batch_size, f"batch {cfg.batch_size}: requested"
    console.print(f"  data: {text.dataset}/{text.split} from {text.origin}: {total:,} tokens "
                  f"({'cache hit' if tokens.cache_hit else 'tokenised, cached'}), seqlen {cfg.seqlen}; {batch_reason}")

    def measure(label: str) -> PerplexityResult:
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task("eval", total=None)
            return perplexity(loaded.model, tokens.input_ids, cfg.seqlen, batch_size, cfg.max_windows,
                              on_batch=lambda done, n: progress.update(task, completed=done, total=n), tune=tune)

    extra: dict[str, Any] = {}
    method = loaded.adapter_method
    if method is not None:
        for ev in method.evaluations():  # the method's deployable-evaluation policy, `deployable` last
            with ev.context(loaded.model):
                result = measure("perplexity (deployable)" if ev.key == "deployable" else f"perplexity ({ev.key}, as trained)")
            if ev.key != "deployable":
                extra |= {f"{ev.key}_perplexity": result.perplexity, f"{ev.key}_describes": ev.describes}
        extra["describes"] = method.describes(True)
    else:
        result = measure("perplexity")
    if result.batch_rates:
        rates = ", ".join(f"batch {b}: {r:.0f} tok/s" for b, r in result.batch_rates)
        batch_reason += f"; measured {rates} -> batch {result.batch_size}"
        console.print(f"  {batch_reason}")
    return {
        "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
        "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
        "batch_size": result.batch_size, "batch_reason": batch_reason,
        "batch_rates": {str(b): round(r, 1) for b, r in result.batch_rates}, "total_tokens": total, **extra,
    }


def _print_results(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="Evaluation", show_header=False)
    if "perplexity" in r:
        label = "perplexity" + (" (deployable sparse model)" if "describes" in r else "")
        table.add_row(label, f"[bold]{r['perplexity']:.4f}[/]")
        if "adapter_perplexity" in r:
            table.add_row("perplexity (adapter, dense update)", f"{r['adapter_perplexity']:.4f}")
        table.add_row("tokens / windows", f"{r['tokens']:,} / {r['windows']}")
        table.add_row("time", f"{r['seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")
        table.add_row("dtype / batch", f"{r['dtype']} / {r['batch_size']}")
    sp = r["sparsity"]
    table.add_row("sparsity (overall)", f"{sp['overall']:.2%}")
    table.add_row("sparsity by type", ", ".join(f"{k} {v:.1%}" for k, v in sp["by_type"].items()))
    console.print(table)
    if "zeroshot" in r:
        from prunetune.zeroshot import format_table

        shot = Table(title="Zero-shot", title_justify="left")
        for column in ("task", "acc", "acc_norm", "samples"):
            shot.add_column(column)
        for row in format_table(r["zeroshot"]):
            shot.add_row(*row)
        console.print(shot)
