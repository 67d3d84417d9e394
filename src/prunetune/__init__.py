"""prunetune: prune LLMs and recover them with monitored LoRA fine-tuning."""

__version__ = "0.1.0"
