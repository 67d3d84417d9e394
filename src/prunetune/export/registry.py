"""The export formats by name. A new format is one module in `prunetune.export` plus one line here; the
command's `--format` choices, the config check and the dispatch all read this table. Modules are imported only
when their format is used (a format may need a package the others do not)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from prunetune.errors import UserError

if TYPE_CHECKING:
    from prunetune.export.base import ExportFormat

FORMATS: dict[str, str] = {
    "compressed-tensors": "prunetune.export.compressed_tensors:FORMAT",
    "hf": "prunetune.export.hf:FORMAT",
    "gguf": "prunetune.export.gguf:FORMAT",
}
"""name -> "module:attribute" of its `ExportFormat`."""

_extra: dict[str, ExportFormat] = {}


def names() -> tuple[str, ...]:
    return (*FORMATS, *_extra)


def register(fmt: ExportFormat) -> None:
    """Add a format at run time (tests, plugins); the table above is the product's own list."""
    _extra[fmt.name] = fmt


def get(name: str) -> ExportFormat:
    if name in _extra:
        return _extra[name]
    if name not in FORMATS:
        raise UserError(f"--format {name!r} is not supported; choose one of: {', '.join(names())}")
    module, attr = FORMATS[name].split(":")
    return getattr(importlib.import_module(module), attr)
