"""`PruneConfig`: everything `prunetune prune` does, as one typed, validated object (the CLI and the pipeline
both build one and call `engine.run_prune`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from prunetune.architecture import module_type
from prunetune.budget import check_minutes
from prunetune.errors import UserError
from prunetune.pruning.owl import target_range
from prunetune.pruning.precision import CalibrationRecipe, check_dtype_name
from prunetune.sparsity.patterns import COMPARE_CHOICES, Pattern, parse_pattern

METHODS = ("wanda", "magnitude", "sparsegpt")
PERMUTE_BY_DEFAULT = ("block",)
"""Pattern kinds pruned with the channel permutation unless --no-permute is given: on SmolLM2-135M at 50% 16x16
blocks the demo's prune (Wanda + least squares + block-wise stage) went from 486 to 265 perplexity and, after the
same 61k tokens of sparse-ft, from 195 to 112 (bench/RESULTS.md, issue 22)."""


def parse_sparsity_map(text: str | dict[str, float] | None) -> dict[str, float]:
    """`down_proj=0.3,o_proj=0.4` (or a dict, e.g. from YAML) -> {key: sparsity}."""
    if not text:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--sparsity-map entry {part!r} is not KEY=VALUE; e.g. down_proj=0.3,o_proj=0.4")
            items.append((key.strip(), value.strip()))
    result: dict[str, float] = {}
    for key, value in items:
        try:
            result[key] = float(value)
        except (TypeError, ValueError):
            raise UserError(f"--sparsity-map {key}={value!r}: the value must be a number in [0, 1)") from None
    return result


def _split_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


@dataclass
class PruneConfig:
    """One pruning run. Defaults follow the Wanda paper (128 calibration windows, seed 0)."""

    model: str
    """Model to prune: hub id, local directory, .gguf file or alias (smollm2-135m). Stored as given in prune.json."""
    out: str
    """Output directory: pruned model + tokenizer, prune.json, prunetune/masks.safetensors."""
    method: str = "wanda"
    """wanda (|W|*||x||), magnitude (|W|, no calibration) or sparsegpt (OBS with weight updates)."""
    pattern: str = "unstructured"
    """unstructured | N:M (N zeros in every M input weights; 2:4 keeps 2 of 4) | blockHxW (whole HxW tiles)."""
    sparsity: float | None = None
    """Fraction of weights set to zero, in [0, 1). Default 0.5; N:M patterns fix it at N/M (set after validation)."""
    sparsity_map: dict[str, float] = field(default_factory=dict)
    """Per-module sparsity: keys are module types (down_proj) or globs of full names (model.layers.0.*)."""
    skip: tuple[str, ...] = ()
    """Modules left dense: module types or globs of full names. lm_head and embeddings are never pruned."""
    calib_dataset: str = "c4"
    """Calibration corpus (its train split): c4 | wikitext2 | wikipedia-vital | a local text/JSON file."""
    data_dir: str | list[str] | None = None
    """Where local copies of the corpora live (else $PRUNETUNE_DATA_DIR, else the hub)."""
    nsamples: int = 128
    """Calibration windows (Wanda: 128)."""
    seqlen: int = 2048
    """Tokens per calibration window. Never silently the model's full context (Wanda's code uses it: 128 GiB on
    Llama-3); larger than the model's context is an error."""
    seed: int = 0
    """Seed of the calibration window draw."""
    reconstruct: bool = False
    """After the mask is chosen, update the kept weights to minimise the layer output error on the calibration
    activations: exact least squares per row band for block masks, conjugate gradients (to the same optimum) for
    unstructured and N:M masks."""
    compare: str | None = None
    """Comparison group: row | matrix (unstructured), matrix | band (blocks). Default: row for wanda, matrix for
    magnitude and blocks, SparseGPT's own per-128-column choice (obs) for sparsegpt."""
    sequential: bool = True
    """Each layer is calibrated on the outputs of the already-pruned layers before it (Wanda/SparseGPT).
    False: every layer sees the dense model's activations (one-shot), for comparison."""
    overwrite: bool = False
    """Replace an output directory that holds a different pruned model or other files."""
    eval: bool = False
    """Measure dense and pruned perplexity (the `evaluate` protocol) and store them in prune.json."""
    eval_dataset: str = "wikitext2"
    """Perplexity corpus."""
    eval_split: str = "test"
    """Perplexity split."""
    eval_seqlen: int | None = None
    """Perplexity window length; default the calibration seqlen."""
    eval_max_windows: int | None = None
    """Evaluate only the first N windows (None: all)."""
    dtype: str | None = None
    """auto (default) | float32 | bfloat16 | float16: precision of the calibration forward passes. auto: float32,
    unless the device computes bf16 natively (CUDA with bf16, CPUs with avx512_bf16/amx_bf16) and bf16 calibration
    was measured to cost this method and pattern at most 0.5% perplexity (the banner and prune.json say which, and
    what the other choice costs). On CPU the weights stay float32 whatever is chosen (bf16 runs under autocast).
    Statistics, Hessians and least squares are float32 always."""
    device: str | None = None
    """Where each layer is computed (cuda if available, else cpu). The model stays on CPU; one layer at a time moves."""
    stream: bool = True
    """Read each decoder layer's weights from the model's safetensors shards when the walk reaches it and write it
    pruned into the output shards, so host memory holds one layer, not the model (same output bytes). Models that
    cannot be streamed exactly (no safetensors, renamed weights) are loaded whole, and the console says why.
    --no-stream loads the whole model first (the behaviour before streaming)."""
    owl: bool = False
    """OWL: non-uniform per-layer sparsity for the same overall target; layers with more activation outliers keep
    more weights. One extra calibration pass over the dense layers; per-layer targets are rounded to what the
    pattern can hold (N:M: a per-layer N, so 2:4 stays uniform) and recorded in prune.json."""
    owl_lambda: float = 0.08
    """OWL: per-layer sparsities spread over +-lambda around the target (paper: 0.08)."""
    owl_m: float = 5.0
    """OWL: a Wanda score |W|*||x|| is an outlier above M times its layer's mean score (paper: 5-7)."""
    block_reconstruct_epochs: int = 0
    """Block-wise reconstruction (EBFT-style): after each decoder layer is pruned, this many passes of Adam over
    the calibration windows train its kept weights to reproduce the dense model's outputs of that layer (masked
    gradients; the pattern stays exact). 0 = off; 2-5 is typical. One layer resident at a time."""
    block_reconstruct_lr: float = 2e-4
    """Adam learning rate of the block-wise reconstruction (EBFT's 2e-4; measured on SmolLM2, see the notes)."""
    block_reconstruct_minutes: float | None = None
    """Time budget for the block-wise stage's training over all layers: one step is timed on the first layer,
    and every layer then trains the steps that fit (at most epochs x nsamples). None: no budget."""
    permute: bool | None = None
    """Relabel the model's channels before choosing tiles (block patterns), so that the important weights share
    tiles: the residual stream, each layer's MLP units and the v/o dimensions within each KV head are permuted to
    maximise the Wanda score mass the tile masks keep (searched on the dense model's scores, one extra calibration
    pass). The model computes the same function (checked on its logits; prune.json "permutation") and saves as an
    ordinary checkpoint with relabelled channels. Default (unset): on for block patterns, for Llama-layout models
    (others are pruned without it, and say so). Unstructured and N:M masks are not helped by it and refuse it."""
    permute_rounds: int = 2
    """Rounds of the permutation search (each re-assigns every channel space once; the first gives most of it)."""
    percdamp: float = 0.01
    """Hessian dampening as a fraction of its mean diagonal (SparseGPT: 1%)."""
    blocksize: int = 128
    """Columns per OBS block (SparseGPT: 128)."""

    def __post_init__(self) -> None:
        self.sparsity_map = parse_sparsity_map(self.sparsity_map)
        self.skip = _split_list(self.skip)
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
        try:
            pattern = parse_pattern(self.pattern)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.pattern = pattern.name
        if pattern.kind == "nm":
            fixed = pattern.fixed_sparsity
            if self.sparsity is not None and not math.isclose(self.sparsity, fixed):
                raise UserError(
                    f"--sparsity {self.sparsity} contradicts --pattern {pattern.name} ({pattern.n} zeros of every "
                    f"{pattern.m} = {fixed:g}); drop --sparsity or pick another N:M"
                )
            if self.sparsity_map:
                raise UserError(f"--sparsity-map does not apply to --pattern {pattern.name}: N:M fixes the sparsity")
            self.sparsity = fixed
        elif self.sparsity is None:
            self.sparsity = 0.5
        for key, value in [("--sparsity", self.sparsity), *((f"--sparsity-map {k}", v) for k, v in self.sparsity_map.items())]:
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"{key} {value} is outside [0, 1); give a fraction such as 0.5")
        if self.compare is not None and self.compare not in COMPARE_CHOICES:
            raise UserError(f"unknown --compare {self.compare!r}; choose one of: {', '.join(COMPARE_CHOICES)}")
        allowed = {"unstructured": ("row", "matrix"), "block": ("matrix", "band"), "nm": ()}[pattern.kind]
        if self.method == "sparsegpt" and pattern.kind == "unstructured":
            allowed = (*allowed, "obs")
        if self.compare is not None and self.compare not in allowed:
            raise UserError(
                f"--compare {self.compare} does not apply to --method {self.method} --pattern {pattern.name}; "
                + (f"choose one of: {', '.join(allowed)}" if allowed else "N:M compares within each group of M; drop --compare")
            )
        if self.permute and pattern.kind != "block":
            raise UserError(f"--permute relabels channels so that whole tiles keep more of the scores; --pattern "
                            f"{pattern.name} has no tiles to gain from it. Drop --permute or use a block pattern")
        self._check_numbers()
        if self.owl:
            self._check_owl_targets(pattern)
        if not self.out:
            raise UserError("--out is required: the directory for the pruned model")

    def _check_owl_targets(self, pattern: Pattern) -> None:
        """OWL moves each layer's target within what the pattern can hold (`owl.target_range`): a target outside
        that range leaves it nothing to hold, known before any calibration."""
        lo, hi = target_range(pattern)
        targets = [("--sparsity", pattern.fixed_sparsity or float(self.sparsity)),
                   *((f"--sparsity-map {k}", v) for k, v in self.sparsity_map.items())]
        for key, value in targets:
            if not lo - 1e-9 <= value <= hi + 1e-9:
                raise UserError(f"{key} {value:g} with --owl: OWL keeps every layer's target within [{lo:g}, {hi:g}] for "
                                f"--pattern {pattern.name}; give a target in that range or drop --owl")

    def _check_numbers(self) -> None:
        """Ranges of the numeric options (one-line UserErrors naming the flag and a sensible value)."""
        check_dtype_name(self.dtype)
        if not 0.0 <= self.owl_lambda < 0.5:
            raise UserError(f"--owl-lambda {self.owl_lambda} is outside [0, 0.5); OWL uses 0.08")
        if self.owl_m <= 0:
            raise UserError(f"--owl-m {self.owl_m} must be positive; OWL uses 5 to 7")
        if self.block_reconstruct_epochs < 0 or self.block_reconstruct_lr <= 0:
            raise UserError(f"--block-reconstruct-epochs {self.block_reconstruct_epochs} / --block-reconstruct-lr "
                            f"{self.block_reconstruct_lr}: epochs must be >= 0 and the rate positive (e.g. 2 and 2e-4)")
        check_minutes(self.block_reconstruct_minutes, "--block-reconstruct-minutes")
        if self.block_reconstruct_minutes is not None and not self.block_reconstruct_epochs:
            raise UserError("--block-reconstruct-minutes is the time budget of the block-wise stage, which is off; "
                            "add --block-reconstruct-epochs N (e.g. 3) or drop the budget")
        if self.permute_rounds < 1:
            raise UserError(f"--permute-rounds {self.permute_rounds} must be at least 1 (2 is typical)")
        if self.nsamples < 1:
            raise UserError(f"--nsamples {self.nsamples} must be at least 1 (Wanda uses 128)")
        if self.seqlen < 2:
            raise UserError(f"--seqlen {self.seqlen} must be at least 2 tokens")
        if self.eval_seqlen is not None and self.eval_seqlen < 2:
            raise UserError(f"--eval-seqlen {self.eval_seqlen} must be at least 2 tokens")
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            raise UserError(f"--eval-max-windows {self.eval_max_windows} must be at least 1")
        if not 0.0 <= self.percdamp < 1.0:
            raise UserError(f"percdamp {self.percdamp} is outside [0, 1); SparseGPT uses 0.01")
        if self.blocksize < 1:
            raise UserError(f"blocksize {self.blocksize} must be at least 1 (SparseGPT uses 128)")

    # ---- resolved views ----

    @cached_property
    def pattern_spec(self) -> Pattern:
        """`pattern` parsed once (it is validated and normalised in `__post_init__`)."""
        return parse_pattern(self.pattern)

    @property
    def resolved_compare(self) -> str:
        """The comparison group actually used (the per-method default when `compare` is None)."""
        kind = self.pattern_spec.kind
        if self.compare is not None:
            return self.compare
        if kind == "nm":
            return "obs" if self.method == "sparsegpt" else "group"
        if kind == "block":
            return "matrix"
        return {"wanda": "row", "magnitude": "matrix", "sparsegpt": "obs"}[self.method]

    @property
    def permutes(self) -> bool:
        """Whether the channel permutation runs: --permute / --no-permute, else by the pattern's kind."""
        return self.permute if self.permute is not None else self.pattern_spec.kind in PERMUTE_BY_DEFAULT

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.reconstruct or self.owl or self.block_reconstruct_epochs > 0

    @property
    def needs_hessian(self) -> bool:
        return self.method == "sparsegpt" or self.reconstruct

    @property
    def calibration_recipe(self) -> CalibrationRecipe:
        """What `--dtype auto` looks up bf16's measured cost by (`pruning.precision`)."""
        extras = tuple(name for name, on in (("reconstruct", self.reconstruct), ("owl", self.owl),
                                             ("block-wise", self.block_reconstruct_epochs > 0)) if on)
        return CalibrationRecipe(self.method, self.pattern_spec.kind, extras)

    def is_skipped(self, name: str) -> bool:
        return any(module_type(name) == key or fnmatch.fnmatchcase(name, key) for key in self.skip)

    def target_for(self, name: str) -> float:
        """Sparsity of one module: the last matching --sparsity-map entry, else --sparsity (N/M for N:M)."""
        target = self.pattern_spec.fixed_sparsity or float(self.sparsity)
        for key, value in self.sparsity_map.items():
            if module_type(name) == key or fnmatch.fnmatchcase(name, key):
                target = value
        return target

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skip"] = list(self.skip)
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that decide the pruned weights (what makes two outputs "the same model")."""
        data = self.to_dict()
        for key in ("out", "overwrite", "eval", "eval_dataset", "eval_split", "eval_seqlen", "eval_max_windows", "device",
                    "stream"):
            data.pop(key)
        return data
