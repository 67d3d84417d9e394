"""Property-based inputs (Hypothesis) for the settings loader (`prunetune.configfile`), the pipeline YAML and the
commands' `--config` files, and for the run records' reader: whatever the text, document or mutation of a real
config, nothing but a `UserError` (one line) ever comes out, and what does load is a valid config."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunetune import configfile
from prunetune.commands import flags
from prunetune.errors import UserError
from prunetune.pipeline.config import SCHEMAS, TOP_KEYS, load_pipeline
from prunetune.rundir.records import JsonlWriter, iter_jsonl

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)

# Keys that reach real fields (every stage config's fields, their aliases, the pipeline's own), so generated
# documents test values in real places, not only unknown keys.
FIELD_KEYS = sorted({f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema.dataclass())}
                    | {alias for table in configfile.ALIASES.values() for alias in table}
                    | set(TOP_KEYS) | {"enabled", "dataset", "data_dir", "fallback"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["auto", "2:4", "block16x16", "wanda", "lora", "1e-4", "q_proj,v_proj", "-1", "", "..", "/",
                     "~", "none", "paper", "./x.yaml", "down_proj=0.3", "nan"]),
)
keys = st.one_of(st.sampled_from(FIELD_KEYS), st.text(max_size=20), st.integers(), st.booleans())
documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6), max_leaves=25)
pipelines = st.fixed_dictionaries(
    {"model": st.one_of(st.just("smollm2-135m"), scalars)},
    optional={key: documents for key in TOP_KEYS if key != "model"},
)


def _write(text: str | bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="prunetune-property-"))
    path = folder / "settings.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


def _dump(doc: Any, form: str) -> str:
    if form == "json":
        return json.dumps(doc, default=str)
    return yaml.safe_dump(doc, allow_unicode=True)


def _only_user_errors(call) -> Any:
    try:
        return call()
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return err


# ---- the loader ------------------------------------------------------------------------------------------


@PROPERTY
@given(st.one_of(st.text(max_size=400), st.binary(max_size=400)))
def test_any_file_is_a_mapping_or_a_user_error(content):
    result = _only_user_errors(lambda: configfile.read_mapping(_write(content)))
    assert isinstance(result, (dict, UserError))


@PROPERTY
@given(documents, st.sampled_from(["yaml", "json"]))
def test_any_document_as_a_pipeline_is_a_config_or_a_user_error(doc, form):
    _only_user_errors(lambda: load_pipeline(_write(_dump(doc, form))))


@PROPERTY
@given(pipelines, st.sampled_from(["yaml", "json"]))
def test_any_pipeline_shaped_document_is_a_config_or_a_user_error(doc, form):
    _only_user_errors(lambda: load_pipeline(_write(_dump(doc, form))))


REAL = sorted((REPO / "configs").glob("*.yaml"))


def _mutate(doc: Any, path: list[Any], value: Any, delete: bool) -> Any:
    """`doc` with the node at `path` (followed as far as it goes) replaced by `value`, or deleted."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)] if isinstance(path[0], int) else path[0]
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if isinstance(copy, dict) and key not in copy:
        copy[key] = value
        return copy
    if len(path) == 1 and delete:
        del copy[key]
        return copy
    copy[key] = _mutate(copy[key], path[1:], value, delete)
    return copy


@PROPERTY
@given(st.sampled_from(REAL), st.lists(st.one_of(st.integers(0, 50), st.sampled_from(FIELD_KEYS)), min_size=1,
                                       max_size=3), documents, st.booleans(), st.sampled_from(["yaml", "json"]))
def test_mutated_real_configs_are_configs_or_user_errors(real, path, value, delete, form):
    doc = yaml.safe_load(real.read_text())
    _only_user_errors(lambda: load_pipeline(_write(_dump(_mutate(doc, path, value, delete), form))))


# ---- a command's --config file -------------------------------------------------------------------------------

CONFIG_COMMANDS = {"prune": ("prunetune.commands.prune", "prunetune.pruning.config", "PruneConfig"),
                   "finetune": ("prunetune.commands.finetune", "prunetune.finetune.config", "FinetuneConfig"),
                   "merge": ("prunetune.commands.merge", "prunetune.merge", "MergeConfig"),
                   "evaluate": ("prunetune.commands.evaluate", "prunetune.evaluate", "EvalConfig")}


def _config_from_file(command: str, path: Path, *argv: str) -> Any:
    """The command's config from `--config PATH` (and `argv`), as the command builds it (nothing runs)."""
    module, config_module, name = CONFIG_COMMANDS[command]
    parser = argparse.ArgumentParser()
    importlib.import_module(module).configure_parser(parser)
    args = parser.parse_args(["--config", str(path), *argv])
    cls = getattr(importlib.import_module(config_module), name)
    return flags.config_from_args(cls, args, command=command)


@PROPERTY
@given(st.sampled_from(sorted(CONFIG_COMMANDS)), st.one_of(documents, st.dictionaries(keys, documents, max_size=8)),
       st.sampled_from(["yaml", "json"]))
def test_any_config_file_of_a_command_is_a_config_or_a_user_error(command, doc, form):
    _only_user_errors(lambda: _config_from_file(command, _write(_dump(doc, form))))


@pytest.mark.parametrize("config", REAL, ids=lambda p: p.name)
@pytest.mark.parametrize("command", sorted(CONFIG_COMMANDS))
def test_a_real_pipeline_file_is_a_valid_config_file_of_each_command(command, config):
    """The property tests must not pass by refusing everything: every shipped pipeline file is a valid --config
    of each command (its section, `enabled:` and all), the joining fields given as flags."""
    required = {"prune": ["--model", "m", "--out", "o"], "finetune": ["--pruned", "p", "--out", "o"],
                "merge": ["--adapter", "a", "--out", "o"], "evaluate": ["--model", "m"]}[command]
    assert dataclasses.is_dataclass(_config_from_file(command, config, *required))


# ---- the run records' reader ---------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=600))
def test_any_metrics_file_reads_as_records_or_a_user_error(content):
    path = _write(content)
    records = _only_user_errors(lambda: list(iter_jsonl(path)))
    assert isinstance(records, (list, UserError))
    if isinstance(records, list):
        assert all(isinstance(r, dict) for r in records)


@PROPERTY
@given(st.lists(st.dictionaries(st.text(max_size=5), scalars, max_size=3), max_size=5), st.binary(max_size=80))
def test_records_appended_after_a_cut_line_are_never_lost(records, torn):
    """A line a full disk or a kill cut short is dropped before the next session appends: every record it
    writes reads back, none glued to the broken line."""
    path = _write(b"".join(json.dumps({"event": "old"}).encode() + b"\n" for _ in range(2)) + torn.replace(b"\n", b""))
    writer = JsonlWriter(path)
    for record in records:
        writer.write({"event": "new", **{k: v for k, v in record.items() if k != "event"}})
    writer.close()
    read = [r for r in iter_jsonl(path) if r.get("event") == "new"]
    assert len(read) == len(records)
