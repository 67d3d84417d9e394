"""Where tensors are computed and in which precision: the default device and `resolve_dtype`, one definition
for every command (issue 13: bf16 where the hardware computes it natively, float32 where it would be emulated).

What stays float32 whatever is chosen here, and why: the loss and its softmax over the vocabulary
(`evaluate.perplexity`, the Trainer's loss: exp/log of small differences), the optimizer state and the LoRA
weights (the Trainer's autocast keeps master weights in float32), and the Hessians and least squares of
reconstruction/SparseGPT (`pruning.reconstruct`, `pruning.sparsegpt`: Cholesky of X^T X loses rank in bf16).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import torch

from prunetune.errors import UserError

Purpose = Literal["train", "eval", "calibration"]
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def default_device(requested: str | None = None) -> str:
    """`requested` when given, else `cuda` when a CUDA device is visible, else `cpu`."""
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@cache
def cpuinfo_field(*names: str) -> str | None:
    """The first value of a /proc/cpuinfo field (`model name`, `cpu family`, `flags`, ...); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(names):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    return frozenset((cpuinfo_field("flags", "Features") or "").split())


def free_memory(device: str) -> int | None:
    """Bytes free where `device` computes: one GPU's free memory on CUDA, available RAM on CPU; None if unreadable."""
    try:
        if torch.device(device).type == "cuda":
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        import psutil

        return int(psutil.virtual_memory().available)
    except (RuntimeError, AssertionError, OSError):
        return None


def cpu_bf16_support() -> str | None:
    """The native bf16 feature of this CPU (`avx512_bf16`, `amx_bf16`), or None when bf16 would be emulated.

    /proc/cpuinfo first; torch's own detection (what its kernels dispatch on) where there is no cpuinfo.
    """
    flags = cpu_flags()
    for flag in BF16_CPU_FLAGS:
        if flag in flags:
            return flag
    if not flags:
        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        for flag, probe in probes.items():
            check = getattr(torch.cpu, probe, None)
            if check is not None and check():
                return flag
    return None


def resolve_dtype(requested: str | torch.dtype | None, device: str, purpose: Purpose) -> tuple[torch.dtype, str]:
    """(dtype, reason) for computing `purpose` on `device`. An explicit dtype always wins; `auto` (or None) picks:

    - CUDA with bf16 (Ampere+): bfloat16;
    - older CUDA: float16 for training (the Trainer's loss scaling guards it) and evaluation, float32 for
      pruning calibration (activation statistics overflow float16's range);
    - CPU with avx512_bf16 / amx_bf16: bfloat16; any other CPU: float32 (bf16 would be emulated: slower);
    - anything else (mps, ...): float32.
    The reason is meant for the console and the JSON records.
    """
    if isinstance(requested, torch.dtype):
        return requested, f"{dtype_name(requested)}: requested"
    if requested is not None and requested != "auto":
        if requested not in DTYPE_NAMES:
            raise UserError(f"unknown dtype {requested!r}; choose auto or one of: float32, bfloat16, float16")
        return DTYPE_NAMES[requested], f"{dtype_name(DTYPE_NAMES[requested])}: requested (--dtype {requested})"
    kind = torch.device(device).type
    if kind == "cuda":
        index = torch.device(device).index or 0
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"bf16: native on {name}"
        if purpose == "calibration":
            return torch.float32, f"float32: {name} has no bf16 and float16 overflows activation statistics"
        scaled = " with loss scaling" if purpose == "train" else ""
        return torch.float16, f"fp16{scaled}: {name} has no bf16"
    if kind == "cpu":
        feature = cpu_bf16_support()
        capability = torch.backends.cpu.get_cpu_capability()
        if feature and capability in ("DEFAULT", "AVX", "AVX2"):
            # The CPU has it but torch dispatches older kernels (e.g. ATEN_CPU_CAPABILITY=avx2): emulated again.
            return torch.float32, f"float32: this CPU has {feature} but torch runs {capability} kernels"
        if feature:
            return torch.bfloat16, f"bf16: native {feature} on this CPU"
        return torch.float32, "float32: this CPU has no native bf16; bf16 would be emulated"
    return torch.float32, f"float32: no native bf16 detection for {kind}"
