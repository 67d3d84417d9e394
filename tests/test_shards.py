"""Safetensors files tensor by tensor (`prunetune.shards`): a file laid out in advance and filled in any order is
byte for byte the file safetensors writes for the same tensors; reading by offset gives the tensors back; a damaged
file or a tensor never written is an error, never zeros."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from prunetune.shards import DTYPE_CODES, ShardReader, ShardWriter, TensorSpec, read_header


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    """Mixed dtypes, shapes (scalars, empty tensors) and names that sort differently as text and as layer numbers."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtypes = sorted(DTYPE_CODES, key=str)
    out = {}
    for i in range(60):
        dtype = rng.choice(dtypes)
        shape = tuple(rng.randint(0, 6) for _ in range(rng.randint(0, 3)))
        values = torch.randn(shape, generator=gen) * 8
        out[f"model.layers.{rng.randint(0, 12)}.m{i}.weight"] = values.to(dtype)
    return out


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _write(directory, name: str, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    writer = ShardWriter(directory, {name: [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]},
                         {"format": "pt"})
    for n in order:
        writer.write(n, tensors[n])
    writer.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_laid_out_file_is_safetensors_own_bytes_in_any_write_order(tmp_path, seed):
    tensors = _tensors(seed)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    order = list(tensors)
    random.Random(seed).shuffle(order)
    _write(tmp_path, "ours.safetensors", tensors, order)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_reader_gives_every_tensor_back_and_casts_on_request(tmp_path):
    tensors = _tensors(3)
    save_file(dict(list(tensors.items())[:30]), str(tmp_path / "a.safetensors"))
    save_file(dict(list(tensors.items())[30:]), str(tmp_path / "b.safetensors"))
    reader = ShardReader([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert reader.names() == set(tensors)
    for name, tensor in tensors.items():
        back = reader.read(name)
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert _raw(back) == _raw(tensor)  # bytes, so NaN and -0.0 count as themselves
    bf16 = next(n for n, t in tensors.items() if t.dtype == torch.bfloat16 and t.numel())
    assert torch.equal(reader.read(bf16, torch.float32), tensors[bf16].float())


def test_a_tensor_never_written_fails_the_close(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}
    writer = ShardWriter(tmp_path, {"w.safetensors": [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]})
    writer.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="laid out as"):
        ShardWriter(tmp_path, {"x.safetensors": [TensorSpec("a", torch.float32, (3,))]}).write("a", torch.ones(4))


def test_truncated_file_is_refused_before_any_tensor_is_read(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not JSON"):
        ShardReader([tmp_path / "garbage.safetensors"])
