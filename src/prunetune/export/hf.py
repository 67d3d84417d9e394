"""`--format hf`: the servable model directory: config, safetensors weights and tokenizer, nothing of prunetune's
(no masks, no prune.json), optionally cast with `--dtype`. What vLLM (`LLM(model=DIR)`, `vllm serve DIR`),
Transformers (`from_pretrained(DIR)`), TGI/SGLang and llama.cpp's `convert_hf_to_gguf.py` take as they are.

The pruned zeros are plain zeros in dense matrices: the directory is as large as the dense model and runs at
dense speed (no serving runtime runs unstructured or 16x16-block sparsity faster today; bench/RESULTS.md).
Before it is published, Transformers loads the written directory and every tensor is compared with the source
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from prunetune.export.base import ExportSource, Log, Written, safetensors_bytes


def read_back(directory: Path, model: Any) -> int:
    """Load `directory` with Transformers and require every tensor bit-identical to `model`'s; the count."""
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    theirs = loaded.state_dict()
    ours = model.state_dict()
    if set(theirs) != set(ours):
        raise RuntimeError(f"the written directory loads other tensors ({sorted(set(theirs) ^ set(ours))[:3]}); a bug")
    for name, tensor in ours.items():
        if tensor.dtype != theirs[name].dtype or not torch.equal(tensor, theirs[name]):
            raise RuntimeError(f"the written directory changed {name} (a bug); nothing was written")
    return len(ours)


class HfDirectory:
    """A plain Transformers model directory (safetensors), the pruned weights as dense matrices with zeros."""

    name = "hf"
    runtimes = ("vLLM (CPU 0.32 measured, `LLM(model=DIR)`), Transformers (`from_pretrained(DIR)`) and every tool "
                "that reads a Transformers directory; checked 2026-12, bench/RESULTS.md section runtimes")

    def check(self, cfg: Any) -> None:
        return None

    def write(self, source: ExportSource, cfg: Any, staging: Path, log: Log) -> Written:
        log(f"Writing the model directory ({next(source.model.parameters()).dtype}), tokenizer and config")
        source.model.save_pretrained(staging, safe_serialization=True)
        source.tokenizer.save_pretrained(staging)
        checked = read_back(staging, source.model)
        before, after = safetensors_bytes(source.model_dir), safetensors_bytes(staging)
        dtype = str(next(source.model.parameters()).dtype).removeprefix("torch.")
        return Written(record={"dtype": dtype, "bytes": {"source_safetensors": before, "safetensors": after},
                               "verified_bit_exact": checked},
                       rows=[("whole model", before, after)], verified=checked,
                       notes=[f"{checked} tensors loaded back by Transformers and bit-identical"])


FORMAT = HfDirectory()
