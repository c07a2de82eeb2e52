"""The layering of the project, read from the source: no import cycle among project modules,
nothing in filters/ importing pipeline/, and no runtime module that only tests or benchmarks use.

Imports are read with ``ast`` (module-level and inside functions alike: a lazy import still ties
two modules together), and so are the ``"package.module:Attr"`` strings of the registries (stages,
backends), which the registries import by name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("pipeline", "filters", "model")
PROJECT = RUNTIME + ("tools",)
TARGET = re.compile(r"^((?:pipeline|filters|model|tools)(?:\.\w+)+):\w+$")

# Entry points: run as `python -m X` or as a script, documented in README.md.
ENTRY_POINTS = {"pipeline.cli", "model.train", "model.infer", "model.eval", "model.eval.__main__",
                "model.average", "model.prepare", "model.tiny"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(packages) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(p)] = p
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The project module an import of ``name`` loads (the longest known prefix)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` loads pkg.mod when that is a module, else names of pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = TARGET.match(node.value)
            if m:
                names = [m.group(1)]
        for n in names:
            r = _resolve(n, known)
            if r is not None and r != module:
                out.add(r)
    return out


def _graph(packages) -> dict[str, set[str]]:
    mods = _modules(packages)
    known = set(mods)
    return {m: _imports(p, m, known) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_project_modules():
    cycles = _cycles(_graph(PROJECT))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_filters_import_nothing_from_pipeline():
    graph = _graph(PROJECT)
    bad = {m: sorted(t for t in targets if t.split(".")[0] in ("pipeline", "model", "tools"))
           for m, targets in graph.items() if m.split(".")[0] == "filters"}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"filters/ is the lower layer but imports {bad}"


def test_runtime_modules_are_used_by_runtime_code():
    """Every module of pipeline/, filters/ and model/ is imported by another runtime module (or is
    an entry point): test tooling lives in tools/, not in the runtime packages."""
    graph = _graph(RUNTIME)
    used = {t for m, targets in graph.items() for t in targets}
    # Reaching a package module imports its __init__ too.
    used |= {".".join(t.split(".")[:k]) for t in used for k in range(1, t.count(".") + 1)}
    unused = sorted(m for m in graph if m not in used and m not in ENTRY_POINTS and m not in RUNTIME)
    assert not unused, f"runtime modules that only tests/benchmarks (or nobody) import: {unused}"


def test_runtime_modules_do_not_import_test_tooling():
    graph = _graph(PROJECT)
    bad = {m: sorted(t for t in targets if t.split(".")[0] == "tools")
           for m, targets in graph.items() if m.split(".")[0] in RUNTIME}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"runtime modules import tools/: {bad}"
