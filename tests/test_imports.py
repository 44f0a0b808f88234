"""Imports point down only: no cycle between modules or between top-level units, and the library
never imports the runner (DESIGN.md: `cli` -> `study` -> `train`, `evaluate`, `cleaning` -> ... ->
`config`, `tokenizer`).

The graph is read with ``ast`` from the source of the package this test imports, so it sees every
import, including the ones inside functions (a lazy import still makes one module depend on the
other; hiding it in a function only hides the cycle). ``importlib.import_module`` strings (the CLI's
command table) are not imports of a module and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import clip_backdoor

PACKAGE = "clip_backdoor"
ROOT = Path(clip_backdoor.__file__).parent
# The library part: models, objectives, data, attacks, evaluate (and detection, README's layout) ...
LIBRARY = ("models", "objectives", "data", "attacks", "evaluate", "detection")
# ... never imports the runner part.
RUNNER = ("train", "study", "cli")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join((PACKAGE, *parts)).removesuffix(".__init__")
        mods[name] = path
    return mods


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (incl. inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..data import y`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from a.b import c`: c may be the module a.b.c or a name in a.b
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        # a name that is no module (`from a.b import some_function`) is no edge
        out |= {t for t in targets if t in known and t != module}
    return out


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = module_names(root)
    return {m: imported(m, p, set(mods)) for m, p in mods.items()}


def unit(module: str) -> str:
    """The top-level unit a module belongs to: clip_backdoor.study.spec -> clip_backdoor.study."""
    return ".".join(module.split(".")[:2])


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {unit(m): set() for m in graph}
    for m, targets in graph.items():
        units[unit(m)] |= {unit(t) for t in targets if unit(t) != unit(m)}
    return units


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _edges_within(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from clip_backdoor.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import clip_backdoor.a\nimport clip_backdoor.sub.b as x\n")
    graph = module_graph(pkg)
    assert graph["clip_backdoor.a"] == {"clip_backdoor.sub", "clip_backdoor.sub.b"}
    assert graph["clip_backdoor.sub.b"] == {"clip_backdoor.sub", "clip_backdoor.sub.c"}
    assert graph["clip_backdoor.sub.c"] == {"clip_backdoor.a", "clip_backdoor.sub.b"}
    assert cycles(graph) == [["clip_backdoor.a", "clip_backdoor.sub.b", "clip_backdoor.sub.c"]]
    assert cycles(unit_graph(graph)) == [["clip_backdoor.a", "clip_backdoor.sub"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_cycle_between_modules():
    graph = module_graph()
    assert len(graph) > 50  # the package was found
    found = cycles(graph)
    assert not found, "import cycles (every import counts, lazy ones too):\n" + "\n".join(
        "  " + ", ".join(_edges_within(c, graph)) for c in found)


def test_no_cycle_between_top_level_units():
    graph = unit_graph(module_graph())
    found = cycles(graph)
    assert not found, "cycles between top-level units:\n" + "\n".join(
        "  " + ", ".join(_edges_within(c, graph)) for c in found)


def test_the_library_never_imports_the_runner():
    graph = module_graph()
    library = {f"{PACKAGE}.{u}" for u in LIBRARY}
    runner = {f"{PACKAGE}.{u}" for u in RUNNER}
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if unit(m) in library
                   for t in targets if unit(t) in runner)
    assert not wrong, "library modules importing train/study/cli:\n  " + "\n  ".join(wrong)
