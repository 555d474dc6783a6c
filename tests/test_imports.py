"""The package's modules import each other without circles, counting imports inside functions too.

An import inside a function hides a circle at import time, but the modules still cannot be read,
tested or moved one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "image_logreg"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # from . import x, from ..sources import y
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])]) if (base or node.module) else ""
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                found.add(full if full in modules else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("image_logreg"):
            found.add(node.module.removeprefix("image_logreg").lstrip("."))
    return {m for m in found if m in modules and m != name}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    modules = module_names()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert "train" in graph["model"]  # imports inside functions count (partial_fit's)
    assert graph["serve.feedback"] >= {"serve.protocol", "lineage", "predict"}  # and relative ones of every depth
    assert graph["datasets"] >= {"datasets.registry"}  # a package's own __init__ is a module too
    assert circles(graph) == []


def test_the_datasets_wing_imports_nothing_above_it_but_its_leaves():
    """The loaders sit under everything that trains or serves: they may use errors, the console and
    the image-file reading below them, never the run, the model or the settings that name them."""
    modules = module_names()
    allowed = {"errors", "console", "images", "settings"}  # decode opens files as predict does
    for name, path in modules.items():
        if name.startswith("datasets"):
            above = {m for m in imports_of(name, path, modules) if not m.startswith("datasets")}
            assert above <= allowed, (name, above - allowed)


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []
