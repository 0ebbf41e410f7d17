"""The packages' imports point downwards only: no module imports one that imports it back
(directly or around a loop, local imports included), and the layers of ARCHITECTURE hold:
`eva_rl` imports neither `envs` nor `agents`, `envs` imports neither, nothing imports
`scripts`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eva_rl", "envs", "agents")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports anywhere (top level, functions,
    TYPE_CHECKING blocks excluded: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph = {}
    for path in files:
        name = module_name(path)
        # a package's __init__ re-exporting its modules is not a dependency loop
        graph[name] = {m for m in imported_modules(path, modules)
                       if m != name and not m.startswith(name + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop of ``graph`` (modules in order, the first repeated), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between modules: importing ``pkg.mod`` runs ``pkg/__init__``, which is no
    loop of the code's own unless the package's ``__init__`` imports back."""
    packages = {m for m in graph if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    return {m: {d for d in deps if d not in packages} for m, deps in graph.items()}


def test_no_import_cycles():
    cycle = find_cycle(without_packages(import_graph()))
    assert cycle is None, " -> ".join(cycle)


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_downwards():
    graph = import_graph()
    for module, deps in graph.items():
        top = {d.split(".")[0] for d in deps}
        if module.startswith("eva_rl"):
            assert not top & {"envs", "agents"}, (module, deps)
        if module.startswith("envs"):
            assert not top & {"eva_rl", "agents"}, (module, deps)
    scripts = {p.stem for p in (ROOT / "scripts").rglob("*.py")}
    for path in [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "scripts", "script_cli"):
                raise AssertionError(f"{path} imports {node.module}")
    assert "script_cli" in scripts
