"""Settings files and typed configs: the one YAML/JSON loader, the one set of key aliases, and the one
conversion of user values (a file, a pipeline section, command-line flags) into a config dataclass.

Every `--config FILE` and every pipeline YAML goes through `read_mapping` (bounded: no alias bomb, no binary
file, no directory), and every config is built by `build_config` (keys spelled either way, aliases, types
checked and converted where lossless, the dataclass's own `__post_init__` validation), so `learning_rate`
means the same thing in `finetune --config` and in a pipeline's `finetune:` section.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from prunetune.errors import UserError

MAX_FILE_BYTES = 1 << 20
"""A settings file is a page of YAML; anything over 1 MiB is not one."""
PIPELINE_SWITCH = "enabled"
"""The key of a pipeline section that turns the stage on or off (not a setting of the stage's command)."""
MAX_NODES = 20_000
"""Values a settings file may expand to once its aliases are followed (a real config has a few hundred);
bounds a YAML alias bomb before any value is built."""

# Names users bring from other tools (Transformers' TrainingArguments, run_clm, PEFT), per config class.
# Both the flags (`--learning_rate`) and the files (`learning_rate: 1e-4`) read this one table.
ALIASES: dict[str, dict[str, str]] = {
    "FinetuneConfig": {
        "learning_rate": "lr",
        "num_train_epochs": "epochs",
        "evaluation_strategy": "eval_strategy",
        "warmup_ratio": "warmup_steps",
        "model": "pruned",
        "pruned_model": "pruned",
        "output_dir": "out",
        "dataset_name": "dataset",
        "overwrite_output_dir": "overwrite",
        "lora_target_modules": "lora_targets",
        "target_modules": "lora_targets",
    },
}


def aliases_for(cls: type) -> dict[str, str]:
    """Other spellings of `cls`'s fields: alias -> field name."""
    return ALIASES.get(cls.__name__, {})


def short_key(key: Any) -> str:
    """A key as typed, cut to 40 characters (a key can be a huge alias value too)."""
    text = str(key)
    return text if len(text) <= 40 else text[:37] + "..."


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: an error message never carries a huge value."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- reading a file -------------------------------------------------------------------------------------


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Count the values `node` expands to with every alias followed (shared nodes counted once per use,
    memoised so the count itself is linear); refuse cycles and anything over MAX_NODES."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UserError(f"{source}: a YAML alias refers to itself; write the value out instead")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        sizes[key] = total
        if total > MAX_NODES:
            raise UserError(
                f"{source}: its YAML aliases expand to more than {MAX_NODES:,} values (an alias bomb?); "
                "write the settings out without nested aliases"
            )
        return total

    size(node)


def yaml_problem(err: yaml.YAMLError) -> str:
    """` at line L, column C: what is wrong` for a YAML error (where the parser says it stopped)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f" at character {err.position + 1}: character {chr(err.character)!r} is not allowed in YAML text"
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(err, 'problem', None) or str(err).splitlines()[0]}"


def parse_text(text: str, source: str) -> Any:
    """A YAML (or JSON, a subset of YAML) document, its alias expansion bounded before values are built."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the whole text: a control character fails here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise UserError(f"{source}: invalid YAML{yaml_problem(err)}; fix the syntax") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be a settings file") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: str | Path, what: str = "--config") -> str:
    """A settings file's text; a missing path, a directory, an unreadable, huge or binary file is a UserError."""
    file = Path(path).expanduser()
    label = f"{what} {str(path)!r}"
    if file.is_dir():
        raise UserError(f"{label} is a directory, expected a file (YAML or JSON settings)")
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{label} is {size:,} bytes; a settings file is a small YAML or JSON file")
        data = file.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{label} not found (no such file); give a YAML or JSON settings file") from None
    except PermissionError:
        raise UserError(f"{label}: permission denied; make it readable or copy it") from None
    except OSError as err:
        raise UserError(f"{label} cannot be read ({err.strerror or err}); give a YAML or JSON settings file") from None
    if b"\x00" in data:
        raise UserError(f"{label} is a binary file, not YAML or JSON text; give a settings file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{label} is not UTF-8 text (byte {err.start}); give a YAML or JSON settings file saved as UTF-8"
        ) from None


def read_mapping(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """The top-level mapping of a YAML/JSON settings file (an empty file is an empty mapping)."""
    data = parse_text(read_text(path, what), f"{what} {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of settings (key: value lines), got a {type(data).__name__}")
    return data


def settings_of(data: dict[str, Any], section: str) -> dict[str, Any]:
    """The settings in a file read for one command: the file itself, its `section:` (a pipeline file given to
    one command), or the `config` of a prunetune `run_config.json` (a finished run as a template)."""
    if isinstance(data.get("config"), dict) and "provenance" in data:
        return data["config"]
    if isinstance(data.get(section), dict):
        # `enabled:` turns a pipeline's stage on or off; it is no setting of the command itself.
        return {k: v for k, v in data[section].items() if k != PIPELINE_SWITCH}
    return data


# ---- keys, types, building --------------------------------------------------------------------------------


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def normalize_key(cls: type, key: Any) -> str:
    """`--block-size`, `block-size`, `block_size`, an alias -> the field name (unknown keys pass through)."""
    name = str(key).strip().lstrip("-").replace("-", "_")
    return aliases_for(cls).get(name, name)


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def normalize_keys(
    cls: type, mapping: Mapping[Any, Any], where: str, owned: Iterable[str] = (), section: str | None = None
) -> dict[str, Any]:
    """Keys -> field names; unknown keys and keys the caller sets itself (`owned`) are refused by name.
    `section`: a pipeline section name, for messages that point into the YAML (`finetune.lora_rank`)."""
    owned = tuple(owned)
    valid = [name for name in field_names(cls) if name not in owned]
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = normalize_key(cls, key)
        if name in owned:
            at = f"{section}.{key}" if section else f"{where}: {key!r}"
            raise UserError(f"{at} is set by the pipeline itself (it joins the stages); remove it from the YAML")
        if name not in valid:
            hint = _suggest(name, valid)
            if section:
                raise UserError(f"unknown key {section}.{short_key(key)}{hint}; valid keys in {section}: {', '.join(valid)}")
            raise UserError(f"{where}: unknown setting {short(key, 40)}{hint}; valid settings: {', '.join(valid)}")
        out[name] = value
    return out


def describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    text = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a user value fits a field's type hint, and the value converted where lossless: `1e-4` read
    as text -> float, 3 -> 3.0, `q_proj,v_proj` -> a tuple of strings, a list -> tuple."""
    if hint is Any or hint is object:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = convert(value, arm)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(hint), value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string, a classic trap for learning rates.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        args = typing.get_args(hint)
        homogeneous = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
        inner = args[0] if args and homogeneous else Any
        if isinstance(value, str) and inner is str:
            value = [part.strip() for part in value.split(",") if part.strip()]  # "q_proj,v_proj" as on the CLI
        if not isinstance(value, (list, tuple)):
            return False, value
        converted = []
        for item in value:
            ok, item = convert(item, inner)
            if not ok:
                return False, value
            converted.append(item)
        return True, tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        return isinstance(value, (dict, str)), value  # text such as `down_proj=0.3,o_proj=0.4`: the config parses it
    if hint is Path:
        return isinstance(value, (str, Path)), Path(value) if isinstance(value, str) else value
    # Other classes (nested configs): accept what the dataclass's own validation accepts.
    return True, value


def convert_values(
    cls: type, values: Mapping[str, Any], where: str, section: str | None = None
) -> dict[str, Any]:
    """Each value checked against its field's type and converted; the first misfit is a one-line UserError
    (`finetune.lora_r: expected int, got 'eight'` in a pipeline section, `--config run.yaml: lora_r: ...`)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        ok, converted = convert(value, hints.get(key, Any))
        if not ok:
            at = f"{section}.{key}" if section else f"{where}: {key}"
            raise UserError(f"{at}: expected {describe(hints[key])}, got {short(value)}")
        out[key] = converted
    return out


def read_layer(
    cls: type, mapping: Mapping[Any, Any], where: str, owned: Iterable[str] = (), section: str | None = None
) -> dict[str, Any]:
    """One source of settings (a file, a pipeline section) as checked field values: names normalised,
    unknown and owned keys refused, values converted."""
    return convert_values(cls, normalize_keys(cls, mapping, where, owned, section), where, section)


def build_config(cls: type, values: Mapping[str, Any], where: str | None = None) -> Any:
    """`cls(**values)`, its own validation (`__post_init__`) included; a failure is a one-line UserError,
    prefixed with `where` (the pipeline section) when given."""
    prefix = f"{where}: " if where else ""
    try:
        return cls(**values)
    except UserError as err:
        if not prefix:
            raise
        raise UserError(f"{prefix}{err}") from None
    except (ValueError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{prefix or 'bad setting: '}{text[:300]}") from None
