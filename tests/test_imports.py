"""The package's imports form no cycle: the runtime (modules, backends, the dispatch lookup)
never imports the tooling (bench, plot, the command line) that imports it.

Read from the source with `ast`, not by importing: every `import` of a module of the
package, at module level and inside functions alike (a deferred import closes a cycle as
surely, only later), plus the modules named as "module:attribute" strings for `importlib` (the
backends' registry). kernels/ is installed as gpurnn.kernels. A package's parent `__init__` runs
before any submodule, which is not an edge here: `from gpurnn.bench import table` is an
edge to gpurnn.bench.table, and to gpurnn.bench only for the names its `__init__` defines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"gpurnn": ROOT / "gpurnn", "gpurnn.kernels": ROOT / "kernels"}
REGISTRY_ENTRY = re.compile(r"^(?P<module>gpurnn(?:\.\w+)+):\w+$")


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file of the installed package."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that the module `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{up}.{base}" if base else up
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = REGISTRY_ENTRY.match(node.value)  # "gpurnn.backends.cupy:CupyBackend"
            if named:
                found.add(named["module"])
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_form_no_cycle():
    graph = import_graph()
    # the walk sees the package: the edges every layer of it relies on
    assert "gpurnn.kernels.triton.recurrence" in graph["gpurnn.backends.triton"] or any(
        m.startswith("gpurnn.kernels.triton") for m in graph["gpurnn.backends.triton"]
    )
    assert "gpurnn.backends.cupy" in graph["gpurnn.backends"]  # named by string
    assert "gpurnn.dispatch" in graph["gpurnn.bench.table"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_what_the_old_dispatch_module_did():
    """The old gpurnn.dispatch built its table in a function that imported gpurnn.bench,
    whose runners import the backends, which look auto's choice up in gpurnn.dispatch."""
    graph = import_graph()
    graph["gpurnn.dispatch"] = graph["gpurnn.dispatch"] | {"gpurnn.bench"}
    cycle = find_cycle(graph)
    assert cycle is not None and "gpurnn.dispatch" in cycle and "gpurnn.bench" in cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_the_runtime_does_not_import_the_tooling():
    """What runs inside a user's model reaches neither the benchmark, the plots nor the
    command line, whichever way round it imports them."""
    graph = import_graph()
    tooling = {m for m in graph if m.startswith("gpurnn.bench")} | {
        "gpurnn.cli",
        "gpurnn.plot",
        "gpurnn.demos",
        "gpurnn.__main__",
    }
    seen, todo = set(), ["gpurnn.modules", "gpurnn.functional", "gpurnn.backends"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    assert not seen & tooling, sorted(seen & tooling)
