"""The on-disk contract of prunetune: file names, pruned-model and adapter directories, keep-masks, and the
two guards every writing command uses (`staged_output`: nothing half-written and nothing of the user's lost;
`run_lock`: one writer per directory).

Directory kinds and what they hold:
- pruned model (`prune`): a Transformers model dir + `masks.safetensors` + `prune.json`.
- finetune run: `metrics.jsonl`, `train.log`, `run_config.json`, `checkpoint-*/`, `adapter/` (PEFT files +
  `prunetune_adapter.json`, which records the pruned base and a digest of it).
- merged model (`merge`): a Transformers model dir + `merge.json` (+ the masks and `prune.json` when sparse).
- pipeline run: `pipeline.json` + one sub-directory per stage.
Any directory prunetune wrote by `staged_output` also holds `.prunetune-files.json` (the marker): the list of
files it wrote there, the only ones a later `--overwrite` may replace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prunetune.architecture import prunable_linears
from prunetune.errors import UserError
from prunetune.fmt import to_float
from prunetune.pruning.masks import decode_mask, encode_masks, mask_digest

__all__ = ["mask_digest"]  # re-exported: the digest `prune.json` records per mask

# ---- file names ----------------------------------------------------------------------------------------
PRUNE_JSON = "prune.json"
MASKS_FILE = "masks.safetensors"
MERGE_JSON = "merge.json"
PIPELINE_JSON = "pipeline.json"
ADAPTER_DIR = "adapter"
SPARSE_MODEL_DIR = "model"
"""Where `finetune --method sparse-ft` writes its deployable sparse model (a pruned-model directory)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "prunetune_adapter.json"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
MARKER = ".prunetune-files.json"
LOCK_FILE = ".prunetune.lock"
STAGING_PREFIX = ".staging-"

_MASKS_META_KEY = "prunetune_masks"
_Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---- reading files: one place that turns OS errors into user errors --------------------------------------
@contextlib.contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Within the block, a failure to open `path` is a UserError that says which: missing, a directory, or
    permission denied (never "may be corrupt" for a file that could not even be opened)."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{what} {str(path)!r} is a directory, expected a file") from None
    except PermissionError:
        raise UserError(f"{what} {str(path)!r}: permission denied; make it readable (chmod) or copy it") from None


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of `path`, or a UserError that says which of missing / a directory / permission denied."""
    with reading(path, what):
        return Path(path).read_bytes()


def read_json(path: str | Path, what: str = "file", fix: str = "") -> Any:
    """Parsed JSON of `path`; a UserError naming the file, the problem and `fix` otherwise."""
    raw = read_bytes(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({err}){'; ' + fix if fix else ''}") from None


def check_readable_dir(path: str | Path, what: str = "directory") -> Path:
    """`path` as a readable directory, or a UserError (missing, a file, permission denied)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist; check the path")
    if not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a file, expected a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r}: permission denied; make it readable (chmod) or copy it")
    return path


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Refuse a truncated or garbled safetensors file before a loader crashes on it (header + data length)."""
    path = Path(path)
    try:
        with reading(path, what), path.open("rb") as f:
            head = f.read(8)
            size = path.stat().st_size
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes but the file has {size} bytes")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {str(path)!r} is truncated or corrupt ({err}); write it again") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(
            f"{what} {str(path)!r} is truncated ({size} bytes, {8 + header_len + end} expected); write it again"
        )


# ---- pruned model directories -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PrunedInfo:
    path: Path
    base_model: str | None
    """The dense model the pruned one came from (`prune.json` `model`): the teacher and the base spec."""
    pruned_perplexity: float | None
    dense_perplexity: float | None
    pruning: str | None
    """One-line description of how it was pruned (method pattern sparsity)."""
    prune_json: dict[str, Any]


def prune_config(prune_json: Any) -> dict[str, Any]:
    """The prune settings inside a `prune.json` record (its `config`; records of old versions were the settings
    themselves); {} for anything else."""
    if not isinstance(prune_json, dict):
        return {}
    cfg = prune_json.get("config", prune_json)
    return cfg if isinstance(cfg, dict) else {}


def read_pruned(path: str | Path) -> PrunedInfo:
    """What `prune.json` says about a pruned model directory (all None for a plain model dir)."""
    path = Path(path).expanduser()
    meta: dict[str, Any] = {}
    if (path / PRUNE_JSON).is_file():
        meta = read_json(path / PRUNE_JSON, PRUNE_JSON, "re-run `prunetune prune`")
        if not isinstance(meta, dict):
            raise UserError(f"{path / PRUNE_JSON} is not a prune record (a JSON object); re-run `prunetune prune`")
    cfg = prune_config(meta)
    parts = [str(cfg[k]) for k in ("method", "pattern", "sparsity") if cfg.get(k) is not None]
    base = meta.get("model") or cfg.get("model")
    return PrunedInfo(path, str(base) if base else None, to_float(meta.get("pruned_perplexity")),
                      to_float(meta.get("dense_perplexity")), " ".join(parts) or None, meta)


# ---- keep-masks on disk -----------------------------------------------------------------------------------
def _masks_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MASKS_FILE if path.is_dir() else path


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, pattern_meta: dict[str, Any]) -> Path:
    """Write `masks` (name -> bool keep-mask) to `path` (a directory gets `masks.safetensors`), atomically.

    `pattern_meta` is stored as-is; with `"tile": [h, w]` (block patterns) whole-tile masks take one bit a tile.
    Layout: see `prunetune.pruning.masks`.
    """
    path = _masks_path(path)
    tensors, meta = encode_masks(masks, pattern_meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={_MASKS_META_KEY: json.dumps(meta)})
    tmp.replace(path)
    return path


def read_mask_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a masks file (pattern and per-module shapes/encodings). ValueError if not ours."""
    with safe_open(str(_masks_path(path)), framework="pt") as f:
        raw = (f.metadata() or {}).get(_MASKS_META_KEY)
    if raw is None:
        raise ValueError(f"{_masks_path(path)} is not a prunetune masks file (no {_MASKS_META_KEY} metadata)")
    return json.loads(raw)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Full bool keep-masks (True = kept) shaped like each weight, by full module name.

    `path` is a pruned model directory or its `masks.safetensors`. Raises FileNotFoundError / ValueError /
    SafetensorError on a missing or damaged file (`load_keep_masks` turns these into user errors).
    """
    path = _masks_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no masks file at {path}")
    meta = read_mask_meta(path)
    with safe_open(str(path), framework="pt") as f:
        return {name: decode_mask(f.get_tensor(name), info) for name, info in meta["modules"].items()}


def load_keep_masks(pruned_dir: str | Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Keep-mask (True = kept) of every prunable linear of `model`, on CPU, and where it came from.

    From `masks.safetensors` when the directory has one (a module it lacks: `weight != 0`), else from the zero
    weights of a plain model. A damaged masks file or one of another model is a UserError.
    """
    pruned_dir = Path(pruned_dir)
    linears = prunable_linears(model)
    path = pruned_dir / MASKS_FILE
    if not path.is_file():
        # Without a saved mask the zeros are the pattern; a weight that happens to be exactly 0 counts as pruned,
        # which only keeps it at 0.
        return {n: (m.weight != 0).cpu() for n, m in linears.items()}, f"weight != 0 ({MASKS_FILE} absent)"
    check_safetensors(path, "masks file")
    try:
        saved = {name: keep.to(torch.bool) for name, keep in load_masks(path).items()}
    except (ValueError, KeyError, OSError, SafetensorError) as err:
        raise UserError(
            f"cannot read {path} ({str(err)[:200]}); re-run `prunetune prune`, or check it with "
            f"`prunetune verify {pruned_dir}`"
        ) from None
    unknown = sorted(set(saved) - set(linears))
    if unknown:
        raise UserError(f"{path} names modules this model lacks ({', '.join(unknown[:3])}); "
                        "the masks belong to another model, pass the matching model")
    for name, keep in saved.items():
        if tuple(keep.shape) != tuple(linears[name].weight.shape):
            raise UserError(f"{name}: mask shape {tuple(keep.shape)} != weight shape "
                            f"{tuple(linears[name].weight.shape)} in {path}; pass the model the masks came with")
    masks = {n: saved[n] if n in saved else (m.weight != 0).cpu() for n, m in linears.items()}
    return masks, MASKS_FILE


# ---- adapters ---------------------------------------------------------------------------------------------
def base_digest(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None) -> str:
    """A fingerprint of the base an adapter is trained on: names, shapes and values of the prunable weights.

    Values are hashed rounded to bfloat16, so the same checkpoint loaded in float32 or bfloat16 gives the same
    digest; a strided sample (every 61st value, ~2% of the bytes) keeps it well under a second on CPU.
    With `masks`, their digests are included too (the pattern is part of the base).
    """
    h = hashlib.sha256()
    for name, module in sorted(prunable_linears(model).items()):
        w = module.weight.detach()
        sample = w.flatten()[::61].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(sample.numpy().tobytes())
        if masks is not None and name in masks:
            h.update(mask_digest(masks[name]).encode())
    return h.hexdigest()[:16]


def write_adapter_meta(adapter_dir: str | Path, *, pruned_model: str | Path, base_model: str | None,
                       digest: str, **extra: Any) -> Path:
    """Write `prunetune_adapter.json`: which pruned model the adapter belongs to and the base's digest."""
    from prunetune.runinfo import write_json

    path = Path(adapter_dir) / ADAPTER_META
    write_json(path, {"pruned_model": str(Path(pruned_model).resolve()), "base_model": base_model,
                      "base_digest": digest, **extra})
    return path


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """prunetune's record of an adapter ({} for a PEFT adapter prunetune did not write)."""
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        return {}
    meta = read_json(path, ADAPTER_META, "delete it or re-run `prunetune finetune`")
    return meta if isinstance(meta, dict) else {}


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on: prunetune's record first, then PEFT's own."""
    adapter_dir = Path(adapter_dir).expanduser()
    ours = read_adapter_meta(adapter_dir).get("pruned_model")
    if ours:
        return str(ours)
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        base = read_json(adapter_dir / ADAPTER_CONFIG, ADAPTER_CONFIG).get("base_model_name_or_path")
        return str(base) if base else None
    return None


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """A readable, complete PEFT adapter directory (config parses, weights not truncated), or a UserError."""
    path = check_readable_dir(adapter_dir, "adapter")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"adapter {str(adapter_dir)!r} has no {ADAPTER_CONFIG}; give the adapter directory "
                        "`prunetune finetune` wrote (RUN/adapter)")
    config = read_json(path / ADAPTER_CONFIG, "adapter config", "the adapter is damaged; use another checkpoint")
    if not isinstance(config, dict):
        raise UserError(f"{path / ADAPTER_CONFIG} is not an adapter config (a JSON object)")
    weights = path / ADAPTER_WEIGHTS
    if weights.exists():
        check_safetensors(weights, "adapter weights")
    elif not (path / "adapter_model.bin").is_file():
        raise UserError(f"adapter {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; the adapter was not saved "
                        "completely, use a checkpoint-*/ of the run or train again")
    return path


def check_adapter_base(adapter_dir: str | Path, model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                       *, force: bool = False) -> str | None:
    """Refuse an adapter trained on another base (digest mismatch) unless `force`; returns a note, or None.

    Adapters without a recorded digest (older prunetune, plain PEFT) pass with a note saying it was not checked.
    """
    meta = read_adapter_meta(adapter_dir)
    recorded = meta.get("base_digest")
    if not recorded:
        return "the adapter records no base digest; cannot check it was trained on this model"
    actual = base_digest(model, masks)
    if actual == recorded:
        return None
    message = (f"adapter {str(adapter_dir)!r} was trained on another base (digest {recorded}, this model "
               f"{actual}; trained on {meta.get('pruned_model')!r})")
    if force:
        return message + "; merged anyway (--force)"
    raise UserError(message + "; pass the model it was trained on, or --force to merge anyway")


# ---- the staged-output guard ------------------------------------------------------------------------------
def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _marker_files(out: Path) -> list[str] | None:
    try:
        files = json.loads((out / MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(f) for f in files] if isinstance(files, list) else None


def _content(out: Path) -> list[Path]:
    """What `out` holds, less our own bookkeeping (marker, lock, leftover staging dirs)."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name not in (MARKER, LOCK_FILE) and not p.name.startswith(STAGING_PREFIX)]


def _probe_writable(out: Path, what: str = "--out") -> None:
    """Refuse an `out` that cannot be created or written (read-only fs, a path under a file) before any work."""
    anchor = out
    while not anchor.exists():
        if anchor.parent == anchor:
            break
        anchor = anchor.parent
    if anchor.exists() and not anchor.is_dir():
        raise UserError(f"{what} {str(out)!r} lies under the file {str(anchor)!r}; choose a directory path")
    try:
        fd = os.open(anchor / f"{STAGING_PREFIX}probe-{os.getpid()}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(anchor / f"{STAGING_PREFIX}probe-{os.getpid()}")
    except FileExistsError:
        pass
    except OSError as err:
        raise UserError(f"{what} {str(out)!r} is not writable ({err.strerror} in {anchor}); "
                        "choose a directory you can write") from None


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output *file* path that is a directory, lies under a file, or cannot be written; before work."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {str(path)!r} is a directory, expected a file path")
    _probe_writable(path.parent, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {str(path)!r}: permission denied; choose a file you can write")
    return path


def check_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 owned: Iterable[str] = ()) -> Path:
    """Refuse an output before any work starts; returns `out` resolved. The rules:

    - `out` may not be, contain or lie inside any of `inputs`;
    - it must be creatable and writable, and a directory (not a file);
    - a non-empty `out` is accepted only if prunetune wrote it (marker file, or one of the `owned` file names
      for directories of older versions) and `overwrite` is set.
    """
    out = Path(out).expanduser().resolve()
    for inp in inputs:
        inp = Path(inp).expanduser().resolve()
        if _inside(out, inp) or _inside(inp, out):
            raise UserError(f"--out {str(out)!r} overlaps the input {str(inp)!r}; choose a separate directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    _probe_writable(out)
    content = _content(out)
    if not content:
        return out
    previous = _marker_files(out)
    if previous is not None and not any((out / name).exists() for name in previous):
        return out  # ours, holding no result of ours yet (e.g. a pipeline stage dir): nothing would be replaced
    ours = previous is not None or any((out / name).exists() for name in owned)
    if not ours:
        raise UserError(f"--out {str(out)!r} is not empty and holds no prunetune output; choose an empty or new "
                        "directory (prunetune never deletes files it did not write)")
    if not overwrite:
        raise UserError(f"--out {str(out)!r} already holds a prunetune result; pass --overwrite to replace it "
                        "(only prunetune's own files are replaced), or choose another --out")
    return out


def _clear_stale_staging(out: Path) -> None:
    for stale in out.glob(f"{STAGING_PREFIX}*") if out.is_dir() else ():
        pid = stale.name.removeprefix(STAGING_PREFIX).split("-")[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _install(staging: Path, out: Path, owned: Iterable[str]) -> list[str]:
    """Move the staged files into `out`: first drop what a previous prunetune run wrote there (per the marker;
    for an older dir without one, the staged names and the `owned` names), never anything else."""
    new = sorted(p.name for p in staging.iterdir())
    previous = _marker_files(out)
    old = set(previous if previous is not None else [*new, *owned])
    # Weight shards are named by count (model-00001-of-00003.safetensors): a previous save's extra shards go too.
    if previous is None and any(n.startswith("model") and ".safetensors" in n for n in new):
        old |= {p.name for p in out.glob("model*.safetensors*")}
    (out / MARKER).unlink(missing_ok=True)  # from here until the new marker, the dir is visibly incomplete
    for name in sorted(old - set(new)):
        if "/" not in name and name not in (MARKER, LOCK_FILE):
            _remove(out / name)
    for name in new:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            aside = out / f"{STAGING_PREFIX}old-{name}-{os.getpid()}"
            os.replace(target, aside)
            os.replace(staging / name, target)
            shutil.rmtree(aside)
        else:
            os.replace(staging / name, target)
    staging.rmdir()
    return new


@contextlib.contextmanager
def staged_output(out: str | Path, *, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                  owned: Iterable[str] = (), command: str = "prunetune") -> Iterator[Path]:
    """Yield an empty staging directory; write the whole result there. On success it replaces `out`'s previous
    prunetune files (a new `out` appears whole, by one rename); on an exception it is deleted and `out` is as
    before. Checks as `check_output` (call that too, before long work, to fail early).
    """
    inputs, owned = list(inputs), list(owned)
    out = check_output(out, inputs=inputs, overwrite=overwrite, owned=owned)
    fresh = not _content(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fresh:  # stage beside `out`: one rename publishes it whole
        staging = out.parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}"
        _clear_stale_staging(out.parent)
    else:
        staging = out / f"{STAGING_PREFIX}{os.getpid()}"
        _clear_stale_staging(out)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        if fresh:
            files = sorted(p.name for p in staging.iterdir())
            _write_marker(staging, files, command)
            if out.is_dir():  # empty but for our bookkeeping (a lock, an old staging dir)
                for leftover in out.iterdir():
                    os.replace(leftover, staging / leftover.name) if leftover.name == LOCK_FILE else _remove(leftover)
                out.rmdir()
            os.replace(staging, out)
        else:
            files = _install(staging, out, owned)
            _write_marker(out, files, command)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def mark_ours(directory: str | Path, command: str, files: Iterable[str] = ()) -> Path:
    """Create `directory` (if needed) and record that prunetune owns it and wrote `files` there (the marker).

    With no files (e.g. a pipeline stage directory made before its stage runs) the directory counts as ours
    but holding nothing to replace: `check_output` accepts it without --overwrite and keeps its other files.
    """
    from prunetune import __version__
    from prunetune.runinfo import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / MARKER, {"written_by": f"prunetune {__version__}", "command": command,
                                    "files": sorted(files), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return directory / MARKER


def _write_marker(directory: Path, files: list[str], command: str) -> None:
    mark_ours(directory, command, files)


def is_ours(directory: str | Path, owned: Iterable[str] = ()) -> bool:
    """Whether prunetune wrote `directory` (marker, or one of the `owned` names of older layouts)."""
    directory = Path(directory)
    return (directory / MARKER).is_file() or any((directory / name).exists() for name in owned)


# ---- one writer per directory -----------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_held: dict[tuple[Path, int], int] = {}  # (lock path, thread) -> depth: re-entrant per thread, not per process


def _try_create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return True


def _lock_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (the lock file is unreadable)"
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, "
            f"started {info.get('started')})")


@contextlib.contextmanager
def run_lock(directory: str | Path, command: str, *, wait_s: float = 0.0, name: str = LOCK_FILE,
             log: _Log = _stderr) -> Iterator[Path]:
    """Hold `directory/name` (created with the directory) while writing there: one writer per directory.

    The lock file holds pid, host, command and start time. Another live holder: wait up to `wait_s` seconds,
    then a UserError naming it and what to do. A lock left by a dead process on this host is taken over with a
    message. Re-entrant within one process. Yields the lock file's path.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / name).resolve()
    key = (path, threading.get_ident())
    if _held.get(key):
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    deadline = time.monotonic() + wait_s
    while not _try_create(path, info):
        holder = _read_lock(path)
        stale = False
        if holder is None:
            # Unreadable: a lock being written this instant, or the remains of a crash; give it a few seconds.
            with contextlib.suppress(OSError):
                stale = time.time() - path.stat().st_mtime > 10
        elif holder.get("host") == host and not _pid_alive(int(holder.get("pid") or 0)):
            stale = True
        if stale:
            # Rename, then retry the exclusive create: of two processes taking over at once only one wins.
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)
                aside.unlink()
                log(f"Taking over the lock {path}: {_lock_holder(holder)} is no longer running")
            continue
        if time.monotonic() < deadline:
            time.sleep(0.5)
            continue
        pid = holder.get("pid") if holder else None
        how = (f"wait for it to finish or stop it (kill {pid})" if holder and holder.get("host") == host
               else "wait for it to finish")
        raise UserError(f"{directory} is being written by {_lock_holder(holder)}; {how}; if no such process "
                        f"runs any more, delete {path}")
    _held[key] = 1
    try:
        yield path
    finally:
        _held.pop(key, None)
        holder = _read_lock(path)
        if holder and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
