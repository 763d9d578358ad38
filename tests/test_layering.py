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


# report.json is laid out in quantkit/report/render.py alone, from the stages' typed results, and
# written through report/document.py; a stage that edits the document itself fails here.
REPORT_WRITERS = {"quantkit.report.render": "write_reports", "quantkit.report.document": "report.json"}
WRITE_CALLS = {"write_reports", "atomic_write_json", "atomic_write_text", "write_text", "write_bytes", "dump"}


def report_writers(modules: dict[str, Path]) -> list[str]:
    """'module:line call' for each call that writes report.json's content: write_reports(...), or a write
    whose arguments or receiver name report.json (directly or through a variable assigned from it)."""
    found = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))

        def mentions(node: ast.AST, names: set[str]) -> bool:
            return any((isinstance(n, ast.Constant) and n.value == "report.json")
                       or (isinstance(n, ast.Name) and n.id in names) for n in ast.walk(node))

        named: set[str] = set()
        for node in ast.walk(tree):  # variables holding a report.json path (`path = out / "report.json"`)
            if isinstance(node, ast.Assign) and mentions(node.value, set()):
                named |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name not in WRITE_CALLS:
                continue
            receiver = [fn.value] if isinstance(fn, ast.Attribute) else []
            if name == "write_reports" or any(mentions(a, named) for a in [*node.args, *receiver]):
                found.append(f"{mod}:{node.lineno} {name}")
    return found


def report_edits(modules: dict[str, Path]) -> list[str]:
    """'module:line target' for each edit of a report dict outside quantkit/report/: an item assigned
    (`report["x"] = ...`, `qm.report.to_dict()["x"] = ...`) or update/setdefault/pop/clear called on it."""
    found = []
    for mod, path in modules.items():
        if mod.startswith("quantkit.report."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = [t.value for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                           if isinstance(t, ast.Subscript)]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("update", "setdefault", "pop", "clear")):
                targets = [node.func.value]
            found += [f"{mod}:{node.lineno} {ast.unparse(t)}" for t in targets if "report" in ast.unparse(t).lower()]
    return found


def test_the_report_detector_finds_a_stage_writing_report_json(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text("import json\nfrom quantkit.outdir import atomic_write_json\nfrom quantkit.report import write_reports\n"
                     "def f(out, report):\n    path = out / 'report.json'\n    report['x'] = 1\n"
                     "    atomic_write_json(path, report)\n    write_reports(report, out)\n"
                     "    (out / 'report.json').write_text(json.dumps(report))\n"
                     "    (out / 'plan.json').write_text('{}')\n")
    assert report_writers({"quantkit.stage": stage}) == [
        "quantkit.stage:7 atomic_write_json", "quantkit.stage:8 write_reports", "quantkit.stage:9 write_text"]
    extra = tmp_path / "extra.py"
    extra.write_text("def g(qm, d):\n    qm.report.to_dict()['placement'] = d\n    d['x'] = 1\n"
                     "    qm.report.to_dict().setdefault('runtimes', {})\n")
    assert report_edits({"quantkit.stage": stage, "quantkit.extra": extra}) == [
        "quantkit.stage:6 report", "quantkit.extra:2 qm.report.to_dict()", "quantkit.extra:4 qm.report.to_dict()"]


def test_report_json_is_rendered_in_one_place():
    writers = report_writers(_modules())
    outside = [w for w in writers if w.split(":")[0] not in REPORT_WRITERS]
    assert not outside, f"report.json written outside quantkit/report/render.py: {outside}"
    # the renderer hands its documents to write_reports; document.py is the one that writes the file
    assert {w.split(":")[0] for w in writers} == set(REPORT_WRITERS), writers
    edits = report_edits(_modules())
    assert not edits, f"report.json content assembled outside quantkit/report/render.py: {edits}"


# The verbs the API covers are thin callers of it: quantkit.<verb> (and QuantizedModel's methods),
# never the stage functions underneath.
API_VERBS = {"cmd_plan": "plan", "_quantize_into": "quantize", "cmd_export": "load", "cmd_audit": "audit",
             "cmd_collect": "collect"}
STAGE_FUNCTIONS = {"export_run", "reference_run", "check_export", "compile_check", "audit", "write_audit",
                   "read_plan", "collect", "make_plan", "prepare", "quantize", "load_quantized", "save_run"}


def stage_calls_of_verbs(cli_source: str) -> dict[str, list[str]]:
    """verb function -> the stage functions it imports from quantkit, and whether it calls quantkit.<api>."""
    found = {}
    for node in ast.parse(cli_source).body:
        if isinstance(node, ast.FunctionDef) and node.name in API_VERBS:
            imported = [a.name for n in ast.walk(node) if isinstance(n, ast.ImportFrom)
                        and (n.module or "").startswith("quantkit") for a in n.names if a.name in STAGE_FUNCTIONS]
            api = API_VERBS[node.name]
            calls = any(isinstance(n, ast.Attribute) and n.attr == api and isinstance(n.value, ast.Name)
                        and n.value.id == "quantkit" for n in ast.walk(node))
            found[node.name] = imported + ([] if calls else [f"no quantkit.{api}(...) call"])
    return found


def test_the_cli_verbs_call_the_api():
    found = stage_calls_of_verbs((PACKAGE / "cli.py").read_text())
    assert sorted(found) == sorted(API_VERBS), found  # every verb function is still there
    assert all(not v for v in found.values()), found
    planted = "def cmd_export(args):\n    from quantkit.export.onnx_export import export_run\n    export_run(args.out)\n"
    assert stage_calls_of_verbs(planted) == {"cmd_export": ["export_run", "no quantkit.load(...) call"]}
