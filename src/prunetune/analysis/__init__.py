"""Training analysis: diagnosis rules (shared with the live alerts of `finetune`), log parsing, the
`report`, `monitor` and `compare` commands."""
