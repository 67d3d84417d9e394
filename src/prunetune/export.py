"""`prunetune export`: a pruned model in the compressed-tensors sparse format (the one llm-compressor writes and
vLLM's compressed-tensors loader reads), written by the `compressed-tensors` package's own compressors.

Formats (compressed-tensors `sparsity_config.format`):
- `sparse-bitmask`: per matrix the non-zero values (1-D, row-major), a bitmask (1 bit a weight, packed per row)
  and row offsets. Holds any pattern: unstructured, blocks, any N:M.
- `sparse-24-bitmask`: 2:4 only (at most 2 non-zeros in every 4 consecutive input weights): the kept values as
  an (out, in/2) matrix plus the bitmask; the layout of vLLM's 2:4 kernels (fp16/bf16).

Why compressed-tensors 0.14.0.1: its sparse compressors were removed in 0.15 (0.15-0.20 keep only the config
classes; `ModelCompressor.update_config` there writes an empty `sparsity_config`), and 0.14.0.1's metadata asks
for transformers<5 although the compressors need only torch. `make setup` installs it with `--no-deps`.
Transformers 5 itself cannot load a sparse-compressed checkpoint (its compressed-tensors integration handles
quantization only), so `load_exported` decompresses with the package and loads the dense weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from prunetune.architecture import prunable_linears
from prunetune.devices import DTYPE_NAMES
from prunetune.errors import UserError
from prunetune.models import first_line
from prunetune.rundir import MASKS_FILE, check_output, check_readable_dir, read_pruned, staged_output
from prunetune.runinfo import provenance, write_json
from prunetune.sparsity.patterns import parse_pattern

FORMATS = ("compressed-tensors",)
COMPRESSORS = ("auto", "sparse-bitmask", "sparse-24-bitmask")
EXPORT_JSON = "export.json"
_Log = Callable[[str], None]


@dataclass
class ExportConfig:
    """One export of a pruned model directory."""

    model_dir: str
    """A `prunetune prune` (or `merge --keep-sparsity`) output directory: Transformers weights with zeros."""
    out: str
    """Output directory: config.json (with `quantization_config.sparsity_config`), compressed safetensors,
    tokenizer, export.json."""
    format: str = "compressed-tensors"
    """Only compressed-tensors (the sparse format of llm-compressor and vLLM)."""
    compressor: str = "auto"
    """auto (2:4 -> sparse-24-bitmask, every other pattern -> sparse-bitmask) | sparse-bitmask | sparse-24-bitmask."""
    dtype: str | None = None
    """Store the weights in this dtype: bfloat16 or float16 (vLLM's 2:4 kernels take only these), float32;
    default: as stored. The bit-exact check compares with the source cast to it (a cast never turns a zero into
    a non-zero or back)."""
    overwrite: bool = False
    """Replace an --out that holds an earlier export (only prunetune's own files are replaced)."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype!r}: choose bfloat16, float16 or float32 (or omit it: as stored)")
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r} is not supported; use {', '.join(FORMATS)}")
        if self.compressor not in COMPRESSORS:
            raise UserError(f"--compressor {self.compressor!r} is unknown; use one of {', '.join(COMPRESSORS)}")


@dataclass
class ExportResult:
    out: Path
    compressor: str
    pattern: str
    sparsity: float
    """Zero fraction of the compressed matrices (measured on the weights)."""
    matrices: int
    dense_bytes: int
    """Safetensors bytes of the source model (masks file excluded)."""
    compressed_bytes: int
    """Safetensors bytes of the export."""
    linear_dense_bytes: int
    """Bytes the compressed matrices take dense."""
    linear_compressed_bytes: int
    """Bytes of their compressed form (values + bitmask + offsets + shape)."""
    verified: int
    """Matrices decompressed with compressed-tensors and found bit-identical to the source."""
    seconds: float
    record: dict[str, Any] = field(repr=False, default_factory=dict)


def _safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors") if p.name != MASKS_FILE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, with -0.0 read as +0.0: the bitmask format stores zeros by position only,
    so a pruned -0.0 comes back as +0.0 (the one value difference it cannot represent)."""
    t = t.detach().cpu().contiguous()
    t = torch.where(t == 0, torch.zeros_like(t), t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _pattern_of(model_dir: Path) -> tuple[str, list[str], dict[str, Any]]:
    """(pattern name from prune.json, modules it lists as skipped, what export.json repeats of it); unstructured
    without a record."""
    info = read_pruned(model_dir)
    record = info.prune_json
    cfg = record.get("config", record) if isinstance(record.get("config", record), dict) else {}
    pattern = str(cfg.get("pattern") or record.get("pattern") or "unstructured")
    try:
        pattern = parse_pattern(pattern).name
    except ValueError:
        raise UserError(f"{model_dir}/prune.json names an unknown pattern {pattern!r}; re-run `prunetune prune`") from None
    skipped = [str(s) for s in record.get("skipped", []) if isinstance(s, str)]
    summary = {"base_model": info.base_model, "pruning": info.pruning, "overall": record.get("overall"),
               "pruned_perplexity": info.pruned_perplexity}
    return pattern, skipped, summary


def _check_24(name: str, weight: torch.Tensor) -> str | None:
    """Why `weight` cannot be stored 2:4 (at most 2 non-zeros per 4 input weights), or None."""
    if weight.shape[-1] % 4:
        return f"{name}: {weight.shape[-1]} input features are not a multiple of 4"
    nonzero = (weight != 0).view(weight.shape[0], -1, 4).sum(-1)  # (out, in/4)
    bad = int((nonzero > 2).sum())
    if bad:
        return f"{name}: {bad} of {nonzero.numel()} groups of 4 hold more than 2 non-zeros"
    return None


def choose_compressor(requested: str, pattern: str, weights: dict[str, torch.Tensor]) -> str:
    """The compressed-tensors format for `pattern`, refusing one that cannot hold these weights."""
    if requested == "auto":
        requested = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    if requested == "sparse-24-bitmask":
        for name, w in weights.items():
            problem = _check_24(name, w)
            if problem:
                raise UserError(f"sparse-24-bitmask holds only 2:4 sparsity ({problem}; pattern {pattern}); "
                                "use --compressor sparse-bitmask, which holds any pattern")
    return requested


def _min_sparsity(dtype: torch.dtype) -> float:
    """Below this zero fraction the bitmask (1 bit a weight) costs more than the zeros it saves."""
    return 1.0 / (8 * torch.empty((), dtype=dtype).element_size())


_INSTALL = "pip install --no-deps compressed-tensors==0.14.0.1 (or `make setup`)"


def _model_compressor() -> Any:
    """compressed-tensors' ModelCompressor, from a release that still has the sparse compressors."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
    except ImportError:
        raise UserError(f"`prunetune export` needs the compressed-tensors package: {_INSTALL}") from None
    if not hasattr(compressed_tensors.compressors, "BitmaskCompressor"):
        raise UserError(f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors (removed in "
                        f"0.15); {_INSTALL}")
    return ModelCompressor


def export_compressed(cfg: ExportConfig, log: _Log = print) -> ExportResult:
    """Compress `cfg.model_dir` into `cfg.out`, decompress it again with compressed-tensors and require every
    weight bit-identical before the result is published."""
    ModelCompressor = _model_compressor()
    start = time.perf_counter()
    model_dir = _check_source(cfg)
    pattern, skipped, prune_summary = _pattern_of(model_dir)
    model, tokenizer = _load_source(model_dir, cfg.dtype)
    linears = {n: m for n, m in prunable_linears(model).items() if n not in skipped}
    weights = {n: m.weight.data for n, m in linears.items()}
    sparsity, dtype = _sparsity_of(model_dir, weights)
    compressor_name = choose_compressor(cfg.compressor, pattern, weights)
    ignore = sorted(set(_all_linear_names(model)) - set(linears))
    compressor = ModelCompressor(sparsity_config=_sparsity_config(compressor_name, sorted(linears), ignore, sparsity))
    log(f"Compressing {len(linears)} matrices ({pattern}, {sparsity:.2%} zeros) with {compressor_name}")
    state = compressor.compress(model)
    linear_compressed = sum(
        t.numel() * t.element_size() for k, t in state.items() if k.rsplit(".", 1)[0] in linears
    )
    linear_dense = sum(w.numel() * w.element_size() for w in weights.values())

    with staged_output(cfg.out, inputs=[model_dir], overwrite=cfg.overwrite, owned=(EXPORT_JSON,),
                       command="export") as staging:
        model.save_pretrained(staging, state_dict=state)
        compressor.update_config(str(staging))
        tokenizer.save_pretrained(staging)
        verified = verify_export(staging, model, linears)
        compressed_bytes = _safetensors_bytes(staging)
        dense_bytes = _safetensors_bytes(model_dir)
        record = {
            "format": cfg.format,
            "compressor": compressor_name,
            "source": str(model_dir),
            "pattern": pattern,
            "sparsity": sparsity,
            "prune": prune_summary,
            "matrices": len(linears),
            "ignored": ignore,
            "dtype": str(dtype).removeprefix("torch."),
            "bytes": {"dense_safetensors": dense_bytes, "compressed_safetensors": compressed_bytes,
                      "linear_dense": linear_dense, "linear_compressed": linear_compressed},
            "verified_bit_exact": verified,
            "load": "prunetune.export.load_exported(DIR) (Transformers 5 does not read sparse compressed-tensors)",
            **provenance(),
        }
        write_json(staging / EXPORT_JSON, record)
    out = Path(cfg.out).expanduser().resolve()
    return ExportResult(out, compressor_name, pattern, sparsity, len(linears), dense_bytes, compressed_bytes,
                        linear_dense, linear_compressed, verified, time.perf_counter() - start, record)


def _check_source(cfg: ExportConfig) -> Path:
    """MODEL_DIR, refused unless it is a pruned model (not already an export) and --out can take the export."""
    model_dir = check_readable_dir(cfg.model_dir, "MODEL_DIR")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"MODEL_DIR {str(model_dir)!r} has no config.json; give a `prunetune prune` output directory")
    if is_sparse_export(model_dir):
        raise UserError(f"{str(model_dir)!r} is already a compressed-tensors export; give the pruned model directory")
    check_output(cfg.out, inputs=[model_dir], overwrite=cfg.overwrite, owned=(EXPORT_JSON,))  # before any work
    return model_dir


def _load_source(model_dir: Path, dtype: str | None) -> tuple[PreTrainedModel, Any]:
    """The pruned model (in `dtype`, else as stored) and its tokenizer; a load failure is the user's to fix."""
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE_NAMES[dtype] if dtype else "auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load {str(model_dir)!r}: {first_line(err)}; give a `prunetune prune` output") from None
    return model, tokenizer


def _sparsity_of(model_dir: Path, weights: dict[str, torch.Tensor]) -> tuple[float, torch.dtype]:
    """(zero fraction, dtype) of the matrices to compress, refused where the bitmask would not pay off."""
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    sparsity = zeros / total
    dtype = next(iter(weights.values())).dtype
    if sparsity < _min_sparsity(dtype):
        raise UserError(
            f"{str(model_dir)!r} is not sparse ({sparsity:.2%} zeros in its decoder linears; the bitmask pays off "
            f"above {_min_sparsity(dtype):.1%} for {str(dtype).removeprefix('torch.')}); prune it first "
            "(`prunetune prune`), or ship the dense safetensors as they are"
        )
    return sparsity, dtype


def _sparsity_config(compressor_name: str, targets: list[str], ignore: list[str], sparsity: float) -> Any:
    """compressed-tensors' `sparsity_config` for the matrices `targets`."""
    from compressed_tensors.config import SparsityCompressionConfig

    return SparsityCompressionConfig.load_from_registry(
        compressor_name,
        targets=targets,
        ignore=ignore,
        global_sparsity=round(sparsity, 6),
        sparsity_structure="2:4" if compressor_name == "sparse-24-bitmask" else "unstructured",
    )


def _all_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def is_sparse_export(directory: str | Path) -> bool:
    """Whether `directory` holds a compressed-tensors sparse checkpoint (config.json `sparsity_config`)."""
    import json

    try:
        qc = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return bool(qc.get("sparsity_config"))


def decompressed_weights(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export, the compressed ones decompressed, by compressed-tensors' own decompressor."""
    compressor = _model_compressor().from_pretrained(str(directory))
    if compressor is None or compressor.sparsity_compressor is None:
        raise UserError(f"{str(directory)!r} holds no compressed-tensors sparsity_config; give a `prunetune export` output")
    yield from compressor.sparsity_compressor.decompress(str(directory))


def verify_export(directory: Path, model: nn.Module, linears: dict[str, nn.Linear]) -> int:
    """Decompress `directory` and require each compressed weight bit-identical to `model`'s; the count checked."""
    params = dict(model.named_parameters())
    checked = 0
    for name, tensor in decompressed_weights(directory):
        if name.removesuffix(".weight") not in linears:
            continue
        source = params[name]
        if source.dtype != tensor.dtype or source.shape != tensor.shape or not torch.equal(_bits(source), _bits(tensor)):
            raise RuntimeError(f"compressed-tensors round trip changed {name} (a bug); nothing was written")
        checked += 1
    if checked != len(linears):
        raise RuntimeError(f"round trip returned {checked} of {len(linears)} compressed matrices (a bug)")
    return checked


def load_exported(directory: str | Path, device: str | None = None) -> PreTrainedModel:
    """A Transformers model with the weights of a compressed-tensors sparse export, decompressed by the package."""
    directory = check_readable_dir(directory, "export directory")
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # consumed here; Transformers 5 would otherwise look for a quantizer
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dict(decompressed_weights(directory))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_names(model)
    if unexpected or set(missing) - tied:
        raise UserError(f"{str(directory)!r} does not match its config (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {unexpected[:3]}); export it again")
    model.tie_weights()
    model.eval()
    return model.to(device) if device else model


def _tied_names(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied) if isinstance(tied, dict | list | tuple | set) else set()
    if getattr(model.config, "tie_word_embeddings", False):
        names |= {n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith("lm_head")}
    return names

