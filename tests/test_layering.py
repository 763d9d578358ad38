"""The package's import graph: no circles, export/ and runtime/ never import each other (nor verify/,
which sits above both), and argparse lives in quantkit/cli.py alone. Every import counts, also the
ones inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantkit"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the quantkit modules it imports (`from quantkit import x` names x when x is a module)."""
    modules = modules or _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                if t == "quantkit" or t.startswith("quantkit."):
                    r = resolve(t)
                    if r and r != mod:
                        graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_the_detector_finds_a_circle_and_a_layer_crossing(tmp_path):
    pkg = tmp_path / "quantkit"
    (pkg / "export").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from quantkit import b\n")
    (pkg / "b.py").write_text("from quantkit.a import f\n")
    (pkg / "export" / "__init__.py").write_text("")
    (pkg / "export" / "x.py").write_text("from ..runtime import y\n")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "y.py").write_text("import os\n")
    modules = {}
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(tmp_path).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = import_graph(modules)
    assert cycles(graph) == [["quantkit.a", "quantkit.b"]]
    assert "quantkit.runtime.y" in graph["quantkit.export.x"]


def test_no_import_circle_in_the_package():
    found = cycles(import_graph())
    assert not found, f"import circles: {found}"


def test_export_runtime_and_verify_keep_their_layers():
    graph = import_graph()
    assert len(graph) > 60  # the whole package was read
    crossings = []
    for mod, deps in graph.items():
        for dep in deps:
            pair = (mod.split(".")[1], dep.split(".")[1]) if mod.count(".") and dep.count(".") else None
            if pair in {("export", "runtime"), ("runtime", "export"), ("export", "verify"), ("runtime", "verify")}:
                crossings.append(f"{mod} -> {dep}")
    assert not crossings, crossings


def test_argparse_only_in_the_cli():
    users = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                users.append(mod)
    assert sorted(set(users)) == ["quantkit.cli"], users


def test_every_package_is_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)
