"""The shape the code keeps (../shared/design/shape.md): imports run one way, main.py at the top."""
import ast

import pytest

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import of a project module anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node))
    return [(name, node) for name, node in found if name in MODULES]


def import_graph() -> dict[str, set[str]]:
    return {name: {dep for dep, _ in project_imports(ast.parse(path.read_text()))} - {name}
            for name, path in MODULES.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return trail[trail.index(dep):] + [dep] if dep in trail else [name, dep]
            if dep not in state:
                circle = visit(dep, trail + [dep])
                if circle:
                    return circle
        state[name] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start, [start])
            if circle:
                return circle
    return None


def test_the_tree_has_the_modules_the_design_names():
    assert {"main", "config", "step", "models", "losses", "data", "utils", "latent", "evaluate", "bench"} <= set(MODULES)


def test_no_module_imports_main():
    importers = sorted(name for name, deps in import_graph().items() if "main" in deps)
    assert importers == []


def test_no_import_circles():
    assert find_circle(import_graph()) is None


def test_the_circle_finder_finds_circles():  # so that the test above can fail
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_project_modules_are_imported_at_the_top_only(name):
    """An import of a project module inside a function hides a dependency (often a circle)."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(node) for node in tree.body}
    hidden = [f"{dep} (line {node.lineno})" for dep, node in project_imports(tree) if id(node) not in top_level]
    assert hidden == []
