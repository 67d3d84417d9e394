"""The pipeline YAML: one file describes the model, the data and every stage of a prune -> finetune -> eval ->
report job.

Each stage section holds options of that stage's own config dataclass (`PruneConfig`, `FinetuneConfig`,
`EvalConfig`, `ReportConfig`), under the same names the stage's command documents; the pipeline fills in what
joins the stages (model, data, input and output directories), so those keys are not allowed in a section.
Unknown keys and badly typed values are refused with the key, the valid keys and the fix, before anything runs.
Relative paths (model, data_dir, out) are relative to the current directory, like any path typed on a command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunetune.errors import UserError

STAGES: tuple[str, ...] = ("prune", "finetune", "eval", "report")
"""Stage names, in the order they run."""

TOP_KEYS: tuple[str, ...] = ("name", "model", "out", "data", *STAGES)


@dataclass(frozen=True)
class StageSchema:
    """Where a stage's config dataclass lives and which of its fields the pipeline sets itself."""

    module: str
    cls: str
    owned: tuple[str, ...]
    """Fields the pipeline fills (paths that join the stages, the model, the data); not settable in YAML."""

    def dataclass(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


# The owned fields are the ones that connect stages; everything else is the stage's own business.
SCHEMAS: dict[str, StageSchema] = {
    "prune": StageSchema("prunetune.pruning.config", "PruneConfig", ("model", "out", "data_dir", "overwrite")),
    "finetune": StageSchema(
        "prunetune.finetune.config", "FinetuneConfig",
        ("pruned", "out", "data_dir", "resume_from_checkpoint", "overwrite"),
    ),
    "eval": StageSchema("prunetune.evaluate_command", "EvalConfig", ("model", "adapter", "out", "data_dir", "quiet")),
    "report": StageSchema("prunetune.analysis.report", "ReportConfig", ("source", "out", "dense_ppl", "pruned_ppl")),
}


@dataclass
class DataConfig:
    """Which corpus the stages read, unless a stage section names its own."""

    dataset: str = "wikitext2"
    """Corpus for calibration, training and evaluation: wikitext2 | c4 | wikipedia-vital | a local file."""
    data_dir: str | None = None
    """Directory with local copies (e.g. the one holding wikitext-2-raw-v1/); default $PRUNETUNE_DATA_DIR."""
    fallback: str | None = None
    """Corpus used instead when `dataset` cannot be loaded (the offline demo: wikipedia-vital); None = fail."""

    def __post_init__(self) -> None:
        for key in ("dataset", "fallback", "data_dir"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"data.{key}: expected a non-empty string, got {value!r}")


@dataclass
class PipelineConfig:
    """A whole job: model, data, and the options of each stage (validated against the stage's dataclass)."""

    model: str
    """Dense model to prune: alias (smollm2-135m), hub id, local directory or .gguf file."""
    data: DataConfig = field(default_factory=DataConfig)
    prune: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune prune` (PruneConfig fields), e.g. method, pattern, sparsity, nsamples, seqlen."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune finetune` (FinetuneConfig fields), e.g. lora_r, learning_rate, max_steps."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune evaluate` (EvalConfig fields), e.g. seqlen, max_windows, split."""
    report: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune report` (ReportConfig fields), e.g. bands."""
    name: str | None = None
    """A label for the run (shown in the console and pipeline.json)."""
    out: str | None = None
    """Run directory; `--out` overrides it; default runs/<name or YAML file stem>."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError(f"model: expected a model (alias, hub id, directory or .gguf), got {self.model!r}")
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data", owned=())
        for stage in STAGES:
            section = getattr(self, stage)
            if section is None:
                setattr(self, stage, {})
            elif not isinstance(section, dict):
                raise UserError(f"{stage}: expected a mapping of {stage} options, got {type(section).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what `pipeline.yaml` in the run directory holds)."""
        out: dict[str, Any] = {"name": self.name, "model": self.model, "out": self.out}
        out["data"] = dataclasses.asdict(self.data)
        for stage in STAGES:
            out[stage] = dict(getattr(self, stage))
        return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def valid_keys(stage: str) -> list[str]:
    schema = SCHEMAS[stage]
    return [f.name for f in dataclasses.fields(schema.dataclass()) if f.init and f.name not in schema.owned]


def check_keys(section: dict[str, Any], where: str, valid: list[str], owned: tuple[str, ...]) -> None:
    for key in section:
        if key in owned:
            raise UserError(
                f"{where}.{key} is set by the pipeline itself (it joins the stages); remove it from the YAML"
            )
        if key not in valid:
            raise UserError(
                f"unknown key {where}.{key}{_suggest(str(key), valid)}; valid keys in {where}: {', '.join(valid)}"
            )


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether a YAML value fits a field's type hint; returns the value converted where lossless (int -> float)."""
    if hint is Any or hint is object:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = _type_ok(value, arm)
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
            ok, item = _type_ok(item, inner)
            if not ok:
                return False, value
            converted.append(item)
        return True, tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    # Paths and other classes: accept what the dataclass's own validation accepts.
    return True, value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    text = str(hint).replace("typing.", "")
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def coerce_section(cls: type, section: dict[str, Any], where: str, owned: tuple[str, ...]) -> dict[str, Any]:
    """A YAML section checked against `cls`'s fields and type hints, values converted where lossless."""
    valid = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in owned]
    check_keys(section, where, valid, owned)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in section.items():
        ok, converted = _type_ok(value, hints.get(key, Any))
        if not ok:
            raise UserError(f"{where}.{key}: expected {_describe(hints[key])}, got {value!r}")
        kwargs[key] = converted
    return kwargs


def _build(cls: type, section: dict[str, Any], where: str, owned: tuple[str, ...], **fixed: Any) -> Any:
    """Instantiate `cls` from a YAML section plus pipeline-set fields; errors name the key and the fix."""
    kwargs = coerce_section(cls, section, where, owned)
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: {err}") from None


def build_stage_config(stage: str, section: dict[str, Any], **fixed: Any) -> Any:
    """The stage's own config dataclass from its YAML section and the fields the pipeline sets."""
    schema = SCHEMAS[stage]
    return _build(schema.dataclass(), section, stage, schema.owned, **fixed)


def validate_sections(cfg: PipelineConfig) -> None:
    """Key names of every stage section (values are checked when the stage configs are built)."""
    for stage in STAGES:
        schema = SCHEMAS[stage]
        check_keys(getattr(cfg, stage), stage, valid_keys(stage), schema.owned)


# Stand-ins for the fields the pipeline sets, so every stage's own validation runs when the YAML is loaded,
# before anything is computed (the real values are set when the stages are built).
_PLACEHOLDERS: dict[str, dict[str, Any]] = {
    "prune": {"out": "<run>/prune"},
    "finetune": {"pruned": "<run>/prune", "out": "<run>/finetune"},
    "eval": {"out": "<run>/eval/dense.json"},
    "report": {"source": "<run>/finetune", "out": "<run>/report"},
}


def validate_values(cfg: PipelineConfig) -> None:
    """Build every stage's config once: its own `__post_init__` checks the values (ranges, choices)."""
    for stage in STAGES:
        schema = SCHEMAS[stage]
        section = coerce_section(schema.dataclass(), getattr(cfg, stage), stage, schema.owned)
        setattr(cfg, stage, section)
        fixed = dict(_PLACEHOLDERS[stage])
        if stage in ("prune", "eval"):
            fixed["model"] = cfg.model
        build_stage_config(stage, section, **fixed)


def parse_pipeline(raw: Any, source: str = "pipeline.yaml") -> PipelineConfig:
    """A PipelineConfig from the parsed YAML document; every mistake is a one-line UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    check_keys(raw, source, list(TOP_KEYS), ())
    if "model" not in raw:
        raise UserError(f"{source}: missing required key 'model' (an alias such as smollm2-135m, hub id or directory)")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise UserError(f"data: expected a mapping (dataset, data_dir, fallback), got {data!r}")
    for key in ("name", "out"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{key}: expected a string, got {raw[key]!r}")
    cfg = PipelineConfig(
        model=raw["model"],
        data=_build(DataConfig, data, "data", owned=()),
        prune=raw.get("prune") or {},
        finetune=raw.get("finetune") or {},
        eval=raw.get("eval") or {},
        report=raw.get("report") or {},
        name=raw.get("name"),
        out=raw.get("out"),
    )
    validate_sections(cfg)
    validate_values(cfg)
    return cfg


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    path = Path(path)
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise UserError(f"pipeline file {str(path)!r} not found ({hint}); give a YAML file, e.g. configs/demo-cpu.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; give a YAML pipeline file") from None
    if raw is None:
        raise UserError(f"{path} is empty; start from configs/demo-cpu.yaml")
    return parse_pipeline(raw, source=path.name)
