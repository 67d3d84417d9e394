"""The recovery methods by name. A new method is one module in `prunetune.recovery` plus one line here; the
`--method` choices, `auto`'s candidates and every lookup (`get`) read this table. Modules are imported only when
their method is asked for, so reading the names (a config check, `--help`) costs no torch import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from prunetune.errors import UserError

if TYPE_CHECKING:
    from prunetune.recovery.base import RecoveryMethod

METHODS: dict[str, str] = {
    "lora": "prunetune.recovery.lora:METHOD",
    "masked-lora": "prunetune.recovery.masked_lora:METHOD",
    "sparse-ft": "prunetune.recovery.sparse_ft:METHOD",
}
"""name -> "module:attribute" of its `RecoveryMethod`."""

PLAIN_PEFT = "lora"
"""The method of a PEFT adapter that carries no prunetune record (trained elsewhere): plain LoRA."""

AUTO = "auto"
"""`--method auto`: the method is chosen from the pruned model (`prunetune.recovery.auto`)."""

_extra: dict[str, RecoveryMethod] = {}


def names() -> tuple[str, ...]:
    return (*METHODS, *_extra)


def register(method: RecoveryMethod) -> None:
    """Add a method at run time (tests, plugins); the table above is the product's own list."""
    _extra[method.name] = method


def unregister(name: str) -> None:
    _extra.pop(name, None)


def check(name: str, auto: bool = True) -> str:
    """`name` when it names a method (or `auto`, where allowed), else a one-line UserError with the choices."""
    choices = (AUTO, *names()) if auto else names()
    if name not in choices:
        raise UserError(f"unknown --method {name!r}; choose one of: {', '.join(choices)}")
    return name


def get(name: str) -> RecoveryMethod:
    if name in _extra:
        return _extra[name]
    check(name, auto=False)
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def for_adapter(meta: dict) -> RecoveryMethod:
    """The method that trained an adapter, from prunetune's record of it (`rundir.read_adapter_meta`)."""
    return get(str(meta.get("method") or PLAIN_PEFT))


def result_dirs() -> tuple[str, ...]:
    """Where any method puts a run's result (a run directory holds at most one of them)."""
    return tuple(dict.fromkeys(get(n).result_dir for n in names()))


def checkpoint_weights() -> tuple[str, ...]:
    """The weight file names any method's checkpoint holds."""
    return tuple(dict.fromkeys(w for n in names() for w in get(n).checkpoint_weights))
