"""The package's import graph: imports point down, never up or in a cycle, lazy (in-function) imports included.

Layers, bottom to top (a module may import its own package's modules and anything in a lower layer):
0 foundation (errors, oserrors, phases, fmt, home, devices, runinfo, architecture, budget, configfile, hub,
sharded); 1 sparsity (patterns, mask encoding, measurement); 2 the on-disk contract (rundir), safetensors files
tensor by tensor (shards) and the export reader; 3 models, data; 4 the perplexity measurement; 5 the engines
(pruning, recovery methods, analysis, zero-shot); 6 the commands' libraries (evaluate, speed, export, merge);
7 fine-tuning; 8 the pipeline; 9 commands and the CLI.
A new module must be placed in a layer here, so where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("prunetune", "prunetune.errors", "prunetune.oserrors", "prunetune.phases", "prunetune.fmt", "prunetune.home",
     "prunetune.devices", "prunetune.runinfo", "prunetune.registry", "prunetune.sharded",
     "prunetune.architecture", "prunetune.budget", "prunetune.configfile", "prunetune.hub"),
    ("prunetune.sparsity",),
    ("prunetune.rundir", "prunetune.shards"),
    ("prunetune.exported",),
    ("prunetune.models", "prunetune.data"),
    ("prunetune.perplexity",),
    ("prunetune.pruning", "prunetune.recovery", "prunetune.analysis", "prunetune.zeroshot"),
    ("prunetune.evaluate", "prunetune.speed", "prunetune.export", "prunetune.merge"),
    ("prunetune.finetune",),
    ("prunetune.pipeline",),
    ("prunetune.commands", "prunetune.cli"),
    ("prunetune.__main__",),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "prunetune").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the prunetune modules it imports anywhere in its body (top level, functions, TYPE_CHECKING)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("prunetune"):
                targets = [resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("prunetune")]
            graph[module] |= {t for t in targets if t and t != module}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (index, name)
    assert best is not None, f"{module} is in no layer of tests/test_layering.py: place it"
    return best


def test_every_import_points_down_or_within_its_package():
    upward = []
    for module, targets in import_graph().items():
        here, package = layer_of(module)
        for target in targets:
            there, other = layer_of(target)
            if there > here or (there == here and other != package and here != 0):
                upward.append(f"{module} (layer {here}) -> {target} (layer {there})")
    assert upward == []


def test_no_import_cycles():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(modules()):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_lazy_imports(tmp_path):
    """A function-level import counts: the graph must hold evaluate's lazy import of zeroshot."""
    assert "prunetune.zeroshot" in import_graph()["prunetune.evaluate"]


# The record keys named `lora` (the banner event every method emits, merge.json's LoRA settings) are names of
# records, not of methods; everything else that names a method asks `prunetune.recovery.registry`.
RECORD_KEYS = {("finetune/console.py", "lora"), ("finetune/engine.py", "lora"), ("merge.py", "lora")}


def test_method_names_are_spelled_only_in_recovery():
    from prunetune.recovery import registry

    names = set(registry.names())
    found = set()
    for path in (SRC / "prunetune").rglob("*.py"):
        rel = path.relative_to(SRC / "prunetune").as_posix()
        if rel.startswith("recovery/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.add((rel, node.value))
    assert found <= RECORD_KEYS, sorted(found - RECORD_KEYS)
