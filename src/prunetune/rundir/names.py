"""The names of the files and directories prunetune writes: one definition each."""

from __future__ import annotations

PRUNE_JSON = "prune.json"
MASKS_FILE = "masks.safetensors"
META_DIR = "prunetune"
"""The one rule of a model directory's layout: its top level holds what model loaders read (config, weights,
tokenizer) and prunetune's own tensors live in this sub-directory (`prunetune/masks.safetensors`). vLLM loads
every `*.safetensors` at the top level as weights and stops at a masks file there (issue 21); Transformers,
vLLM and llama.cpp's converter never look into sub-directories. prunetune's JSON records (`prune.json`,
`merge.json`, the marker) stay at the top: no weight loader reads an unknown `.json`, and users look there.
Directories written before this rule, with `masks.safetensors` beside the weights, are still read."""
PERMUTATION_FILE = "permutation.safetensors"
"""`prune --permute`'s channel permutation, in META_DIR beside the masks (int64 indices per channel space)."""
MERGE_JSON = "merge.json"
EXPORT_JSON = "export.json"
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
