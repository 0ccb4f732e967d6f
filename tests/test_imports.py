"""The import graph is the intended picture: library parts in layers, the CLI on top, no circles.

Every import counts, function-local ones included (a circle hidden inside a function is still a circle).
The graph is read from the source with ``ast``, so the test needs nothing imported. Run it alone to see
the graph fail on a circle: ``python -m pytest tests/test_imports.py``.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"sensq": "sensq", "cli": "sensq.cli", "probes": "sensq.probes", "kernels": "sensq.kernels"}

LAYERS = [
    {"sensq.errors"},
    {"sensq.stats", "sensq.runtime", "sensq.metrics", "sensq.testing", "sensq.plugins"},
    {"sensq.formats"},  # number formats: know no model, no kernel module
    {"sensq.kernels"},  # fill the formats' kernel registry; know nothing above the formats
    {"sensq.store", "sensq.models"},  # files; model families and layers
    {"sensq.trajectory", "sensq.prompts"},
    {"sensq.plan"},
    {"sensq.quant"},  # quantizes by a plan, calibrates on probe files (sensq.store): never runs a probe
    {"sensq.probes"},
    {"sensq.sensitivity", "sensq.generate", "sensq.loading", "sensq.export", "sensq.workflows"},
    {"sensq.eval"},  # scores generations
    {"sensq.ablate"},  # sets, runs and statistics; no rendering
    {"sensq.report"},  # renders rankings and ablations
    {"sensq.demo"},  # the whole method end to end
    {"sensq.cli", "sensq"},  # the CLI; the root package's lazy facade (sensq.quantize_)
]
"""Bottom to top: a part imports only parts of lower layers (or its own package)."""


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = ".".join((package, *path.relative_to(REPO / folder).with_suffix("").parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "sensq"):
                    edges[name].add(target)
    return edges


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _layer(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules()} - {"sensq"}
    assert parts <= set().union(*LAYERS), sorted(parts - set().union(*LAYERS))


def test_parts_import_only_lower_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                    if _part(a) != _part(b) and _layer(_part(b)) >= _layer(_part(a)))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_module_is_in_an_import_circle():
    """Tarjan's strongly connected components over modules: every component is one module."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_graph_reader_sees_a_function_local_import(tmp_path):
    """The reader is not blind: the function-local imports that once hid circles are in the graph."""
    graph = _graph()
    assert "sensq.models.family" in graph["sensq.trajectory"]  # imported inside apply_trajectory and run
    assert "sensq.formats.backend" in graph["sensq.kernels"]  # imported inside register()
