"""The export formats by name. A new format is one module in `prunetune.export` plus one line here; the
command's `--format` choices, the config check and the dispatch all read this table. Modules are imported only
when their format is used (a format may need a package the others do not)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunetune.registry import Registry

if TYPE_CHECKING:
    from prunetune.export.base import ExportFormat

FORMATS: Registry[ExportFormat] = Registry("--format", {
    "compressed-tensors": "prunetune.export.compressed_tensors:FORMAT",
    "hf": "prunetune.export.hf:FORMAT",
    "gguf": "prunetune.export.gguf:FORMAT",
})

names = FORMATS.names
register = FORMATS.register
unregister = FORMATS.unregister
get = FORMATS.get
