"""The on-disk contract of prunetune, one module per concern; this package re-exports their public names so
callers write `rundir.X`:

- `names`     the file and directory names prunetune writes;
- `reading`   reading a run's files: OS errors and damaged files become one-line user errors;
- `pruned`    what a pruned-model directory says about itself (`prune.json`);
- `records`   the metrics.jsonl record: its writer (flushed per line) and reader;
- `results`   where a fine-tuning run's result is, as its records say (`recovery_result`);
- `masks_io`  keep-masks on disk (`prunetune/masks.safetensors`); the encoding is `prunetune.sparsity.masks`;
- `adapters`  adapter directories: prunetune's record (pruned base, base digest) and completeness checks;
- `staging`   the staged-output guard (nothing half-written, nothing of the user's lost) and `publish_dir`,
              the one way a directory is published (staged, then swapped in whole);
- `lock`      one writer per directory.

Directory kinds and what they hold:
- pruned model (`prune`): a Transformers model dir + `prune.json` + `prunetune/masks.safetensors` (the layout rule:
  `names.META_DIR`).
- finetune run: `metrics.jsonl`, `train.log`, `run_config.json`, `checkpoint-*/`, and its result: `adapter/`
  (PEFT files + `prunetune_adapter.json`, which records the pruned base and a digest of it) or `model/` (a
  pruned-model directory), as the recovery method says.
- merged model (`merge`): a Transformers model dir + `merge.json` (+ `prune.json` and `prunetune/masks.safetensors`
  when sparse).
- pipeline run: `pipeline.json` + one sub-directory per stage.
Every directory prunetune writes holds `.prunetune-files.json` (the marker): the list of files it wrote there,
the only ones a later `--overwrite` may replace. Ownership is what the marker says and nothing else: a
non-empty directory without one is the user's, whatever its files are called.
"""

from prunetune.rundir.adapters import (
    adapter_base,
    base_digest,
    check_adapter_base,
    check_adapter_dir,
    read_adapter_meta,
    write_adapter_meta,
)
from prunetune.rundir.lock import pid_alive, run_lock
from prunetune.rundir.masks_io import (
    copy_masks,
    load_keep_masks,
    load_masks,
    masks_file,
    masks_target,
    read_mask_meta,
    save_encoded_masks,
    save_masks,
)
from prunetune.rundir.names import (
    ADAPTER_CONFIG,
    ADAPTER_DIR,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    EXPORT_JSON,
    LOCK_FILE,
    MARKER,
    MASKS_FILE,
    MERGE_JSON,
    META_DIR,
    METRICS,
    PERMUTATION_FILE,
    PIPELINE_JSON,
    PRUNE_JSON,
    RUN_CONFIG,
    SPARSE_MODEL_DIR,
    STAGING_PREFIX,
    TRAIN_LOG,
)
from prunetune.rundir.pruned import PrunedInfo, prune_config, read_pruned
from prunetune.rundir.reading import (
    check_readable_dir,
    check_readable_files,
    check_safetensors,
    read_bytes,
    read_json,
    reading,
)
from prunetune.rundir.results import RecoveryResult, recovery_result
from prunetune.rundir.staging import (
    check_apart,
    check_complete,
    check_output,
    check_space,
    check_writable,
    check_writable_file,
    claim,
    incomplete,
    is_ours,
    mark_ours,
    owned_files,
    publish_dir,
    remove_ours,
    staged_output,
    weights_bytes,
)
from prunetune.sparsity.masks import mask_digest

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_DIR", "ADAPTER_META", "ADAPTER_WEIGHTS", "EXPORT_JSON", "LOCK_FILE", "MARKER", "MASKS_FILE",
    "MERGE_JSON", "META_DIR", "METRICS", "PERMUTATION_FILE", "PIPELINE_JSON", "PRUNE_JSON", "RUN_CONFIG", "SPARSE_MODEL_DIR",
    "STAGING_PREFIX", "TRAIN_LOG", "PrunedInfo", "RecoveryResult", "adapter_base", "base_digest", "check_adapter_base",
    "check_adapter_dir", "check_apart", "check_complete", "check_output", "check_readable_dir", "check_readable_files", "check_safetensors", "check_space", "check_writable",
    "check_writable_file", "claim", "incomplete", "owned_files", "remove_ours",
    "copy_masks", "is_ours", "load_keep_masks", "load_masks", "mark_ours", "mask_digest", "masks_file", "masks_target",
    "pid_alive", "prune_config", "publish_dir", "read_adapter_meta", "read_bytes", "read_json", "read_mask_meta",
    "read_pruned", "reading", "recovery_result", "run_lock", "save_encoded_masks", "save_masks",
    "staged_output", "weights_bytes", "write_adapter_meta",
]
