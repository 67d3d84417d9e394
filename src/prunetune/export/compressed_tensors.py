"""`--format compressed-tensors`: the pruned matrices in compressed-tensors' sparse format (the layout llm-compressor
wrote for sparse models), written and read back by the `compressed-tensors` package's own compressors.

Formats (compressed-tensors `sparsity_config.format`):
- `sparse-bitmask`: per matrix the non-zero values (1-D, row-major), a bitmask (1 bit a weight, packed per row)
  and row offsets. Holds any pattern: unstructured, blocks, any N:M.
- `sparse-24-bitmask`: 2:4 only (at most 2 non-zeros in every 4 consecutive input weights): the kept values as
  an (out, in/2) matrix plus the bitmask; the layout of vLLM's 2:4 kernels (fp16/bf16).

Why compressed-tensors 0.14.0.1: its sparse compressors were removed in 0.15 (0.15-0.20 keep only the config
classes; `ModelCompressor.update_config` there writes an empty `sparsity_config`), and 0.14.0.1's metadata asks
for transformers<5 although the compressors need only torch. `make setup` installs it with `--no-deps`.
Transformers 5 cannot load a sparse-compressed checkpoint (its compressed-tensors integration handles quantization
only), so `prunetune.exported.load_exported` decompresses with the package and loads the dense weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunetune.errors import UserError
from prunetune.export.base import ExportSource, Log, Written, safetensors_bytes
from prunetune.exported import decompressed_weights, model_compressor

COMPRESSORS = ("auto", "sparse-bitmask", "sparse-24-bitmask")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, with -0.0 read as +0.0: the bitmask format stores zeros by position only,
    so a pruned -0.0 comes back as +0.0 (the one value difference it cannot represent)."""
    t = t.detach().cpu().contiguous()
    t = torch.where(t == 0, torch.zeros_like(t), t)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


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


class CompressedTensors:
    """The pruned matrices bit-packed (values + a 1-bit-a-weight mask): about half the bytes at 50% sparsity,
    bit-exact after the package's decompression."""

    name = "compressed-tensors"
    runtimes = ("prunetune (`evaluate`/`speed --model DIR`, `prunetune.exported.load_exported`) and "
                "compressed-tensors 0.14's own decompression. Not vLLM >= 0.19 (it removed sparse "
                "compressed-tensors support) and not Transformers 5 (quantized checkpoints only); to serve, export "
                "--format hf or gguf")

    def check(self, cfg: Any) -> None:
        if cfg.compressor not in COMPRESSORS:
            raise UserError(f"--compressor {cfg.compressor!r} is unknown; use one of {', '.join(COMPRESSORS)}")

    def write(self, source: ExportSource, cfg: Any, staging: Path, log: Log) -> Written:
        ModelCompressor = model_compressor()
        model, linears = source.model, source.linears
        weights = {n: m.weight.data for n, m in linears.items()}
        sparsity, dtype = _sparsity_of(source.model_dir, weights)
        compressor_name = choose_compressor(cfg.compressor, source.pattern, weights)
        ignore = sorted(set(_all_linear_names(model)) - set(linears))
        compressor = ModelCompressor(sparsity_config=_sparsity_config(compressor_name, sorted(linears), ignore,
                                                                      sparsity))
        log(f"Compressing {len(linears)} matrices ({source.pattern}, {sparsity:.2%} zeros) with {compressor_name}")
        state = compressor.compress(model)
        linear_packed = sum(t.numel() * t.element_size() for k, t in state.items() if k.rsplit(".", 1)[0] in linears)
        linear_dense = sum(w.numel() * w.element_size() for w in weights.values())
        model.save_pretrained(staging, state_dict=state)
        compressor.update_config(str(staging))
        source.tokenizer.save_pretrained(staging)
        verified = verify_export(staging, model, linears)
        dense_bytes, packed_bytes = safetensors_bytes(source.model_dir), safetensors_bytes(staging)
        return Written(
            record={"compressor": compressor_name, "ignored": ignore, "dtype": str(dtype).removeprefix("torch."),
                    "bytes": {"dense_safetensors": dense_bytes, "compressed_safetensors": packed_bytes,
                              "linear_dense": linear_dense, "linear_compressed": linear_packed},
                    "verified_bit_exact": verified},
            rows=[("whole model", dense_bytes, packed_bytes),
                  (f"{len(linears)} pruned matrices", linear_dense, linear_packed)],
            verified=verified,
            notes=[f"{verified} matrices decompressed by compressed-tensors and bit-identical ({compressor_name})"],
        )


FORMAT = CompressedTensors()
