"""Reading a compressed-tensors sparse export (`prunetune export --format compressed-tensors`): detection, the
package's own decompression, and a Transformers model with the decompressed weights. Kept apart from the writer
(`prunetune.export.compressed_tensors`) so that model loading can read exports without importing the export
command's code.

Transformers 5 cannot load a sparse-compressed checkpoint itself (its compressed-tensors integration handles
quantization only), and vLLM >= 0.19 refuses sparsity configs, so this decompressor is how such a directory is
read today. Why compressed-tensors 0.14.0.1: its sparse compressors were removed in 0.15; its metadata asks
transformers<5 although the compressors need only torch, so `make setup` installs it with `--no-deps`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prunetune.errors import UserError
from prunetune.rundir import check_readable_dir

INSTALL_HINT = "pip install --no-deps compressed-tensors==0.14.0.1 (or `make setup`)"


def model_compressor() -> Any:
    """compressed-tensors' ModelCompressor, from a release that still has the sparse compressors."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
    except ImportError:
        raise UserError(f"reading or writing compressed-tensors needs the compressed-tensors package: {INSTALL_HINT}") from None
    if not hasattr(compressed_tensors.compressors, "BitmaskCompressor"):
        raise UserError(f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors (removed in "
                        f"0.15); {INSTALL_HINT}")
    return ModelCompressor


def is_sparse_export(directory: str | Path) -> bool:
    """Whether `directory` holds a compressed-tensors sparse checkpoint (config.json `sparsity_config`)."""
    try:
        qc = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and bool(qc.get("sparsity_config"))


def decompressed_weights(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an export, the compressed ones decompressed, by compressed-tensors' own decompressor."""
    compressor = model_compressor().from_pretrained(str(directory))
    if compressor is None or compressor.sparsity_compressor is None:
        raise UserError(f"{str(directory)!r} holds no compressed-tensors sparsity_config; give a `prunetune export` output")
    yield from compressor.sparsity_compressor.decompress(str(directory))


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

