"""`run_export(ExportConfig)`: the one entry of `prunetune export`, whatever the format.

Phases: the source checked (a readable model directory, not already an export) and `--out` checked before any
work -> the model loaded once (in `--dtype`, else as stored) with its pattern from `prune.json` -> the format's
writer, inside `rundir.staged_output` (a new directory appears whole; `--overwrite` replaces only what
prunetune wrote there) -> `export.json` (format, pattern, sizes, what was verified, which runtimes load it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunetune.architecture import prunable_linears
from prunetune.devices import DTYPE_NAMES
from prunetune.errors import UserError
from prunetune.export import registry
from prunetune.export.base import ExportSource, Log, pattern_of
from prunetune.exported import is_sparse_export
from prunetune.models import first_line
from prunetune.oserrors import check_links
from prunetune.rundir import (
    EXPORT_JSON,
    check_complete,
    check_output,
    check_readable_dir,
    check_readable_files,
    check_space,
    staged_output,
    weights_bytes,
)
from prunetune.runinfo import provenance, write_json


@dataclass
class ExportConfig:
    """One export of a pruned model directory."""

    model_dir: str
    """A `prunetune prune` (or `merge --keep-sparsity`) output directory: Transformers weights with zeros."""
    out: str
    """Output directory: the exported model and export.json."""
    format: str = "compressed-tensors"
    """compressed-tensors: the pruned matrices bit-packed, about half the bytes (read by prunetune and
    compressed-tensors 0.14 only; not vLLM >= 0.19, not Transformers 5) | hf: the servable directory (vLLM,
    Transformers) | gguf: one file for llama.cpp and ollama. export.json and the console say who loads each."""
    compressor: str = "auto"
    """compressed-tensors only: auto (2:4 -> sparse-24-bitmask, every other pattern -> sparse-bitmask) |
    sparse-bitmask | sparse-24-bitmask."""
    dtype: str | None = None
    """Store the weights in this dtype: bfloat16, float16 or float32; default: as stored. A cast never turns a
    zero into a non-zero or back."""
    gguf_type: str = "bf16"
    """gguf only: how the matrices are stored: bf16 (lossless from a bf16 model), f16, q8_0 (about half of bf16;
    pruned zeros stay exactly 0 in all three). Norms stay float32."""
    eval: bool = True
    """gguf only: read the file back with Transformers' GGUF loader and print its perplexity beside the source's
    (the cost of q8_0) on the first --eval-windows windows of --eval-dataset's test split."""
    eval_dataset: str = "wikitext2"
    """With --eval: the text (a registry name or a local file)."""
    eval_windows: int = 4
    """With --eval: windows of --eval-seqlen tokens."""
    eval_seqlen: int = 256
    """With --eval: tokens per window."""
    data_dir: list[str] | None = None
    """With --eval: directories holding local copies of the named datasets (default $PRUNETUNE_DATA_DIR)."""
    overwrite: bool = False
    """Replace an --out that holds an earlier export (only prunetune's own files are replaced)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype!r}: choose bfloat16, float16 or float32 (or omit it: as stored)")
        if self.eval_windows < 1 or self.eval_seqlen < 2:
            raise UserError(f"--eval-windows {self.eval_windows} / --eval-seqlen {self.eval_seqlen}: use at least 1 "
                            "window of 2 tokens (or --no-eval)")
        registry.get(self.format).check(self)


@dataclass
class ExportResult:
    out: Path
    format: str
    pattern: str
    sparsity: float
    """Zero fraction of the exported matrices (measured on the weights)."""
    matrices: int
    rows: list[tuple[str, int, int]]
    """(what, bytes before, bytes exported)."""
    verified: int
    """Matrices read back from the export and found identical to the source."""
    notes: list[str]
    seconds: float
    record: dict[str, Any] = field(repr=False, default_factory=dict)


def run_export(cfg: ExportConfig, log: Log = print) -> ExportResult:
    """Export `cfg.model_dir` to `cfg.out` in `cfg.format`; the format verifies what it wrote before the
    directory is published."""
    fmt = registry.get(cfg.format)
    start = time.perf_counter()
    model_dir = _check_source(cfg)
    source = _load_source(model_dir, cfg.dtype)
    weights = [m.weight.data for m in source.linears.values()]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    sparsity = zeros / total if total else 0.0
    with staged_output(cfg.out, inputs=[model_dir], overwrite=cfg.overwrite, command="export",
                       what=f"the {fmt.name} export") as staging:
        written = fmt.write(source, cfg, staging, log)
        record = {
            "format": fmt.name, "source": str(model_dir), "pattern": source.pattern, "sparsity": sparsity,
            "prune": source.prune_summary, "matrices": len(source.linears), **written.record,
            "verified": written.verified, "loads_in": fmt.runtimes, **provenance(),
        }
        write_json(staging / EXPORT_JSON, record)
    out = Path(cfg.out).expanduser().resolve()
    return ExportResult(out, fmt.name, source.pattern, sparsity, len(source.linears), written.rows, written.verified,
                        [*written.notes, f"Loads in: {fmt.runtimes}"], time.perf_counter() - start, record)


def _check_source(cfg: ExportConfig) -> Path:
    """MODEL_DIR, refused unless it is a model directory (not already an export) and --out can take the export."""
    check_links(cfg.model_dir, "MODEL_DIR")
    model_dir = check_readable_dir(cfg.model_dir, "MODEL_DIR")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"MODEL_DIR {str(model_dir)!r} has no config.json; give a `prunetune prune` output directory")
    if is_sparse_export(model_dir):
        raise UserError(f"{str(model_dir)!r} is already a compressed-tensors export; give the pruned model directory")
    check_complete(model_dir, "MODEL_DIR")
    check_readable_files(model_dir, "MODEL_DIR")  # unreadable or truncated weights: named now, not mid-load
    out = check_output(cfg.out, inputs=[model_dir], overwrite=cfg.overwrite)  # before any work
    check_space(out, weights_bytes(model_dir) // 4, doing="the export")  # at least a quarter, whatever the format
    return model_dir


def _load_source(model_dir: Path, dtype: str | None) -> ExportSource:
    """The pruned model (in `dtype`, else as stored), its tokenizer and pattern; a load failure is the user's."""
    pattern, skipped, summary = pattern_of(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE_NAMES[dtype] if dtype else "auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise UserError(f"cannot load {str(model_dir)!r}: {first_line(err)}; give a `prunetune prune` output") from None
    linears = {n: m for n, m in prunable_linears(model).items() if n not in skipped}
    return ExportSource(model_dir, model, tokenizer, pattern, linears, summary)
