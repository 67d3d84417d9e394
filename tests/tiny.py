"""Tiny real models and a real tokenizer for tests: random weights from configs, a BPE tokenizer trained on
WikiText-2 text in the test session. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
# CI lays shared/ beside the clone; PRUNETUNE_SHARED_DATA points elsewhere (e.g. on a GPU machine).
SHARED_DATA = Path(os.environ.get("PRUNETUNE_SHARED_DATA") or REPO.parent / "shared" / "data").resolve()
WIKITEXT_DIR = SHARED_DATA / "wikitext-2-raw-v1"
WIKITEXT_TRAIN_HEAD_DIR = SHARED_DATA / "wikitext-2-raw-v1-train-head"
C4_DIR = SHARED_DATA / "c4-sample"

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the WikiText-2 validation text: a real tokenizer, built in seconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = (WIKITEXT_DIR / "wiki.valid.raw").read_text()[:400_000]
    tok.train_from_iterator(text.split("\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    base = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def make_tiny_model(out_dir: Path, tokenizer_dir: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised 2-layer model of `family` with the test tokenizer into `out_dir`."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **overrides))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
