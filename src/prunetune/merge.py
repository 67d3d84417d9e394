"""`run_merge(MergeConfig)`: fold a LoRA adapter into its pruned base model, keeping the pruned pattern exactly.
The merge itself is `prunetune.recovery.merge` (the one masked merge); this module is the command around it.

Phases: inputs checked (adapter complete, pruned model found, `--out` writable and not the user's) -> model,
keep-masks and adapter loaded, the adapter's base checked against the digest `finetune` recorded ->
(optionally) the unmerged perplexity -> every LoRA delta merged masked by its keep-mask
(`recovery.merge.merge_adapter`) and every pruned weight checked still zero -> (optionally) the merged perplexity ->
the merged model, its tokenizer, the masks and `merge.json` written through `rundir.staged_output` (a new
directory appears whole; `--overwrite` replaces only what prunetune wrote there).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from prunetune import phases, rundir
from prunetune.architecture import module_type
from prunetune.data import TextSplit, load_text, tokenize
from prunetune.devices import default_device
from prunetune.errors import UserError
from prunetune.models import DTYPES, apply_adapter, context_length, load_model, parse_dtype
from prunetune.perplexity import perplexity
from prunetune.recovery import registry as recovery_methods
from prunetune.recovery.base import RecoveryMethod
from prunetune.recovery.merge import merge_adapter
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity.measure import sparsity_report
from prunetune.sparsity.violations import pattern_violations

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
    """Evaluation split: train | validation | test."""
    data_dir: list[str] | None = None
    """Local data directories searched for `dataset` (or $PRUNETUNE_DATA_DIR)."""
    seqlen: int | None = None
    """Evaluation window in tokens; None = min(2048, the model's context), the Wanda/SparseGPT setting."""
    max_windows: int | None = None
    """Evaluate only the first N windows (quick checks); None = the whole split."""
    batch_size: int = 1
    """Evaluation windows per forward pass."""
    dtype: str | None = None
    """Dtype the model is loaded and saved in (each merge is computed in float32 first); None = the pruned
    model's own dtype from its config.json (float32 when it records none), so a merge never changes it."""
    device: str | None = None
    """cuda when available, else cpu."""
    overwrite: bool = False
    """Replace an earlier merge in `out` (only the files prunetune wrote there; anything else is kept)."""
    force: bool = False
    """Merge even when the adapter records another base model (its base digest differs from `model`'s)."""

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
def check_adapter(spec: str) -> Path:
    """A complete plain-LoRA adapter directory, or a one-line UserError."""
    path = rundir.check_adapter_dir(spec)
    config = rundir.read_json(path / rundir.ADAPTER_CONFIG, "adapter config")
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


def pruned_dir(cfg: MergeConfig, adapter: Path) -> Path:
    """The pruned model the adapter belongs to: `--model`, else the adapter's own record."""
    spec = cfg.model or rundir.adapter_base(adapter)
    if spec is None:
        raise UserError(f"adapter {cfg.adapter!r} does not record its pruned model; pass --model PRUNED_DIR")
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        source = "--model" if cfg.model else f"the adapter's record ({adapter / rundir.ADAPTER_META})"
        raise UserError(
            f"pruned model {spec!r} (from {source}) is not a model directory; pass --model PRUNED_DIR "
            f"(the --out of `prunetune prune`)"
        )
    return path.resolve()


def adapter_method(adapter: Path) -> RecoveryMethod:
    """The recovery method that trained an adapter (prunetune's record; plain LoRA for a PEFT adapter without
    one), or a UserError for a method that leaves no adapter to merge."""
    method = recovery_methods.for_adapter(rundir.read_adapter_meta(adapter))
    if not method.makes_adapter:
        raise UserError(f"{str(adapter)!r} was trained by {method.name}, which leaves a model, not an adapter: nothing "
                        "to merge; use that model directly")
    return method


def saved_dtype(model_dir: Path) -> str:
    """The dtype a model directory's config.json records (`dtype`, or the older `torch_dtype`)."""
    config = rundir.read_json(model_dir / "config.json", "model config")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def check_masks_match(model: torch.nn.Module, masks: dict[str, torch.Tensor], source: str, pruned: Path) -> None:
    """Every weight the masks mark pruned is zero in the model (else the two belong to different prunes)."""
    for name, bad in pattern_violations(model, masks).items():
        raise UserError(
            f"{name}: {bad} weights marked pruned in {source} are non-zero; the model and masks disagree, "
            f"check them with `prunetune verify {pruned}`"
        )


def _mask_source(pruned: Path) -> str:
    path = rundir.masks_file(pruned)
    return str(path) if path else f"derived from the zero weights ({rundir.MASKS_FILE} absent in {pruned})"


# ---------------------------------------------------------------------------------------------- merge
def _perplexity(model, ids: torch.Tensor, cfg: MergeConfig, seqlen: int) -> dict[str, Any]:
    result = perplexity(model, ids, seqlen, cfg.batch_size, cfg.max_windows)
    return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
            "windows": result.windows, "seconds": round(result.seconds, 2)}


def _tokenizer(adapter: Path, fallback):
    from transformers import AutoTokenizer

    if any((adapter / f).is_file() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(str(adapter))
    return fallback


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Loaded:
    adapter: Path
    pruned: Path
    out: Path
    device: str
    dtype: str
    text: TextSplit | None
    peft_model: Any = None
    tokenizer: Any = None
    masks: dict[str, torch.Tensor] | None = None
    mask_source: str = ""
    base_note: str | None = None
    sparsity_before: dict[str, Any] | None = None


def _inputs(cfg: MergeConfig) -> _Loaded:
    """Every input checked before any weight is loaded."""
    adapter = check_adapter(cfg.adapter)
    pruned = pruned_dir(cfg, adapter)
    out = rundir.check_output(cfg.out, inputs=[adapter, pruned], overwrite=cfg.overwrite)
    rundir.check_space(out, rundir.weights_bytes(pruned) // 2, doing="the merged model")  # at least half: bf16
    method = adapter_method(adapter)
    if method.exact_merge and not cfg.keep_sparsity:
        raise UserError(f"adapter {cfg.adapter!r} is a {method.name} adapter (it never trained the pruned "
                        "positions); merge it with --keep-sparsity (the default), which is exact for it")
    text = load_text(cfg.dataset, cfg.split, cfg.data_dir) if cfg.eval else None
    return _Loaded(adapter, pruned, out, default_device(cfg.device), cfg.dtype or saved_dtype(pruned), text)


def _load(cfg: MergeConfig, run: _Loaded, console: Console) -> None:
    """The pruned model, its keep-masks and the adapter applied; the adapter's base checked."""
    console.print(f"[bold]Merging[/] adapter {run.adapter} into pruned model {run.pruned}")
    how = "yes (LoRA deltas masked by the pruning mask)" if cfg.keep_sparsity else "no (plain merge)"
    console.print(f"  keep sparsity: {how}")
    model, base_tokenizer = load_model(str(run.pruned), dtype=run.dtype, device=run.device, log=console.print)
    run.masks, _ = rundir.load_keep_masks(run.pruned, model)
    run.mask_source = _mask_source(run.pruned)
    console.print(f"  masks: {run.mask_source} ({len(run.masks)} modules)")
    if cfg.keep_sparsity:
        check_masks_match(model, run.masks, run.mask_source, run.pruned)
    run.sparsity_before = sparsity_report(model)
    run.base_note = rundir.check_adapter_base(run.adapter, model, run.masks, force=cfg.force)
    if run.base_note:
        console.print(f"  base: {run.base_note}")
    run.peft_model = apply_adapter(model, str(run.adapter))
    run.tokenizer = _tokenizer(run.adapter, base_tokenizer)


def _eval_ids(cfg: MergeConfig, run: _Loaded) -> tuple[torch.Tensor, int]:
    assert run.text is not None
    ids = tokenize(run.text, run.tokenizer).input_ids
    seqlen = cfg.seqlen or min(2048, context_length(run.peft_model) or 2048)
    if ids.numel() < seqlen:
        raise UserError(f"{run.text.dataset}/{run.text.split} has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    return ids, seqlen


def _merge(cfg: MergeConfig, run: _Loaded, console: Console) -> tuple[Any, dict[str, Any]]:
    """The merged model and its sparsity before/after; the kept pattern asserted on the weights to save."""
    before = run.sparsity_before
    merged, stats = merge_adapter(run.peft_model, run.masks if cfg.keep_sparsity else None)
    after = sparsity_report(merged)
    masked = [s for s in stats.values() if s is not None]
    plain_zeros = before["zeros"] - sum(s.restored_by_plain_merge for s in masked)
    if cfg.keep_sparsity:
        console.print(f"  sparsity: {before['overall']:.2%} before, {after['overall']:.2%} after merging (pattern "
                      f"kept exactly; a plain merge would have left {plain_zeros / before['total']:.2%})")
    else:
        console.print(f"  sparsity fell from {before['overall']:.2%} to {after['overall']:.2%} (plain merge); "
                      "merge with --keep-sparsity to keep the pruned pattern")
    return merged, {
        "sparsity_before": before, "sparsity_after": after,
        "plain_merge_sparsity": plain_zeros / before["total"] if cfg.keep_sparsity and before["total"] else None,
        "modules": {name: (asdict(s) if s is not None else "merged unmasked (not a pruned module)")
                    for name, s in stats.items()},
    }


def _save(cfg: MergeConfig, run: _Loaded, merged, record: dict[str, Any]) -> None:
    """Everything staged, then swapped in: never half a merged model, never a user's file removed."""
    with rundir.staged_output(run.out, inputs=[run.adapter, run.pruned], overwrite=cfg.overwrite,
                              command="prunetune merge", what="the merged model") as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        run.tokenizer.save_pretrained(staging)
        rundir.copy_masks(run.pruned, staging)
        if record["keep_sparsity"] and (run.pruned / rundir.PRUNE_JSON).is_file():
            # The pattern it describes still holds, so `prunetune verify OUT` re-checks the merged weights; a
            # plain merge breaks the pattern and must not claim it.
            shutil.copy2(run.pruned / rundir.PRUNE_JSON, staging / rundir.PRUNE_JSON)
        write_json(staging / rundir.MERGE_JSON, record)


def run_merge(cfg: MergeConfig, console: Console | None = None) -> dict[str, Any]:
    """Merge, verify, optionally evaluate, save. Returns the `merge.json` record."""
    console = console or Console()
    start = time.perf_counter()
    run = _inputs(cfg)
    created = not run.out.exists()
    try:
        with rundir.run_lock(run.out, "prunetune merge", log=console.print):
            record = _run(cfg, run, console, start)
    finally:
        if created and run.out.is_dir() and not any(run.out.iterdir()):
            run.out.rmdir()  # a refused merge leaves nothing behind
    console.print(f"[bold green]Merged model saved[/] to {run.out}:")
    for f in sorted(p for p in run.out.iterdir() if p.is_file() and p.name != rundir.MARKER):
        console.print(f"  {f}")
    console.print(f"Next: prunetune evaluate --model {run.out}"
                  + (f"; prunetune verify {run.out}" if (run.out / rundir.PRUNE_JSON).is_file() else ""))
    return record


def _run(cfg: MergeConfig, run: _Loaded, console: Console, start: float) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    _load(cfg, run, console)
    lora_cfg = next(iter(run.peft_model.peft_config.values()))
    targets = sorted({module_type(n) for n, m in run.peft_model.get_base_model().named_modules()
                      if isinstance(m, LoraLayer)})
    console.print(f"  LoRA: r={lora_cfg.r}, alpha={lora_cfg.lora_alpha}, on {', '.join(targets)}")
    perplexities: dict[str, Any] = {}
    ids, seqlen = _eval_ids(cfg, run) if run.text is not None else (None, None)
    if ids is not None:
        # The unmerged model is what the adapter trained as (the method says: masked LoRA's masked delta).
        with console.status("Perplexity of the unmerged model (base + adapter) ..."), \
                adapter_method(run.adapter).unmerged(run.peft_model, run.masks):
            perplexities["unmerged"] = _perplexity(run.peft_model, ids, cfg, seqlen)
        console.print(f"  perplexity unmerged (base + adapter): {perplexities['unmerged']['perplexity']:.4f}")
    merged, sparsity = _merge(cfg, run, console)
    phases.boundary("merged")
    if ids is not None:
        perplexities |= _eval_merged(cfg, merged, ids, seqlen, perplexities["unmerged"], console)
    record = _record(cfg, run, lora_cfg, targets, sparsity, perplexities, seqlen) | {
        "seconds": round(time.perf_counter() - start, 2)}
    _save(cfg, run, merged, record)
    return record


def _eval_merged(cfg: MergeConfig, merged, ids: torch.Tensor, seqlen: int, unmerged: dict[str, Any],
                 console: Console) -> dict[str, Any]:
    with console.status("Perplexity of the merged model ..."):
        result = _perplexity(merged, ids, cfg, seqlen)
    u, m = unmerged["perplexity"], result["perplexity"]
    console.print(f"  perplexity merged: {m:.4f} vs unmerged {u:.4f} ({m / u - 1:+.2%}"
                  + (", the cost of masking the update)" if cfg.keep_sparsity else ")"))
    return {"merged": result, "merged_vs_unmerged": m / u - 1}


def _record(cfg: MergeConfig, run: _Loaded, lora_cfg, targets: list[str], sparsity: dict[str, Any],
            perplexities: dict[str, Any], seqlen: int | None) -> dict[str, Any]:
    method = adapter_method(run.adapter)
    text = run.text
    return {
        "config": {**asdict(cfg), "device": run.device, "seqlen": seqlen, "dtype": run.dtype},
        "adapter": str(run.adapter.resolve()), "pruned_model": str(run.pruned), "masks": run.mask_source,
        "keep_sparsity": cfg.keep_sparsity, "method": method.name,
        # A method that trained exactly what a masked merge writes: the merged model computes the same.
        "exact": bool(cfg.keep_sparsity and method.exact_merge),
        "base_check": run.base_note or "the adapter's base digest matches this model",
        "lora": {"r": lora_cfg.r, "alpha": lora_cfg.lora_alpha, "target_modules": targets},
        **sparsity,
        "perplexity": perplexities or None,
        "eval_data": None if text is None else {"dataset": text.dataset, "split": text.split, "origin": text.origin},
        "seconds": None,
        **provenance(),
    }
