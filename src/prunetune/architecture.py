"""Model walking: find the decoder layers and their linear modules from the module tree, never from names
of model families. Everything that prunes, measures or adapts a model goes through here."""

from __future__ import annotations

from torch import nn

from prunetune.errors import UserError

# Families exercised by the tests (tiny configs of each). Others with the same structure work too.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "smollm (llama)")


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    # LoRA's own A/B matrices are nn.Linear too; they are adapters, not part of the base weights.
    return {
        name.removesuffix(".base_layer"): m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name
    }


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of repeated blocks holding most of the parameters: `(dotted path, ModuleList)`.

    A decoder stack is a ModuleList of two or more blocks of one class, each owning several nn.Linear.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if len(_linears(module[0])) < 2:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, name, module)
    if best is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(
            f"unsupported architecture {model_type!r}: found no stack of decoder layers built from "
            f"torch.nn.Linear projections; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return best[1], best[2]


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's linear modules by name relative to the layer, e.g. `self_attn.q_proj`."""
    return _linears(layer)


def module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`: the key of per-type sparsity maps and tables."""
    return name.removesuffix(".base_layer").rsplit(".", 1)[-1]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear module inside the decoder layers, by full dotted name.

    Embeddings and `lm_head` sit outside the decoder stack, so they are never included.
    """
    prefix, layers = find_decoder_layers(model)
    return {
        f"{prefix}.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in linear_modules(layer).items()
    }
