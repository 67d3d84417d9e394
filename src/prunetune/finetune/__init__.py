"""Recovery fine-tuning (`prunetune finetune`): one training path on the Transformers Trainer, extended by
callbacks, whatever the recovery method (`prunetune.recovery` owns what differs between methods).

Public API: `FinetuneConfig` (prunetune.finetune.config) and `run_finetune(cfg)` (prunetune.finetune.engine).
Modules are imported lazily by their users so `prunetune --help` stays instant.
"""
