"""resolve_dtype: bf16 only where the hardware computes it natively; an explicit dtype always wins."""

import pytest
import torch

from prunetune import devices
from prunetune.devices import resolve_dtype
from prunetune.errors import UserError


@pytest.fixture
def cpu(monkeypatch):
    def set_flags(*flags, capability="AVX512"):
        monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"fpu", "avx2", *flags}))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    return set_flags


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_cpu_with_native_bf16_gets_bf16(cpu, flag):
    cpu(flag)
    for purpose in ("train", "eval", "calibration"):
        dtype, reason = resolve_dtype("auto", "cpu", purpose)
        assert dtype == torch.bfloat16 and flag in reason


def test_cpu_without_bf16_gets_float32_with_the_reason(cpu):
    cpu()
    dtype, reason = resolve_dtype("auto", "cpu", "train")
    assert dtype == torch.float32
    assert reason == "float32: this CPU has no native bf16; bf16 would be emulated"
    assert resolve_dtype(None, "cpu", "eval")[0] == torch.float32


def test_bf16_flag_but_torch_dispatches_avx2_kernels(cpu):
    cpu("avx512_bf16", capability="AVX2")
    dtype, reason = resolve_dtype("auto", "cpu", "eval")
    assert dtype == torch.float32 and "AVX2" in reason


def test_explicit_dtype_always_wins(cpu):
    cpu()
    assert resolve_dtype("bfloat16", "cpu", "eval")[0] == torch.bfloat16
    assert resolve_dtype("fp32", "cuda", "train")[0] == torch.float32
    assert resolve_dtype(torch.float16, "cpu", "eval")[0] == torch.float16
    with pytest.raises(UserError, match="choose auto or one of"):
        resolve_dtype("half-ish", "cpu", "eval")


@pytest.mark.parametrize("bf16, purpose, expected", [
    (True, "train", torch.bfloat16), (True, "eval", torch.bfloat16),
    (False, "train", torch.float16), (False, "eval", torch.float16), (False, "calibration", torch.float32),
])
def test_cuda(monkeypatch, bf16, purpose, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if not bf16 else "A100")
    dtype, reason = resolve_dtype("auto", "cuda", purpose)
    assert dtype == expected
    if expected == torch.float16 and purpose == "train":
        assert "loss scaling" in reason


def test_this_machine_reads_its_flags():
    flags = devices.cpu_flags()
    native = devices.cpu_bf16_support()
    assert native is None or native in flags or not flags


@pytest.mark.parametrize("method, base", [("lora", torch.bfloat16), ("masked-lora", torch.bfloat16),
                                          ("sparse-ft", torch.float32)])
def test_bf16_training_on_cpu_loads_frozen_weights_in_bf16_and_trained_ones_in_float32(method, base):
    from prunetune.finetune.config import FinetuneConfig
    from prunetune.finetune.precision import resolve_precision

    cfg = FinetuneConfig(pruned="unused", out="unused", dtype="bfloat16", method=method)
    p = resolve_precision(cfg, "cpu")
    assert p.bf16 and p.load_dtype == base  # sparse-ft trains the base: float32 master weights
    assert p.teacher_dtype == torch.bfloat16  # forward-only
    fp32 = resolve_precision(FinetuneConfig(pruned="unused", out="unused", dtype="float32", method=method), "cpu")
    assert fp32.load_dtype == fp32.teacher_dtype == torch.float32
