"""Recovery fine-tuning (`prunetune finetune`) and the sparsity-keeping merge (`prunetune merge`).

Public API: `FinetuneConfig` (prunetune.finetune.config) and `run_finetune(cfg)` (prunetune.finetune.engine);
`MergeConfig` and `run_merge(cfg)` (prunetune.finetune.merge). Modules are imported lazily by their users so
`prunetune --help` stays instant.
"""
