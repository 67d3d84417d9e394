"""A Transformers model without its weights, for `prune`'s layer-by-layer walk: built from its config with every
parameter on the meta device (buffers such as rotary tables computed as usual), its checkpoint's tensors located
in the safetensors shards, and the files `save_pretrained` would write for it laid out in advance. With it the
walk holds one decoder layer at a time and still writes the shards byte for byte as `save_pretrained` of the whole
model would (tests/test_prune_streaming.py compares them, and `from_pretrained`'s model with this one).

A model streams only where that reproduces `from_pretrained` exactly: safetensors weights holding every tensor the
model expects under the model's own names, no weight conversion that applies to them, no module kept in float32
under a half dtype. Otherwise `build_skeleton` says why not, and `prune` loads the whole model instead.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from prunetune.shards import DTYPE_CODES, ShardReader, TensorSpec

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# The largest shard save_pretrained writes by default (read from its signature, so a Transformers update that
# changes it changes the layout here too).
MAX_SHARD_SIZE = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass
class Skeleton:
    model: PreTrainedModel
    """Every parameter on the meta device until loaded; buffers real; tied weights tied."""
    reader: ShardReader
    """The checkpoint's tensors, by the model's own names."""


@dataclass(frozen=True)
class SaveLayout:
    """What `save_pretrained` writes for a model: the tensors of each weight file, and the index when sharded."""

    files: dict[str, list[TensorSpec]]
    index: dict | None

    @property
    def names(self) -> set[str]:
        return {spec.name for specs in self.files.values() for spec in specs}

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for specs in self.files.values() for spec in specs)


def build_skeleton(config: PretrainedConfig, location: str, files: list[Path], dtype: torch.dtype,
                   local_only: bool) -> Skeleton | str:
    """The weightless model of `config` (read from the Transformers directory or hub id `location`) whose weights
    are `files`, in `dtype`; or a sentence saying why it cannot be streamed exactly (the caller loads it whole)."""
    from accelerate import init_empty_weights

    try:
        reader = ShardReader(files)
    except (OSError, ValueError) as err:
        return f"its safetensors files could not be read one tensor at a time ({str(err)[:160]})"
    with init_empty_weights(include_buffers=False):  # buffers are computed, as from_pretrained's init does
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    model.eval()
    if dtype != torch.float32 and (model._keep_in_fp32_modules or model._keep_in_fp32_modules_strict):
        return f"{type(model).__name__} keeps some modules in float32 under {dtype}"
    expected = save_layout(model).names
    missing = sorted(expected - reader.names())
    if missing:
        return (f"its checkpoint lacks {len(missing)} tensors under the model's names (e.g. {missing[0]}); "
                "Transformers converts or initialises them on load")
    if renamed := _renamed_keys(model, reader.names()):
        return f"Transformers renames some of its checkpoint's tensors on load (e.g. {renamed})"
    # What from_pretrained records when no conversion applied to the checkpoint; save_pretrained then orders the
    # tensors by their dotted names (layers.2 before layers.10), which decides what goes in which shard.
    model._weight_conversions = []
    if hasattr(model, "adjust_generation_fn"):  # the generation config from_pretrained loads beside the weights
        model.adjust_generation_fn(None, True, None, location, cache_dir=None, force_download=False, proxies=None,
                                   local_files_only=local_only, token=None, revision=None, subfolder="",
                                   trust_remote_code=False)
    return Skeleton(model, reader)


def _renamed_keys(model: PreTrainedModel, names: set[str]) -> str | None:
    """A checkpoint tensor that one of the model's load-time conversions would rename or transform (streaming
    reads tensors under their stored names, so it must not meet one), or None."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    for conversion in get_model_conversion_mapping(model, None, None):
        if type(conversion).__name__ != "WeightRenaming":
            return f"a {type(conversion).__name__} conversion"
        for pattern in getattr(conversion, "source_patterns", []):
            hit = next((n for n in sorted(names) if re.search(pattern, n)), None)
            if hit is not None:
                return hit
    return None


def save_layout(model: PreTrainedModel, max_shard_size: int | str = MAX_SHARD_SIZE) -> SaveLayout:
    """The weight files `model.save_pretrained(dir, max_shard_size=...)` writes (the same steps: keys to ignore,
    tied weights dropped, the same split into shards), from the model's state dict, weights loaded or not."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    renamed = revert_weight_conversion(model, state)  # orders the tensors as save_pretrained does
    if set(renamed) != set(state):
        raise ValueError("saving this model renames its tensors; the shard layout cannot be laid out in advance")
    state = renamed
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    files = {}
    for filename, names in split.filename_to_tensors.items():
        for name in names:
            if state[name].dtype not in DTYPE_CODES:
                raise ValueError(f"tensor {name!r} has dtype {state[name].dtype}, which the shard writer cannot lay out")
        files[filename] = [TensorSpec(name, state[name].dtype, tuple(state[name].shape)) for name in names]
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
    return SaveLayout(files, index)


def write_config_files(model: PreTrainedModel, directory: Path, layout: SaveLayout) -> None:
    """config.json, generation_config.json and (sharded) the index, as `save_pretrained` writes them."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    if layout.index is not None:
        (directory / INDEX_NAME).write_text(json.dumps(layout.index, indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
