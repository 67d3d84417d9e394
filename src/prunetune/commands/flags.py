"""Command-line flags generated from a typed config dataclass: each option is declared once, as a field with
a default and a docstring, and becomes a flag with that help text.

Per field: `--block-size` and `--block_size` (both spellings), the aliases users bring from other tools
(`--learning_rate`, hidden; see `prunetune.configfile.ALIASES`), a type from the annotation (`int` also takes
`500.0` as Transformers does, `tuple[str, ...]` takes `a,b` or `a b`, `list[str]` repeats), and for booleans
`--x` / `--x true|false` / `--no-x`. Every flag defaults to None, so a flag that was not typed never
overrides a `--config` file. `Flag` adjusts one field where the generated form does not fit (a positional,
an inverted switch such as `--one-shot`, choices, a hidden option).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prunetune import configfile
from prunetune.errors import UserError

TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line, where the generated form does not fit."""

    names: tuple[str, ...] = ()
    """Replace the generated spellings (`("--one-shot",)`); a name without dashes makes a positional."""
    invert: bool = False
    """A bool field set to False by the flag (`--one-shot` sets `sequential=False`)."""
    help: str | None = None
    """Help text instead of the field's docstring."""
    hidden: bool = False
    """Accepted but not shown in --help."""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None
    """With nargs="?": the value when the flag is given without one (`--resume_from_checkpoint` -> auto)."""


# ---- reading the dataclass ------------------------------------------------------------------------------


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it (PEP 257 attribute docstrings), base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        lists = [a for a in arms if typing.get_origin(a) is list or a is list]
        return lists[0] if lists else arms[0] if len(arms) == 1 else arms[0]
    return hint


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    """An integer; `500.0` too (Transformers' flags accept it), but not a fraction."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None or value == () or value == {} or value == []:
        return ""
    if isinstance(value, bool):
        return f" (default: on; --no-{f.name.replace('_', '-')} turns it off)" if value else ""
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return f" (default: {value})"


def _spellings(name: str) -> list[str]:
    return sorted({f"--{name.replace('_', '-')}", f"--{name}"}, key=lambda s: "_" in s)


# ---- building the parser ----------------------------------------------------------------------------------


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    flags: Mapping[str, Flag] | None = None,
    skip: Iterable[str] = (),
    groups: Mapping[str, Iterable[str]] | None = None,
    greedy: bool = True,
) -> None:
    """One flag per init field of `cls` (minus `skip`), help from the field docstrings.

    `groups`: help-section title -> field names shown under it. `greedy`: flags may take an optional value
    (`--bf16 false`) or several values (`--report_to a b`); turn off for commands with positionals, where
    `--once RUN_DIR` must not read RUN_DIR as the flag's value."""
    flags = dict(flags or {})
    skip = set(skip)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    aliases: dict[str, list[str]] = {}
    for alias, target in configfile.aliases_for(cls).items():
        aliases.setdefault(target, []).append(alias)
    sections: dict[str, Any] = {}
    for title, names in (groups or {}).items():
        group = parser.add_argument_group(title)
        for name in names:
            sections[name] = group
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        target = sections.get(f.name, parser)
        spec = flags.get(f.name, Flag())
        _add_field(target, f, hints[f.name], docs.get(f.name, ""), spec, greedy)
        for alias in aliases.get(f.name, ()):
            kwargs = _value_kwargs(hints[f.name], spec, greedy)
            target.add_argument(*_spellings(alias), dest=f.name, default=None, help=argparse.SUPPRESS, **kwargs)


def _value_kwargs(hint: Any, spec: Flag, greedy: bool) -> dict[str, Any]:
    """type / nargs / action of a flag that takes a value of `hint`."""
    hint = _strip_optional(hint)
    origin = typing.get_origin(hint)
    kwargs: dict[str, Any] = {}
    if hint is bool:
        kwargs = ({"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"} if greedy
                  else {"action": "store_const", "const": True})
    elif hint is int:
        kwargs = {"type": parse_int}
    elif hint is float:
        kwargs = {"type": float}
    elif origin is list or hint is list:
        kwargs = {"action": "append"}
    elif origin is tuple or hint is tuple:
        kwargs = {"nargs": "+"} if greedy else {}
        kwargs["type"] = str
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    if spec.nargs is not None:
        kwargs["nargs"] = spec.nargs
        kwargs.pop("action", None)
        if spec.const is not None:
            kwargs["const"] = spec.const
    return kwargs


def _add_field(target: Any, f: dataclasses.Field, hint: Any, doc: str, spec: Flag, greedy: bool) -> None:
    text = (spec.help if spec.help is not None else doc).replace("%", "%%")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    if spec.names and not spec.names[0].startswith("-"):
        kwargs = _value_kwargs(hint, spec, greedy)
        kwargs.pop("action", None)
        target.add_argument(spec.names[0], help=text or None, **kwargs)
        return
    if spec.invert:
        target.add_argument(*spec.names, dest=f.name, action="store_const", const=False, default=None,
                            help=argparse.SUPPRESS if spec.hidden else text or None)
        return
    names = list(spec.names) or _spellings(f.name)
    help_text = argparse.SUPPRESS if spec.hidden else (text + (" (required)" if required else _default_text(f))) or None
    kwargs = _value_kwargs(hint, spec, greedy)
    if "metavar" not in kwargs and _strip_optional(hint) is int:
        kwargs["metavar"] = "N"
    # The first spelling is shown; the others (`--block_size`) are accepted quietly.
    target.add_argument(names[0], dest=f.name, default=None, help=help_text, **kwargs)
    if len(names) > 1:
        target.add_argument(*names[1:], dest=f.name, default=None, help=argparse.SUPPRESS, **kwargs)
    if _strip_optional(hint) is bool:
        negatives = sorted({f"--no-{n[2:]}" for n in names} | {f"--no-{n[2:].replace('_', '-')}" for n in names})
        target.add_argument(*negatives, dest=f.name, action="store_const", const=False, default=None,
                            help=argparse.SUPPRESS)


def add_config_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="settings file (YAML or JSON, same keys as the flags); flags given here override it")


# ---- from parsed flags to the config ------------------------------------------------------------------


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user typed (unset flags are None), tuple flags split at commas."""
    names = set(configfile.field_names(cls))
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key not in names or value is None:
            continue
        hint = _strip_optional(hints[key])
        if (typing.get_origin(hint) is tuple or hint is tuple) and isinstance(value, (str, list)):
            parts = [value] if isinstance(value, str) else value
            inner = (typing.get_args(hint) or (str,))[0]
            if inner is not Path:  # `a,b c` -> (a, b, c); paths keep their commas
                parts = [p for part in parts for p in part.split(",")]
            value = tuple(p.strip() for p in parts if p.strip())
            if inner in (int, float):
                try:
                    value = tuple(parse_int(p) if inner is int else float(p) for p in value)
                except (ValueError, argparse.ArgumentTypeError):
                    raise UserError(f"--{key.replace('_', '-')} {','.join(value)}: expected numbers, e.g. 1,8") from None
        if hint is Path and isinstance(value, str):
            value = Path(value)
        out[key] = value
    return out


def config_from_args(
    cls: type,
    args: argparse.Namespace,
    *,
    command: str,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """`cls` built once from: its defaults < `--config FILE` (when the parser has one) < the typed flags
    < `extra` (values the command computed from its own flags). A missing required field names its flag."""
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file:
        section = {"evaluate": "eval"}.get(command, command)  # a pipeline file's section for this command
        data = configfile.settings_of(configfile.read_mapping(config_file), section)
        values.update(configfile.read_layer(cls, data, f"--config {config_file}"))
    values.update(configfile.convert_values(cls, given(args, cls), "command line"))
    values.update(extra or {})
    for f in dataclasses.fields(cls):
        required = f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and values.get(f.name) in (None, ""):
            where = " (on the command line or in --config)" if hasattr(args, "config") else ""
            raise UserError(f"--{f.name.replace('_', '-')} is required{where}")
    return configfile.build_config(cls, values)
