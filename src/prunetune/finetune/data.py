"""Training and evaluation sequences for recovery: a split's text tokenised once (disk-cached by
`prunetune.data.tokenize`) and cut into `block_size` blocks, as Transformers' `run_clm` groups texts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from prunetune.data import TextSplit, tokenize, windows_of
from prunetune.errors import UserError

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation"


class BlockDataset(Dataset):
    """Causal-LM examples: labels are the inputs (the model shifts them), as in run_clm."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (B, T) int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@dataclass(frozen=True)
class SplitInfo:
    split: str
    origin: str
    tokens: int
    sequences: int
    cache_hit: bool
    cache_path: str
    note: str | None


@dataclass(frozen=True)
class FinetuneData:
    train: BlockDataset
    eval: BlockDataset
    train_info: SplitInfo
    eval_info: SplitInfo


def _split(text: TextSplit, tokenizer, block_size: int, limit: int | None):
    dataset, split = text.dataset, text.split
    tokens = tokenize(text, tokenizer)
    blocks = windows_of(tokens.input_ids, block_size, limit)  # (B, block_size), the remainder dropped
    if blocks.shape[0] == 0:
        raise UserError(
            f"dataset {dataset!r} split {split!r} has {tokens.input_ids.numel()} tokens, fewer than one block of "
            f"{block_size}; use a smaller --block-size or more data"
        )
    info = SplitInfo(
        split, text.origin, tokens.input_ids.numel(), blocks.shape[0], tokens.cache_hit, str(tokens.cache_path),
        text.note,
    )
    return BlockDataset(blocks), info


def load_finetune_data(
    train_text: TextSplit,
    eval_text: TextSplit,
    tokenizer,
    block_size: int,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> FinetuneData:
    """Grouped sequences of the two splits (from `prunetune.data.load_text`); `max_*_samples` count
    grouped sequences, taken from the start of each split."""
    train, train_info = _split(train_text, tokenizer, block_size, max_train_samples)
    evals, eval_info = _split(eval_text, tokenizer, block_size, max_eval_samples)
    return FinetuneData(train, evals, train_info, eval_info)
