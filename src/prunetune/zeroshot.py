"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness used as a library: the loaded model (adapter
applied) is wrapped in lm-eval's `HFLM`, so numbers come from the same code as the pruning papers' tables
(`acc` and `acc_norm` per task, 0-shot).

Tasks are lm-eval task names (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, ...),
whose data come from the Hugging Face hub (cached after the first run), or task YAML files of your own, e.g.
over a local `.jsonl` (`dataset_path: json`, `dataset_kwargs: {data_files: {test: FILE}}`), which work offline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from prunetune.configfile import yaml_problem
from prunetune.errors import UserError
from prunetune.oserrors import check_links
from prunetune.rundir import read_bytes

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The seven zero-shot tasks of the Wanda and SparseGPT tables."""
METRICS = ("acc", "acc_norm")
_INSTALL = "pip install 'lm-eval>=0.4.13,<0.5' (the `zeroshot` extra; `make setup` installs it)"
_Log = Callable[[str], None]


def parse_tasks(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`boolq,rte` or a list -> ('boolq', 'rte'); `paper` expands to the seven tasks of the pruning papers."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else [v for part in value for v in str(part).split(",")]
    tasks: list[str] = []
    for item in (i.strip() for i in items):
        if item == "paper":
            tasks.extend(PAPER_TASKS)
        elif item:
            tasks.append(item)
    return tuple(dict.fromkeys(tasks))


@dataclass
class ZeroShotConfig:
    """What `evaluate --tasks` runs."""

    tasks: tuple[str, ...]
    """lm-eval task names or task YAML files (comma separated); `paper` = the seven tasks of Wanda/SparseGPT."""
    limit: int | None = None
    """Evaluate only the first N examples of each task (quick checks; not comparable with published numbers)."""
    task_dir: str | None = None
    """A directory of your own task YAMLs, so their names can be given in `tasks`."""
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.tasks = parse_tasks(self.tasks)
        if not self.tasks:
            raise UserError("--tasks is empty; give lm-eval task names or YAML files, e.g. --tasks boolq,rte")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit} must be at least 1 (omit it for whole tasks)")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1")
        if self.task_dir is not None:
            check_links(self.task_dir, "--task-dir")
        if self.task_dir is not None and not Path(self.task_dir).expanduser().is_dir():
            raise UserError(f"--task-dir {self.task_dir!r} is not a directory; give the folder holding your task YAMLs")
        for task in self.tasks:
            if task.endswith((".yaml", ".yml")) and not Path(task).expanduser().is_file():
                raise UserError(f"task file {task!r} does not exist; check the path")
        check_local_tasks(self.tasks, self.task_dir)  # before a model is loaded: what a YAML says is known now


# ---- local task YAMLs, checked before anything loads ------------------------------------------------------


class _TaskLoader(yaml.SafeLoader):
    """YAML as lm-eval writes its tasks: `!function module.name` tags are kept as text (lm-eval resolves them)."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")
_MAX_INCLUDES = 8


def _parse_task_yaml(path: Path, depth: int = 0) -> dict[str, Any]:
    """A task YAML as a mapping, its `include:` merged under it (as lm-eval does); a UserError naming the file,
    the line and the problem for anything lm-eval would not read."""
    try:
        text = read_bytes(path, "task file").decode("utf-8")
        doc = yaml.load(text, Loader=_TaskLoader)
    except UnicodeDecodeError as err:
        raise UserError(f"task file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"task file {str(path)!r} is not valid YAML{yaml_problem(err)}; fix its syntax") from None
    if not isinstance(doc, dict):
        raise UserError(f"task file {str(path)!r} holds a {type(doc).__name__}, not an lm-eval task (a mapping with "
                        "`task:`, `dataset_path:`, `doc_to_text:` ...); see lm-eval's task guide")
    include = doc.get("include")
    if isinstance(include, str) and depth < _MAX_INCLUDES:
        base = path.parent / include
        if not base.is_file():
            raise UserError(f"task file {str(path)!r} includes {include!r}, which does not exist next to it; fix "
                            "its `include:`")
        doc = {**_parse_task_yaml(base, depth + 1), **doc}
    return doc


def _data_files(doc: dict[str, Any]) -> list[str]:
    """The local files a task reads (`dataset_kwargs.data_files`: a path, a list, or a mapping split -> either)."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files") if isinstance(doc.get("dataset_kwargs"), dict) else None
    if isinstance(files, dict):
        files = list(files.values())
    items = files if isinstance(files, list) else [files]
    flat = [f for item in items for f in (item if isinstance(item, list) else [item])]
    return [str(f) for f in flat if isinstance(f, (str, Path))]


def _check_task_doc(path: Path, doc: dict[str, Any]) -> None:
    if not any(key in doc for key in ("task", "group", "tag")):
        raise UserError(f"task file {str(path)!r} names no task (no `task:` key; it has {', '.join(map(str, doc))}); "
                        "add `task: NAME`")
    for name in _data_files(doc):
        candidates = [Path(name).expanduser(), path.parent / name]
        if any(c.exists() or (("*" in name or "?" in name) and list(c.parent.glob(c.name))) for c in candidates):
            continue
        raise UserError(f"task {doc.get('task') or path.stem!r} ({path}) reads its data from {name!r}, which does "
                        "not exist; fix `data_files` in the YAML (a local task needs no hub)")


def _task_dir_docs(task_dir: str | None) -> tuple[dict[str, tuple[Path, dict[str, Any]]], list[str]]:
    """Task name -> (file, mapping) for every YAML under `task_dir`, and the problems of those that do not read."""
    docs: dict[str, tuple[Path, dict[str, Any]]] = {}
    broken: list[str] = []
    if not task_dir:
        return docs, broken
    for path in sorted(Path(task_dir).expanduser().rglob("*.y*ml")):
        try:
            doc = _parse_task_yaml(path)
        except UserError as err:
            broken.append(str(err))
            continue
        if isinstance(doc.get("task"), str):
            docs[doc["task"]] = (path, doc)
    return docs, broken


def check_local_tasks(tasks: tuple[str, ...], task_dir: str | None) -> None:
    """Refuse, before any model is loaded, a task YAML that lm-eval would fail on late or report as something
    else: not valid YAML (with its line), not a task, a local data file that is missing."""
    for task in tasks:
        if _is_file(task):
            path = Path(task).expanduser()
            _check_task_doc(path, _parse_task_yaml(path))
    named = [t for t in tasks if not _is_file(t)]
    if not named or not task_dir:
        return
    docs, _ = _task_dir_docs(task_dir)
    for name in named:
        if name in docs:
            _check_task_doc(*docs[name])


def _is_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"`--tasks` needs lm-eval: {_INSTALL}") from None
    return lm_eval


@cache
def _manager(include: str | None, defaults: bool) -> Any:
    """lm-eval's task index (kept: indexing its ~15k built-in task files takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[include] if include else None, include_defaults=defaults)


def _task_manager(cfg: ZeroShotConfig) -> Any:
    include = str(Path(cfg.task_dir).expanduser().resolve()) if cfg.task_dir else None
    local = _manager(include, False)
    if all(_is_file(t) or t in local.all_tasks for t in cfg.tasks):
        return local  # the built-in index only when a task needs it
    return _manager(include, True)


def _task_error(err: BaseException, tasks: tuple[str, ...], local: bool) -> UserError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, KeyError) or "not a registered task" in text:
        return UserError(f"{text.strip(chr(34))}; give an lm-eval task name (e.g. boolq), a task YAML file, or "
                         "--task-dir with your YAMLs")
    if local:  # every task is a YAML of the user's: the hub has nothing to do with it
        return UserError(f"cannot load --tasks {','.join(tasks)} ({text[:200]}); check the task YAML")
    return UserError(
        f"cannot load the data of --tasks {','.join(tasks)} ({text[:160]}): hub tasks need the Hugging Face hub "
        "(unreachable or offline here); run once with network access to cache them, or use a local task YAML over "
        "a .jsonl (dataset_path: json)"
    )


def run_zeroshot(model: nn.Module, tokenizer: Any, cfg: ZeroShotConfig, log: _Log = print) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `cfg.tasks`: `{"tasks": {name: {"acc", "acc_stderr", "acc_norm",
    "acc_norm_stderr", "samples"}}, "mean_acc", "limit", "lm_eval", "seconds"}` (metrics a task lacks are None)."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    manager = _task_manager(cfg)
    unknown = [t for t in cfg.tasks if not _is_file(t) and t not in manager.all_tasks]
    if unknown:
        _, broken = _task_dir_docs(cfg.task_dir)
        if broken:  # lm-eval skips a YAML it cannot read: the task it defines is "unknown" to it. Say which.
            raise UserError(f"task {', '.join(map(repr, unknown))} is not an lm-eval task and no readable YAML in "
                            f"--task-dir {cfg.task_dir} defines it; one there does not read: {broken[0]}")
        raise UserError(f"unknown task {', '.join(map(repr, unknown))}: not an lm-eval task, group or tag; give a name "
                        "from `lm_eval ls tasks`, a task YAML file, or --task-dir with your YAMLs")
    log(f"Zero-shot: {', '.join(cfg.tasks)}" + (f" (first {cfg.limit} examples each)" if cfg.limit else ""))
    lm_logger = logging.getLogger("lm_eval")
    previous = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # its INFO/WARNING lines (one per task and setting) would drown the console
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        out = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                              num_fewshot=0, log_samples=False, bootstrap_iters=1000)
    except (KeyError, ConnectionError, FileNotFoundError, ValueError, yaml.YAMLError) as err:
        local = all(_is_file(t) or t in _task_dir_docs(cfg.task_dir)[0] for t in cfg.tasks)
        raise _task_error(err, cfg.tasks, local) from None
    finally:
        lm_logger.setLevel(previous)
    samples = out.get("n-samples", {})
    tasks: dict[str, dict[str, Any]] = {}
    for name, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for metric in METRICS:
            row[metric] = _number(metrics.get(f"{metric},none"))
            row[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
        row["samples"] = samples.get(name, {}).get("effective")
        tasks[name] = row
    accs = [r["acc"] for r in tasks.values() if r["acc"] is not None]
    return {
        "tasks": tasks,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "limit": cfg.limit,
        "num_fewshot": 0,
        "lm_eval": metadata.version("lm_eval"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def format_table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (task, acc, acc_norm, samples) with ± stderr where known: what the console shows."""

    def cell(row: dict[str, Any], metric: str) -> str:
        value, err = row.get(metric), row.get(f"{metric}_stderr")
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    rows = [(name, cell(r, "acc"), cell(r, "acc_norm"), str(r.get("samples") or "-"))
            for name, r in result["tasks"].items()]
    if result.get("mean_acc") is not None and len(result["tasks"]) > 1:
        rows.append(("mean", f"{result['mean_acc']:.4f}", "", ""))
    return rows
