"""The pipeline YAML: one file describes the model, the data and every stage of a prune -> finetune -> merge ->
eval -> report (-> export) job.

Each stage section holds options of that stage's own config dataclass (`PruneConfig`, `FinetuneConfig`,
`MergeConfig`, `EvalConfig`, `ReportConfig`, `ExportConfig`), under the names (and aliases) the stage's command
accepts; the pipeline fills in what joins the stages (model, data, input and output directories), so those keys
are not allowed in a section. The optional stages take `enabled: true|false` (merge is on, export off by
default). Keys, types and values go through `prunetune.configfile`, the same loader as every `--config`; each
stage's config is built there once, before anything runs, and the run directory's paths are set on it when the
run starts. Relative paths (model, data_dir, out) are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunetune import configfile
from prunetune.errors import UserError

STAGES: tuple[str, ...] = ("prune", "finetune", "merge", "eval", "report", "export")
"""Stage names, in the order they run."""

OPTIONAL_STAGES: dict[str, bool] = {"merge": True, "export": False}
"""Stages a YAML can turn off or on with `enabled:`, and their default."""

TOP_KEYS: tuple[str, ...] = ("name", "model", "out", "data", *STAGES)

PLACEHOLDER_ROOT = Path("<run>")
"""The run directory while the YAML is validated (the real one is known when the run starts)."""


@dataclass(frozen=True)
class StageSchema:
    """Where a stage's config dataclass lives and which of its fields the pipeline sets itself."""

    module: str
    cls: str
    owned: tuple[str, ...]
    """Fields the pipeline fills (paths that join the stages, the model, the data); not settable in YAML."""

    def dataclass(self) -> type:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as err:
            raise UserError(f"this stage needs {self.module}, which is not installed ({err.name} missing)") from None
        return getattr(module, self.cls)


# The owned fields are the ones that connect stages; everything else is the stage's own business.
SCHEMAS: dict[str, StageSchema] = {
    "prune": StageSchema("prunetune.pruning.config", "PruneConfig", ("model", "out", "data_dir", "overwrite")),
    "finetune": StageSchema(
        "prunetune.finetune.config", "FinetuneConfig",
        ("pruned", "out", "data_dir", "resume_from_checkpoint", "overwrite"),
    ),
    "merge": StageSchema(
        "prunetune.merge", "MergeConfig", ("adapter", "out", "model", "data_dir", "overwrite"),
    ),
    "eval": StageSchema("prunetune.evaluate", "EvalConfig", ("model", "adapter", "out", "data_dir", "quiet")),
    "report": StageSchema("prunetune.analysis.report", "ReportConfig", ("source", "out", "dense_ppl", "pruned_ppl")),
    "export": StageSchema("prunetune.export.run", "ExportConfig", ("model_dir", "out", "overwrite")),
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
                raise UserError(f"data.{key}: expected a non-empty string, got {configfile.short(value)}")


def joined_fields(stage: str, root: Path, model: str, dataset: str, data_dir: str | None) -> dict[str, Any]:
    """The values of a stage's owned fields (and its data default) for a run in `root`: how stages connect.

    `dataset` is only a default: a stage section that names its own corpus keeps it."""
    r = Path(root)
    dirs = [data_dir] if data_dir else None
    return {
        "prune": dict(model=model, out=str(r / "prune"), data_dir=data_dir, overwrite=True, calib_dataset=dataset),
        "finetune": dict(pruned=str(r / "prune"), out=str(r / "finetune"), data_dir=data_dir, dataset=dataset),
        "merge": dict(adapter=str(r / "finetune" / "adapter"), model=str(r / "prune"), out=str(r / "merge"),
                      data_dir=dirs, overwrite=True, dataset=dataset),
        "eval": dict(model=model, adapter=None, out=str(r / "eval" / "dense.json"), data_dir=dirs, quiet=False,
                     dataset=dataset),
        "report": dict(source=str(r / "finetune"), out=str(r / "report"), dense_ppl=None, pruned_ppl=None),
        "export": dict(model_dir=str(r / "merge"), out=str(r / "export"), overwrite=True),
    }[stage]


DATA_DEFAULTS = ("calib_dataset", "dataset")
"""Fields `joined_fields` fills only when the section does not set them."""


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
    merge: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune merge` (MergeConfig fields); `enabled: false` keeps the adapter unmerged."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune evaluate` (EvalConfig fields), e.g. seqlen, max_windows, split."""
    report: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune report` (ReportConfig fields), e.g. bands."""
    export: dict[str, Any] = field(default_factory=dict)
    """Options of `prunetune export` (ExportConfig fields); off unless `enabled: true`."""
    name: str | None = None
    """A label for the run (shown in the console and pipeline.json)."""
    out: str | None = None
    """Run directory; `--out` overrides it; default runs/<name or YAML file stem>."""
    enabled: dict[str, bool] = field(default_factory=dict)
    """Optional stage -> on/off (from each section's `enabled:`; OPTIONAL_STAGES gives the defaults)."""
    configs: dict[str, Any] = field(default_factory=dict)
    """Stage -> its config, built once by `parse_pipeline` (run-directory fields still placeholders)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError(f"model: expected a model (alias, hub id, directory or .gguf), got {configfile.short(self.model)}")
        for stage in STAGES:
            section = getattr(self, stage)
            if section is None:
                setattr(self, stage, {})
            elif not isinstance(section, dict):
                raise UserError(f"{stage}: expected a mapping of {stage} options, got {type(section).__name__}")
        self.enabled = {**OPTIONAL_STAGES, **self.enabled}

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this job runs, in order."""
        return tuple(s for s in STAGES if self.enabled.get(s, True))

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what `pipeline.yaml` in the run directory holds)."""
        out: dict[str, Any] = {"name": self.name, "model": self.model, "out": self.out}
        out["data"] = dataclasses.asdict(self.data)
        for stage in STAGES:
            section = dict(getattr(self, stage))
            if stage in OPTIONAL_STAGES:
                section = {"enabled": self.enabled[stage], **section}
            out[stage] = section
        return out


def _check_top_keys(raw: dict[str, Any], source: str) -> None:
    for key in raw:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown key {source}.{configfile.short_key(key)}{hint}; valid keys in {source}: "
                            f"{', '.join(TOP_KEYS)}")


def _enabled(stage: str, section: dict[str, Any]) -> bool:
    value = section.pop("enabled", OPTIONAL_STAGES[stage])
    if not isinstance(value, bool):
        raise UserError(f"{stage}.enabled: expected true or false, got {configfile.short(value)}")
    return value


def _build_stage(cfg: PipelineConfig, stage: str) -> Any:
    """The stage's config from its (converted) section and placeholder run paths; its own validation runs."""
    cls = SCHEMAS[stage].dataclass()
    names = set(configfile.field_names(cls))
    fixed = joined_fields(stage, PLACEHOLDER_ROOT, cfg.model, cfg.data.dataset, cfg.data.data_dir)
    fixed = {k: v for k, v in fixed.items() if k in names}
    values = {k: v for k, v in fixed.items() if k in DATA_DEFAULTS}
    values.update(getattr(cfg, stage))
    values.update({k: v for k, v in fixed.items() if k not in DATA_DEFAULTS})
    return configfile.build_config(cls, values, where=stage)


def parse_pipeline(raw: Any, source: str = "pipeline.yaml") -> PipelineConfig:
    """A PipelineConfig from the parsed YAML document, every stage config built (so validated) once;
    every mistake is a one-line UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(raw).__name__}")
    _check_top_keys(raw, source)
    if "model" not in raw:
        raise UserError(f"{source}: missing required key 'model' (an alias such as smollm2-135m, hub id or directory)")
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise UserError(f"data: expected a mapping (dataset, data_dir, fallback), got {configfile.short(data)}")
    for key in ("name", "out"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{key}: expected a string, got {configfile.short(raw[key])}")
    sections: dict[str, dict[str, Any]] = {}
    enabled: dict[str, bool] = {}
    for stage in STAGES:
        section = raw.get(stage)
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise UserError(f"{stage}: expected a mapping of {stage} options, got {type(section).__name__}")
        section = dict(section)
        if stage in OPTIONAL_STAGES:
            enabled[stage] = _enabled(stage, section)
        if stage in OPTIONAL_STAGES and not enabled[stage] and not section:
            sections[stage] = {}
            continue
        schema = SCHEMAS[stage]
        sections[stage] = configfile.read_layer(schema.dataclass(), section, source, schema.owned, section=stage)
    cfg = PipelineConfig(
        model=raw["model"],
        data=configfile.build_config(DataConfig, configfile.read_layer(DataConfig, data, source, section="data")),
        name=raw.get("name"),
        out=raw.get("out"),
        enabled=enabled,
        **sections,
    )
    cfg.configs = {stage: _build_stage(cfg, stage) for stage in cfg.stages}
    return cfg


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    raw = configfile.parse_text(configfile.read_text(path, "pipeline file"), str(path))
    if raw is None:
        raise UserError(f"{path} is empty; start from configs/demo-cpu.yaml")
    return parse_pipeline(raw, source=Path(path).name)
