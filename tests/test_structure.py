"""The package's shape: no import cycles between its modules (imports inside functions count:
they only hide a cycle), and loading a recipe stays light."""

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"forgetscope": ROOT / "forgetscope", "forgetscope.evals": ROOT / "evals"}


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``evals/`` is ``forgetscope.evals``)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imported(node: ast.AST, module: str, modules: set[str]) -> set[str]:
    """The package modules that one import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's own package upwards
            parts = module.split(".")[: len(module.split(".")) - node.level]
            base = ".".join([*parts, *([base] if base else [])])
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    else:
        return set()
    found = set()
    for name in names:
        while name and name not in modules:  # `forgetscope.evaluate.fingerprint` -> forgetscope.evaluate
            name = name.rpartition(".")[0]
        if name and name != "forgetscope":  # the package's __init__ imports nothing at import time
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (top level, functions,
    ``if TYPE_CHECKING:`` blocks)."""
    files = _module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = {dep for node in ast.walk(tree) for dep in _imported(node, module, set(files))} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that lies on one, each cycle reported once."""
    found, seen = [], set()
    for start in sorted(graph):
        parents = {start: None}
        queue = deque([start])
        while queue:  # breadth first: the shortest way back to `start`
            node = queue.popleft()
            if start in graph[node]:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                cycle = [*reversed(path), start]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append(cycle)
                break
            for dep in sorted(graph[node]):
                if dep not in parents:
                    parents[dep] = node
                    queue.append(dep)
    return found


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "forgetscope.tasks" in graph["forgetscope.evals.builders"]
    assert "forgetscope.runner" in graph["forgetscope.cli"]  # imported inside _cmd_run


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, (
        "import cycles inside forgetscope/ (break each by moving what both sides need lower):\n"
        + "\n".join(" -> ".join(cycle) for cycle in found)
    )


def test_loading_a_recipe_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from forgetscope.load import load_recipe; load_recipe(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "recipes" / "tiny.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
