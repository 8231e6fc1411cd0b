"""The package's import graph: layers import downward only, and no package cycle.

Every ``import`` / ``from ... import`` statement in ``scilm_hpc`` counts, those inside
functions included (a function-level import hides a cycle, it does not remove it).
The layers, lowest first, are the map in CONTRIBUTING.md ("Where code lives").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scilm_hpc"

#: (layer, module prefixes), lowest first: a module may import its own layer and below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "scilm_hpc",
            "scilm_hpc.errors",
            "scilm_hpc.schema",
            "scilm_hpc.model_source",
            "scilm_hpc.model_import",
            "scilm_hpc.gguf_model",
            "scilm_hpc.rundir",
        ),
    ),
    ("runtime", ("scilm_hpc.runtime",)),
    ("data", ("scilm_hpc.data",)),
    ("tasks", ("scilm_hpc.tasks",)),
    ("compress", ("scilm_hpc.compress",)),
    ("config", ("scilm_hpc.config", "scilm_hpc.catalog")),
    ("models", ("scilm_hpc.models",)),
    ("evaluate", ("scilm_hpc.evaluate",)),
    ("train", ("scilm_hpc.train",)),
    ("jobs", ("scilm_hpc.jobs",)),
    ("launch", ("scilm_hpc.launch",)),
    ("cli", ("scilm_hpc.cli",)),
]

#: Units that run inside a job: what they need at run time is ``runtime``, never the
#: submitting side (``launch``: executors, sbatch, mpirun, sweeps).
NEVER_IMPORT_LAUNCH = (
    "runtime",
    "data",
    "tasks",
    "compress",
    "config",
    "catalog",
    "models",
    "evaluate",
    "train",
    "jobs",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """Index of the layer whose longest prefix matches ``module``."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (
                module.startswith(prefix + ".") and prefix != "scilm_hpc"
            )
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def imports_of(path: Path) -> set[str]:
    """The scilm_hpc modules ``path`` imports, wherever the statement sits."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # `from scilm_hpc.compress import measure` imports the submodule `measure`
            submodules = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            found.update(submodules or [name])
    return {name for name in found if name == "scilm_hpc" or name.startswith("scilm_hpc.")}


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / relative).with_suffix(".py").is_file() or (root / relative).is_dir()


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    }


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if layer_of(m) < 0]
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def unit(module: str) -> str:
    """The top-level unit of a module: ``data`` for ``scilm_hpc.data.shards``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "scilm_hpc"


def launch_imports(graph: dict[str, set[str]], importer_unit: str) -> set[tuple[str, str]]:
    """``(module, target)`` where a module of ``importer_unit`` imports ``scilm_hpc.launch``."""
    return {
        (module, target)
        for module, targets in graph.items()
        if unit(module) == importer_unit
        for target in targets
        if unit(target) == "launch"
    }


def test_no_upward_import():
    upward = sorted(upward_imports(import_graph()))
    assert not upward, "upward imports (lower layer importing a higher one):\n" + "\n".join(
        f"  {a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})" for a, b in upward
    )


@pytest.mark.parametrize("importer", NEVER_IMPORT_LAUNCH)
def test_run_time_code_never_imports_launch(importer):
    found = sorted(launch_imports(import_graph(), importer))
    assert not found, (
        f"{importer} imports the submitting side (what a running job needs belongs in "
        "scilm_hpc.runtime):\n" + "\n".join(f"  {a} -> {b}" for a, b in found)
    )


def test_no_package_cycle():
    """Between top-level units (``data``, ``train``, ``models``, ...) imports form no cycle."""
    edges: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target in targets:
            if unit(module) != unit(target):
                edges.setdefault(unit(module), set()).add(unit(target))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(u for u in edges if reaches(u, u, {u}))
    assert not cycles, f"package cycles through: {cycles}"


def test_checker_sees_a_function_level_upward_import():
    """An upward import hidden inside a function is found and reported, also one of
    ``launch`` from a concept folder."""
    planted = PACKAGE / "data" / "_planted_upward_import.py"
    planted.write_text(
        "def f():\n    from scilm_hpc.train.loop import Trainer\n"
        "\n\ndef g():\n    from scilm_hpc.launch import executor\n"
    )
    try:
        graph = import_graph()
    finally:
        planted.unlink()
    name = "scilm_hpc.data._planted_upward_import"
    assert {(name, "scilm_hpc.train.loop"), (name, "scilm_hpc.launch.executor")} <= (
        upward_imports(graph)
    )
    assert launch_imports(graph, "data") == {(name, "scilm_hpc.launch.executor")}


@pytest.mark.parametrize("name", ["classification", "token_classification", "causal_lm", "seq2seq"])
def test_schema_task_names_are_the_registry(name):
    from scilm_hpc import schema
    from scilm_hpc.tasks import TASKS

    assert tuple(TASKS) == schema.TASKS
    assert TASKS[name].name == name
