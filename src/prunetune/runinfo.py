"""What makes a run directory self-describing: versions, git commit, machine, and atomic JSON writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from prunetune import __version__
from prunetune.devices import cpu_bf16_support, cpuinfo_field


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes a result (from metadata: nothing is imported)."""
    found = {"prunetune": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str | None:
    """The prunetune checkout's commit (with `-dirty` when modified), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def machine() -> dict[str, Any]:
    """CPU/GPU description for benchmark tables and run metadata."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_family": cpuinfo_field("cpu family"),
        "cpu_bf16": cpu_bf16_support() or "none",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_model() -> str:
    # The CPU changes between machines of the same name (AMD EPYC family 23 without bf16, 26 with it).
    return cpuinfo_field("model name") or platform.processor() or "unknown"


def provenance() -> dict[str, Any]:
    """Everything a run directory records about how it was made."""
    return {"versions": versions(), "git_commit": git_commit(), "machine": machine()}


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file + rename): the file is the old one or the new one, never half of one;
    a write that fails (a full disk) leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
