"""The package's layers point one way. Every import in splitserve/ (lazy ones inside functions
and TYPE_CHECKING blocks included) goes to the importer's own component or to a lower layer,
so no two components depend on each other; and no module imports itself back through others.

Bottom to top: the configuration and errors; the engine; the messages and latency models that
workers and routers share; transfer and the cluster's store and deployment; the worker (every
phase, from parts); the router and its front ends, and the actor shell the workers run in; the
serving assembly and the load tester; the simulator; the profiler (it measures the engine into
the simulator's profile format); the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "splitserve"
LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "protos"),
    ("engine",),
    ("splitserve", "protocol", "latency"),  # "splitserve": the package root, a facade over the engine
    ("transfer", "cluster"),
    ("worker",),
    ("router", "worker_actor"),  # worker_actor: the Ray actor shell over the worker
    ("server", "loadtest"),
    ("sim",),  # the simulator: the router's decisions over simulated instances, loadtest's workloads and metrics
    ("profiler",),  # `splitserve profile`: runs the engine, fits the worker's models, writes the simulator's format
    ("serve_cli",),
    ("cli",),
]
# (importer, imported) pairs that break the rule on purpose, each with its reason. Keep empty.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The splitserve modules a file imports, anywhere in it."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "splitserve"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "splitserve":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    name = component(module)
    for rank, names in enumerate(LAYERS):
        if name in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its component {name!r} to LAYERS")


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in all_modules():
        layer(name)


def test_imports_point_down_or_stay_in_their_component():
    upward = []
    for importer, imported in sorted((a, b) for a, targets in graph().items() for b in targets):
        same = component(importer) == component(imported)
        if not same and layer(imported) >= layer(importer) and (importer, imported) not in ALLOWED:
            upward.append(f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})")
    assert upward == []


def test_no_module_imports_itself_back():
    edges = graph()
    cycles = set()

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in on_path:
                cycle = path[path.index(nxt):]
                cycles.add(" -> ".join(cycle + [nxt]))
            elif nxt not in done:
                on_path.add(nxt)
                visit(nxt, path + [nxt], on_path, done)
                on_path.discard(nxt)
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start], {start}, done)
    assert sorted(cycles) == []


@pytest.mark.parametrize("module", ["splitserve.config", "splitserve.protocol", "splitserve.latency",
                                    "splitserve.router.router", "splitserve.server"])
def test_allowed_list_is_justified(module):
    assert all(reason.strip() for reason in ALLOWED.values())
    assert module in all_modules()
