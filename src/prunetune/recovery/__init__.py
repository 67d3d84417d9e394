"""Recovery methods: how a pruned model is trained back to quality, each in one module of its own.

- `base`         the `RecoveryMethod` protocol every method implements, `Prepared`, `Evaluation`;
- `registry`     method name -> its module: a new method is one file here plus one registry line; `--method`'s
                 choices, `auto`'s candidates and every caller's lookup read this table;
- `auto`         which method `--method auto` picks for a pruned model, and why;
- `lora`, `masked_lora`, `sparse_ft`: the methods;
- `adapter`      what the two LoRA methods share (PEFT wrapping, the adapter directory, its merge);
- `lora_layers`  the masked LoRA forward (a PEFT LoRA variant holding each module's keep-mask);
- `merge`        the one masked merge: `W + keep * (s * B @ A)`, computed and checked in float32.

Callers (the fine-tuning engine, `evaluate`, `merge`, the pipeline, the console) ask the method object what to
do; none of them branches on a method's name.
"""
