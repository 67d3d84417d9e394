"""`prunetune merge`: fold a LoRA adapter into its pruned base model, keeping the pruned pattern exactly.

Steps: load the pruned model and its keep-masks, apply the adapter, (optionally) measure the unmerged
perplexity, merge every LoRA delta masked by its keep-mask (`merge.masked_merge`), check that every pruned
weight is still zero, (optionally) measure the merged perplexity, and write the merged model, its tokenizer,
a copy of the masks and `merge.json` into a fresh directory that replaces `--out` only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from prunetune.architecture import module_type, prunable_linears
from prunetune.data import load_text, tokenize
from prunetune.errors import UserError
from prunetune.evaluate import perplexity
from prunetune.finetune.merge import MergeStats, lora_delta, masked_merge, masked_nonzeros
from prunetune.models import DTYPES, apply_adapter, context_length, load_model, parse_dtype
from prunetune.rundir import adapter_base
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity import sparsity_report

MASKS_FILE = "masks.safetensors"
PRUNE_RECORD = "prune.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class MergeConfig:
    adapter: str
    """LoRA adapter directory written by `prunetune finetune` (RUN/adapter) or a checkpoint of it."""
    out: str
    """Directory for the merged model; must not exist (or be empty) unless `overwrite`."""
    keep_sparsity: bool = True
    """Mask each LoRA delta by the pruning keep-mask so the merged model has exactly the pruned pattern.
    False = plain PEFT-style merge; the pruned weights come back (sparsity falls)."""
    model: str | None = None
    """The pruned model directory; default: the one recorded in the adapter (prunetune_adapter.json, then
    adapter_config.json's base_model_name_or_path)."""
    eval: bool = False
    """Measure perplexity of the unmerged (base + adapter) and the merged model: the cost of masking."""
    dataset: str = "wikitext2"
    """Evaluation data: registry name (wikitext2, c4, wikipedia-vital) or a local data file."""
    split: str = "test"
    data_dir: list[str] | None = None
    """Local data directories searched for `dataset` (or $PRUNETUNE_DATA_DIR)."""
    seqlen: int | None = None
    """Evaluation window in tokens; None = min(2048, the model's context), the Wanda/SparseGPT setting."""
    max_windows: int | None = None
    """Evaluate only the first N windows (quick checks); None = the whole split."""
    batch_size: int = 1
    dtype: str | None = None
    """Dtype the model is loaded and saved in (each merge is computed in float32 first); None = the pruned
    model's own dtype from its config.json (float32 when it records none), so a merge never changes it."""
    device: str | None = None
    """cuda when available, else cpu."""
    overwrite: bool = False
    """Replace an existing `out` that holds an earlier merge or model (anything else is never deleted)."""

    def __post_init__(self) -> None:
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen {self.seqlen} is too short; use at least 2 (2048 for published tables)")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows {self.max_windows} must be at least 1 (omit it for the whole split)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")


# ---------------------------------------------------------------------------------------------- inputs


def _adapter_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise UserError(f"adapter directory {spec!r} does not exist; give the OUT/adapter dir `prunetune finetune` wrote")
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"{spec!r} has no adapter_config.json; give the adapter directory (RUN/adapter or RUN/checkpoint-N)"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter {spec!r} is a {config['peft_type']} adapter; merge handles LoRA adapters only")
    for option in ("use_dora", "use_rslora_variant", "use_bdlora"):
        if config.get(option):
            raise UserError(f"adapter {spec!r} uses {option}; merge handles plain LoRA only (no DoRA or variants)")
    if config.get("modules_to_save"):
        raise UserError(
            f"adapter {spec!r} trains whole modules ({config['modules_to_save']}); merge handles LoRA matrices only"
        )
    return path


def _pruned_dir(cfg: MergeConfig, adapter: Path) -> Path:
    spec = cfg.model or adapter_base(adapter)
    if spec is None:
        raise UserError(f"adapter {cfg.adapter!r} does not record its pruned model; pass --model PRUNED_DIR")
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        source = "--model" if cfg.model else f"the adapter's record ({adapter / 'prunetune_adapter.json'})"
        raise UserError(
            f"pruned model {spec!r} (from {source}) is not a model directory; pass --model PRUNED_DIR "
            f"(the --out of `prunetune prune`)"
        )
    return path.resolve()


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """The merged model goes to a fresh directory; the user's files are never replaced by surprise."""
    for inp in inputs:
        if out == inp or out in inp.parents or inp in out.parents:
            raise UserError(f"--out {str(out)!r} overlaps the input {str(inp)!r}; choose a separate directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; choose a directory path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {str(out)!r} exists and is not empty; choose another directory or add --overwrite")
    if not ((out / "merge.json").is_file() or (out / "config.json").is_file()):
        raise UserError(
            f"--out {str(out)!r} holds files that are not a model; refusing to delete them even with --overwrite"
        )


def saved_dtype(model_dir: Path) -> str:
    """The dtype a model directory's config.json records (`dtype`, or the older `torch_dtype`)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def load_keep_masks(pruned: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Keep-masks by prunable-linear name, and where they came from (the saved file, or the zero weights)."""
    linears = prunable_linears(model)
    if (pruned / MASKS_FILE).is_file():
        from safetensors import SafetensorError

        from prunetune.rundir import load_masks

        try:
            masks = {name: keep.to(torch.bool) for name, keep in load_masks(pruned).items()}
        except (ValueError, KeyError, OSError, SafetensorError) as err:
            raise UserError(
                f"cannot read {pruned / MASKS_FILE} ({str(err)[:200]}); re-run `prunetune prune`, or check it "
                f"with `prunetune verify {pruned}`"
            ) from None
        unknown = sorted(set(masks) - set(linears))
        if unknown:
            raise UserError(
                f"{pruned / MASKS_FILE} names modules this model lacks ({', '.join(unknown[:3])}); "
                f"the masks belong to another model, pass the matching --model"
            )
        return masks, str(pruned / MASKS_FILE)
    # Without a saved mask the zeros are the pattern; a weight that happened to be exactly 0 counts as pruned,
    # which only keeps it at 0.
    masks = {name: (module.weight != 0).cpu() for name, module in linears.items()}
    return masks, f"derived from the zero weights ({MASKS_FILE} absent in {pruned})"


def _check_masks_match(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: str, pruned: Path) -> None:
    linears = prunable_linears(model)
    for name, keep in masks.items():
        weight = linears[name].weight
        if keep.shape != weight.shape:
            raise UserError(
                f"{name}: mask shape {tuple(keep.shape)} != weight shape {tuple(weight.shape)} in {source}; "
                "pass the pruned model the masks came with (--model)"
            )
        bad = masked_nonzeros(weight, keep)
        if bad:
            raise UserError(
                f"{name}: {bad} weights marked pruned in {source} are non-zero; the model and masks disagree, "
                f"check them with `prunetune verify {pruned}`"
            )


# ---------------------------------------------------------------------------------------------- merge


@torch.no_grad()
def merge_lora_layers(
    peft_model: torch.nn.Module, masks: dict[str, torch.Tensor] | None
) -> dict[str, MergeStats | None]:
    """Write `W + keep * delta` into every LoRA-wrapped base layer (masks=None: plain merge).

    All merged weights are computed and checked finite before any is written, so a refusal leaves the
    model untouched. Returns per-module stats (None for a module outside the masks, e.g. lm_head).
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    planned: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = []
    stats: dict[str, MergeStats | None] = {}
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        target = layer.get_base_layer()
        if not isinstance(target, torch.nn.Linear):
            raise UserError(f"{name}: LoRA on {type(target).__name__} is not supported by merge (Linear only)")
        weight, bias = target.weight, target.bias
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise UserError(f"{name}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); merge handles plain LoRA")
            delta = lora_delta(
                layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter],
                layer.fan_in_fan_out,
            )
            keep = None if masks is None else masks.get(name)
            weight, stat = masked_merge(weight, delta.to(weight.device), keep, name)
            stats[name] = stat if keep is not None else None
            if layer.lora_bias.get(adapter):
                # Biases are never pruned, so the LoRA bias merges unmasked.
                bias = bias + layer.lora_B[adapter].bias * layer.scaling[adapter]
                if not bool(torch.isfinite(bias).all()):
                    raise UserError(f"LoRA bias of {name} is non-finite (NaN/Inf); refusing to merge")
        planned.append((target, weight, bias))
    if not planned:
        raise UserError("the adapter has no LoRA layers on this model; nothing to merge")
    for target, weight, bias in planned:
        target.weight.data = weight
        if bias is not None:
            target.bias.data = bias.to(target.bias.dtype)
    return stats


def _perplexity(model, ids: torch.Tensor, cfg: MergeConfig, seqlen: int) -> dict[str, Any]:
    result = perplexity(model, ids, seqlen, cfg.batch_size, cfg.max_windows)
    return {
        "perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
        "windows": result.windows, "seconds": round(result.seconds, 2),
    }


def _save(out: Path, model, tokenizer, pruned: Path, record: dict[str, Any]) -> list[Path]:
    """Write everything into a staging directory beside `out`, then swap it in: never half a merged model."""
    staging = out.with_name(f".{out.name}.merging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if (pruned / MASKS_FILE).is_file():
            shutil.copy2(pruned / MASKS_FILE, staging / MASKS_FILE)
        if record["keep_sparsity"] and (pruned / PRUNE_RECORD).is_file():
            # The pattern it describes still holds, so `prunetune verify OUT` re-checks the merged weights; a
            # plain merge breaks the pattern and must not claim it.
            shutil.copy2(pruned / PRUNE_RECORD, staging / PRUNE_RECORD)
        write_json(staging / "merge.json", record)
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p for p in out.iterdir() if p.is_file())


def _tokenizer(adapter: Path, fallback):
    from transformers import AutoTokenizer

    if any((adapter / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(adapter))
    return fallback


def run_merge(cfg: MergeConfig, console: Console | None = None) -> dict[str, Any]:
    """Merge, verify, optionally evaluate, save. Returns the `merge.json` record."""
    from peft.tuners.lora import LoraLayer

    console = console or Console()
    start = time.perf_counter()
    adapter = _adapter_dir(cfg.adapter)
    pruned = _pruned_dir(cfg, adapter)
    out = Path(cfg.out).expanduser().resolve()
    _check_out(out, [adapter.resolve(), pruned], cfg.overwrite)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text = load_text(cfg.dataset, cfg.split, cfg.data_dir) if cfg.eval else None

    console.print(f"[bold]Merging[/] adapter {adapter} into pruned model {pruned}")
    console.print(f"  keep sparsity: {'yes (LoRA deltas masked by the pruning mask)' if cfg.keep_sparsity else 'no (plain merge)'}")
    dtype = cfg.dtype or saved_dtype(pruned)
    model, base_tokenizer = load_model(str(pruned), dtype=dtype, device=device, log=console.print)
    masks, mask_source = load_keep_masks(pruned, model)
    console.print(f"  masks: {mask_source} ({len(masks)} modules)")
    if cfg.keep_sparsity:
        _check_masks_match(model, masks, mask_source, pruned)
    before = sparsity_report(model)
    peft_model = apply_adapter(model, str(adapter))
    lora_cfg = next(iter(peft_model.peft_config.values()))
    targets = sorted({module_type(n) for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)})
    console.print(f"  LoRA: r={lora_cfg.r}, alpha={lora_cfg.lora_alpha}, on {', '.join(targets)}")

    tokenizer = _tokenizer(adapter, base_tokenizer)
    perplexities: dict[str, Any] = {}
    seqlen = None
    if text is not None:
        ids = tokenize(text, tokenizer).input_ids
        seqlen = cfg.seqlen or min(2048, context_length(model) or 2048)
        if ids.numel() < seqlen:
            raise UserError(f"{text.dataset}/{text.split} has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
        with console.status("Perplexity of the unmerged model (base + adapter) ..."):
            perplexities["unmerged"] = _perplexity(peft_model, ids, cfg, seqlen)
        console.print(f"  perplexity unmerged (base + adapter): {perplexities['unmerged']['perplexity']:.4f}")

    stats = merge_lora_layers(peft_model, masks if cfg.keep_sparsity else None)
    merged = peft_model.unload()
    linears = prunable_linears(merged)
    if cfg.keep_sparsity:
        # The promise of --keep-sparsity, checked on the weights that will be saved, not assumed.
        leaked = {name: n for name, keep in masks.items() if (n := masked_nonzeros(linears[name].weight, keep))}
        if leaked:
            raise AssertionError(f"pruned weights became non-zero in {len(leaked)} modules: {leaked}")
    after = sparsity_report(merged)
    masked = [s for s in stats.values() if s is not None]
    plain_zeros = before["zeros"] - sum(s.restored_by_plain_merge for s in masked)
    if cfg.keep_sparsity:
        console.print(
            f"  sparsity: {before['overall']:.2%} before, {after['overall']:.2%} after merging (pattern kept exactly; "
            f"a plain merge would have left {plain_zeros / before['total']:.2%})"
        )
    else:
        console.print(
            f"  sparsity fell from {before['overall']:.2%} to {after['overall']:.2%} (plain merge); "
            "merge with --keep-sparsity to keep the pruned pattern"
        )

    if text is not None:
        with console.status("Perplexity of the merged model ..."):
            perplexities["merged"] = _perplexity(merged, ids, cfg, seqlen)
        u, m = perplexities["unmerged"]["perplexity"], perplexities["merged"]["perplexity"]
        perplexities["merged_vs_unmerged"] = m / u - 1
        console.print(
            f"  perplexity merged: {m:.4f} vs unmerged {u:.4f} ({m / u - 1:+.2%}"
            + (", the cost of masking the update)" if cfg.keep_sparsity else ")")
        )

    record: dict[str, Any] = {
        "config": {**asdict(cfg), "device": device, "seqlen": seqlen, "dtype": dtype},
        "adapter": str(adapter.resolve()),
        "pruned_model": str(pruned),
        "masks": mask_source,
        "keep_sparsity": cfg.keep_sparsity,
        "lora": {"r": lora_cfg.r, "alpha": lora_cfg.lora_alpha, "target_modules": targets},
        "sparsity_before": before,
        "sparsity_after": after,
        "plain_merge_sparsity": plain_zeros / before["total"] if cfg.keep_sparsity and before["total"] else None,
        "modules": {name: (asdict(s) if s is not None else "merged unmasked (not a pruned module)")
                    for name, s in stats.items()},
        "perplexity": perplexities or None,
        "eval_data": None if text is None else {"dataset": text.dataset, "split": text.split, "origin": text.origin},
        "seconds": None,
        **provenance(),
    }
    record["seconds"] = round(time.perf_counter() - start, 2)
    files = _save(out, merged, tokenizer, pruned, record)
    console.print(f"[bold green]Merged model saved[/] to {out}:")
    for f in files:
        console.print(f"  {f}")
    console.print(f"Next: prunetune evaluate --model {out}"
                  + (f"; prunetune verify {out}" if (out / PRUNE_RECORD).is_file() else ""))
    return record


# ---------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter directory written by `prunetune finetune` (RUN/adapter)")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument(
        "--keep-sparsity", action=argparse.BooleanOptionalAction, default=True,
        help="mask the LoRA delta by the pruning mask so the merged model keeps the pruned pattern (default: on)",
    )
    parser.add_argument("--model", help="pruned model directory (default: the one recorded in the adapter)")
    parser.add_argument("--eval", action="store_true", help="perplexity of the unmerged vs the merged model")
    parser.add_argument("--dataset", default="wikitext2", help="evaluation data: wikitext2 | c4 | wikipedia-vital | file")
    parser.add_argument("--split", default="test", help="train | validation | test (default: test)")
    parser.add_argument("--data-dir", action="append", help="local data directory (repeatable; or PRUNETUNE_DATA_DIR)")
    parser.add_argument("--seqlen", type=int, help="evaluation window (default: min(2048, model context))")
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=list(DTYPES), help="load/save dtype (default: the pruned model's own)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged model in --out")


def main(args: argparse.Namespace) -> int:
    cfg = MergeConfig(
        adapter=args.adapter, out=args.out, keep_sparsity=args.keep_sparsity, model=args.model, eval=args.eval,
        dataset=args.dataset, split=args.split, data_dir=args.data_dir, seqlen=args.seqlen,
        max_windows=args.max_windows, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        overwrite=args.overwrite,
    )
    run_merge(cfg)
    return 0
