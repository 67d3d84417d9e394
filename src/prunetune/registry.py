"""A table of named kinds (recovery methods, export formats, ...): the product's own entries as "module:attribute"
strings, imported only when asked for (reading the names costs no heavy import), plus entries registered at run
time (tests, plugins). Every lookup of a kind by name goes through one of these."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from prunetune.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, flag: str, table: Mapping[str, str]) -> None:
        self.flag = flag
        """The option that names an entry, for errors (`--method`)."""
        self.table = dict(table)
        """name -> "module:attribute" of the product's own entries."""
        self._extra: dict[str, T] = {}

    def names(self) -> tuple[str, ...]:
        return (*self.table, *self._extra)

    def register(self, entry: Any) -> None:
        """Add an entry (its `name` attribute names it) at run time; the table is the product's own list."""
        self._extra[entry.name] = entry

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)

    def check(self, name: str, extra: tuple[str, ...] = ()) -> str:
        """`name` when it names an entry (or one of `extra`, e.g. `auto`), else a one-line UserError."""
        choices = (*extra, *self.names())
        if name not in choices:
            raise UserError(f"unknown {self.flag} {name!r}; choose one of: {', '.join(choices)}")
        return name

    def get(self, name: str) -> T:
        if name in self._extra:
            return self._extra[name]
        self.check(name)
        module, attr = self.table[name].split(":")
        return getattr(importlib.import_module(module), attr)
