"""`prunetune run` (a YAML pipeline: prune -> finetune -> eval -> report, restartable) and `prunetune demo`."""
