"""The recovery methods by name. A new method is one module in `prunetune.recovery` plus one line here; the
`--method` choices, `auto`'s candidates and every lookup (`get`) read this table. Modules are imported only when
their method is asked for, so reading the names (a config check, `--help`) costs no torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunetune.registry import Registry

if TYPE_CHECKING:
    from prunetune.recovery.base import RecoveryMethod

METHODS: Registry[RecoveryMethod] = Registry("--method", {
    "lora": "prunetune.recovery.lora:METHOD",
    "masked-lora": "prunetune.recovery.masked_lora:METHOD",
    "sparse-ft": "prunetune.recovery.sparse_ft:METHOD",
})

PLAIN_PEFT = "lora"
"""The method of a PEFT adapter that carries no prunetune record (trained elsewhere): plain LoRA."""

AUTO = "auto"
"""`--method auto`: the method is chosen from the pruned model (`prunetune.recovery.auto`)."""

names = METHODS.names
register = METHODS.register
unregister = METHODS.unregister
get = METHODS.get


def check(name: str, auto: bool = True) -> str:
    """`name` when it names a method (or `auto`, where allowed), else a one-line UserError with the choices."""
    return METHODS.check(name, (AUTO,) if auto else ())


def for_adapter(meta: dict) -> RecoveryMethod:
    """The method that trained an adapter, from prunetune's record of it (`rundir.read_adapter_meta`)."""
    return get(str(meta.get("method") or PLAIN_PEFT))


def result_dirs() -> tuple[str, ...]:
    """Where any method puts a run's result (a run directory holds at most one of them)."""
    return tuple(dict.fromkeys(get(n).result_dir for n in names()))


def checkpoint_weights() -> tuple[str, ...]:
    """The weight file names any method's checkpoint holds."""
    return tuple(dict.fromkeys(w for n in names() for w in get(n).checkpoint_weights))
