"""Tensors of a model sharded with FSDP2 (`fully_shard`): each weight is a DTensor of which a rank holds one shard.
What prunetune needs of them, in one place: a weight's local shard, a keep-mask cut exactly as that weight is cut,
a count summed over the ranks, and the full state gathered for saving. On an unsharded model every function is the
identity (or a plain sum), so callers need no second code path."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `tensor`: its local shard (a view: writing it writes the parameter), or itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` (same shape as `like`'s global shape), cut exactly as the DTensor `like` is cut
    (same mesh and placements, padding included), on `like`'s device; `full` itself when `like` is not sharded.
    Every rank cuts its own piece from its own copy: no communication."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    piece = distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                              src_data_rank=None)
    return piece.to_local().to(like.to_local().device)


def sum_over_ranks(value: int, like: torch.Tensor) -> int:
    """`value` summed over the ranks that share the DTensor `like` (every rank gets the total); `value` when
    `like` is not sharded."""
    if not is_sharded(like):
        return value
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64, device=like.to_local().device)
    dist.all_reduce(total, group=like.device_mesh.get_group())
    return int(total.item())


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state with every sharded tensor gathered whole, on the CPU of rank 0 (other ranks get an empty
    dict). Every rank must call it: the gathers are collective. `trainable_only`: the trained tensors (an adapter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes of the trained state this process holds: its trainable parameters (master weights; their gradients
    take as many again) and its optimizer state, each counted as its local shard when sharded."""
    params = sum(local(p).numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = 0
    for per_param in (optimizer.state.values() if optimizer is not None else ()):
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # not the scalar step counts
                state += local(value).numel() * value.element_size()
    return {"param_bytes": params, "optimizer_state_bytes": state}
