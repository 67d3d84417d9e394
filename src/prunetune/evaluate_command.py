"""`prunetune evaluate`: perplexity of a model, optionally with a LoRA adapter, printed and written as JSON."""

from __future__ import annotations

import argparse
import json
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

from prunetune.data import load_text, tokenize
from prunetune.errors import UserError
from prunetune.evaluate import perplexity
from prunetune.models import DTYPES, context_length, load_config, load_model, parse_dtype, resolve_model
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity import sparsity_report


@dataclass
class EvalConfig:
    model: str | None = None
    """Alias, hub id, model directory or .gguf file. Optional with --adapter (its base is recorded there)."""
    adapter: str | None = None
    """A LoRA adapter directory (PEFT format) applied on top of the model."""
    dataset: str = "wikitext2"
    """Registry name (wikitext2, c4, wikipedia-vital) or a local data file."""
    split: str = "test"
    seqlen: int = 2048
    """Window length in tokens; 2048 is the Wanda/SparseGPT tables' setting for Llama models."""
    max_windows: int | None = None
    """Evaluate only the first N windows (quick checks); None = the whole split."""
    batch_size: int = 1
    dtype: str = "float32"
    device: str | None = None
    """cuda when available, else cpu."""
    data_dir: list[str] | None = None
    out: str | None = None
    """Write the results JSON here."""
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.model is None and self.adapter is None:
            raise UserError("give --model (or --adapter, whose base model is recorded in it)")
        if self.seqlen < 2:
            raise UserError(f"--seqlen {self.seqlen} is too short; use at least 2 (2048 for published tables)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows {self.max_windows} must be at least 1 (omit it for the whole split)")
        parse_dtype(self.dtype)


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter was trained on: prunetune's record first, then PEFT's own."""
    ours = adapter_dir / "prunetune_adapter.json"
    if ours.is_file():
        return json.loads(ours.read_text()).get("pruned_model")
    peft_cfg = adapter_dir / "adapter_config.json"
    if peft_cfg.is_file():
        return json.loads(peft_cfg.read_text()).get("base_model_name_or_path")
    return None


def apply_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"adapter {adapter!r} has no adapter_config.json; give the adapter directory finetune wrote")
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"adapter {adapter!r} does not fit this base model ({first[:200]}); "
            "pass the --model the adapter was trained on"
        ) from None


def _check_out(out: Path) -> None:
    """An existing results file of ours may be refreshed; anything else is the user's and is kept."""
    if out.exists():
        try:
            ours = "perplexity" in json.loads(out.read_text()) and out.suffix == ".json"
        except (ValueError, OSError):
            ours = False
        if not ours:
            raise UserError(f"--out {str(out)!r} exists and is not a prunetune eval file; choose another path")


def run_evaluate(cfg: EvalConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(quiet=cfg.quiet)
    model_spec = cfg.model
    if model_spec is None:
        model_spec = adapter_base(Path(cfg.adapter).expanduser())
        if model_spec is None:
            raise UserError(f"adapter {cfg.adapter!r} does not record its base model; pass --model")
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        _check_out(out)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = resolve_model(model_spec)
    limit = context_length(load_config(ref, log=console.print))
    if limit is not None and cfg.seqlen > limit:
        raise UserError(f"--seqlen {cfg.seqlen} exceeds the model's context of {limit} tokens; use --seqlen {limit} or less")
    text = load_text(cfg.dataset, cfg.split, cfg.data_dir)
    console.print(f"[bold]Evaluating[/] {model_spec}" + (f" + adapter {cfg.adapter}" if cfg.adapter else ""))
    console.print(f"  data: {text.dataset}/{text.split} from {text.origin}")
    if text.note:
        console.print(f"  [yellow]note:[/] {text.note}")
    with console.status("Loading model ..."):
        model, tokenizer = load_model(ref, dtype=cfg.dtype, device=device, log=console.print)
    # Sparsity is a property of the base weights; measure it before an adapter wraps them.
    sparsity = sparsity_report(model)
    if cfg.adapter:
        model = apply_adapter(model, cfg.adapter)
    tokens = tokenize(text, tokenizer)
    console.print(
        f"  {tokens.input_ids.numel():,} tokens ({'cache hit' if tokens.cache_hit else 'tokenised, cached'}), "
        f"seqlen {cfg.seqlen}, dtype {cfg.dtype}, device {device}"
    )
    if tokens.input_ids.numel() < cfg.seqlen:
        raise UserError(
            f"{text.dataset}/{text.split} has {tokens.input_ids.numel()} tokens, fewer than --seqlen {cfg.seqlen}; "
            "lower --seqlen"
        )
    with Progress(
        TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as progress:
        task = progress.add_task("eval", total=None)
        result = perplexity(
            model, tokens.input_ids, cfg.seqlen, cfg.batch_size, cfg.max_windows,
            on_batch=lambda done, total: progress.update(task, completed=done, total=total),
        )
    results: dict[str, Any] = {
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": result.windows,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "sparsity": sparsity,
        "evaluated": {
            **asdict(cfg), "model": model_spec, "device": device, "origin": text.origin,
            "data_note": text.note, "total_tokens": tokens.input_ids.numel(),
        },
        **provenance(),
    }
    _print_results(console, results)
    if out is not None:
        write_json(out, results)
        console.print(f"Wrote {out}")
    return results


def _print_results(console: Console, r: dict[str, Any]) -> None:
    table = Table(title="Evaluation", show_header=False)
    table.add_row("perplexity", f"[bold]{r['perplexity']:.4f}[/]")
    table.add_row("tokens / windows", f"{r['tokens']:,} / {r['windows']}")
    table.add_row("time", f"{r['seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")
    sp = r["sparsity"]
    table.add_row("sparsity (overall)", f"{sp['overall']:.2%}")
    table.add_row("sparsity by type", ", ".join(f"{k} {v:.1%}" for k, v in sp["by_type"].items()))
    console.print(table)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="alias (smollm2-135m), hub id, model directory or .gguf file")
    parser.add_argument("--adapter", help="LoRA adapter directory written by `prunetune finetune`")
    parser.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | wikipedia-vital | path to a data file")
    parser.add_argument("--split", default="test", help="train | validation | test (default: test)")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--data-dir", action="append", help="local data directory (repeatable; or PRUNETUNE_DATA_DIR)")
    parser.add_argument("--out", help="write the results JSON here (e.g. eval.json)")


def main(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        model=args.model, adapter=args.adapter, dataset=args.dataset, split=args.split, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        data_dir=args.data_dir, out=args.out,
    )
    run_evaluate(cfg)
    return 0
