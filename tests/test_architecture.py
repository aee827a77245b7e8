"""The package's import graph follows the data flow (docs/architecture.md): no cycles, and no module
imports from a stage after its own.

Every import counts: module-level, inside functions, and under ``if TYPE_CHECKING``; relative imports
are resolved, and ``from package import name`` counts as importing ``package.name`` when that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "metaspo_hf"

# The data flow, in order; a module may import from its own stage and the ones before it.
STAGES = (
    # Shared utilities, below everything.
    ("utilities", ("metaspo_hf", "metaspo_hf.errors", "metaspo_hf.paths", "metaspo_hf.stats", "metaspo_hf.files")),
    ("models", ("metaspo_hf.models",)),
    ("tasks", ("metaspo_hf.tasks",)),
    ("scoring", ("metaspo_hf.scoring",)),
    ("search", ("metaspo_hf.search",)),
    ("evaluation", ("metaspo_hf.evaluation",)),
    ("run folder", ("metaspo_hf.runs", "metaspo_hf.runlock", "metaspo_hf.results", "metaspo_hf.reference_files")),
    ("report", ("metaspo_hf.report",)),
    # The top: the recipe assembles every stage's configuration; the pipeline, the CLI and the
    # benchmarks drive every stage.
    ("top", ("metaspo_hf.recipe", "metaspo_hf.pipeline", "metaspo_hf.cli", "metaspo_hf.bench")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def stage(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} has no stage in tests/test_architecture.py: give it one"
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_stage():
    for name in modules():
        stage(name)


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the data flow.
    within = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in edges.items()}
    assert cycles(within) == []


def test_no_module_imports_from_a_later_stage():
    upward = [
        f"{name} ({STAGES[stage(name)][0]}) imports {target} ({STAGES[stage(target)][0]})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if stage(target) > stage(name)
    ]
    assert upward == []
