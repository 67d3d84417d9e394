"""What a complete `checkpoint-N` holds, in either of its layouts: the trainer state, plus

- whole files: the method's trained weights (`model.safetensors`, `adapter_model.safetensors`) and `optimizer.pt`;
- or, under FSDP with `fsdp_state_dict_type: SHARDED_STATE_DICT`, accelerate's two distributed-checkpoint
  directories (`pytorch_model_fsdp_0/`, `optimizer_0/`): every rank wrote its shards there, and each directory's
  `.metadata` names every piece, its file and byte range. Nothing is gathered on one process, so a 70B model's
  AdamW state never has to fit one machine's memory.

`PrunetuneTrainer` writes both complete-or-absent; the resume check and the save records ask here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
FSDP_MODEL = "pytorch_model_fsdp_0"
FSDP_OPTIMIZER = "optimizer_0"
DCP_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether `path` is a checkpoint in FSDP's sharded layout."""
    return (Path(path) / FSDP_MODEL).is_dir()


def missing_files(path: Path, weights: tuple[str, ...]) -> list[str]:
    """The parts of checkpoint `path` that are not there (by name; `weights`: the trained-weight files any method
    writes). Cheap: existence only (see `sharded_problem` for the thorough check of a sharded one)."""
    path = Path(path)
    missing = [] if (path / TRAINER_STATE).is_file() else [TRAINER_STATE]
    if is_sharded(path):
        return missing + [f"{d}/{DCP_METADATA}" for d in (FSDP_MODEL, FSDP_OPTIMIZER)
                          if not (path / d / DCP_METADATA).is_file()]
    if not (path / OPTIMIZER).is_file():
        missing.append(OPTIMIZER)
    if not any((path / name).is_file() for name in weights):
        missing.append(" or ".join(weights))
    return missing


def sharded_problem(path: Path) -> str | None:
    """Why the sharded checkpoint `path` cannot be resumed (a directory, its metadata or a piece missing or cut
    short), or None when every piece its metadata names is there whole."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in (FSDP_MODEL, FSDP_OPTIMIZER):
        directory = Path(path) / name
        if not (directory / DCP_METADATA).is_file():
            return f"no {name}/{DCP_METADATA} (the save was interrupted)"
        try:
            metadata = FileSystemReader(str(directory)).read_metadata()
        except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
            return f"{name}/{DCP_METADATA} is unreadable ({type(err).__name__})"
        for info in (metadata.storage_data or {}).values():
            piece = directory / info.relative_path
            if not piece.is_file() or piece.stat().st_size < info.offset + info.length:
                return f"{name}/{info.relative_path} is missing or truncated"
    return None
