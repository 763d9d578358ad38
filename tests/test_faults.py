"""The fault battery (issue 17): careless and hostile input to the command line.

Every case asserts the exit code, that no traceback was printed, that the message names the file
or field at fault, and - where files existed before - that they are byte-for-byte unchanged
(hashed before and after). Security cases assert that the file a payload would create does not
exist afterwards. Most cases run in-process through `quantkit.cli.main`; one small quantized run
(a two-Linear MLP, 8 synthetic samples) and its export are made once for the module. Subprocesses
only where a separate process is the point: two runs at once, and `python -m quantkit`'s cwd import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantkit.cli import main

REPO = Path(__file__).resolve().parent.parent
MODEL = f"{REPO / 'tests' / 'fixtures' / 'fault_model.py'}:tiny"
WIDE_MODEL = f"{REPO / 'tests' / 'fixtures' / 'fault_model.py'}:tiny_wide"
SLOW_MODEL = f"{REPO / 'tests' / 'fixtures' / 'fault_model.py'}:slow_tiny"

RECIPE = """\
name: faults-fp8
default: skip
rules:
  - types: [Linear]
    precision: fp8
attention: {precision: skip}
thresholds: {cosine_min: 0.9}
"""
FAILING_RECIPE = RECIPE.replace("cosine_min: 0.9", "cosine_min: 1.0").replace("faults-fp8", "faults-fail")


# ---------------------------------------------------------------------------------------------
# helpers


def cli(*args: str) -> tuple[int | None, str, str]:
    """quantkit.cli.main in-process: (exit code, stdout, stderr). An exception that escapes main is
    what a user would see as a traceback: it is returned as such, with exit code None."""
    out, err = io.StringIO(), io.StringIO()
    code: int | None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - a traceback is the failure being tested for
            import traceback

            code = None
            err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
    return code, out.getvalue(), err.getvalue()


def tree(*roots: Path) -> dict[str, str]:
    """path -> sha256 (or <dir>/<link>) of everything under the roots, hidden files included."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if root.is_symlink():
            out[str(root)] = f"<link {os.readlink(root)}>"
            continue
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        if not root.exists():
            out[str(root)] = "<absent>"
            continue
        out[str(root)] = "<dir>"
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = f"<link {os.readlink(p)}>"
            elif p.is_dir():
                out[str(p)] = "<dir>"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def expect(result: tuple[int | None, str, str], code: int, *names: str, max_line: int = 2000) -> str:
    """The exit code, no traceback, every name in the output, no line longer than max_line."""
    got, out, err = result
    text = out + err
    assert "Traceback" not in text, text[-3000:]
    assert got == code, f"exit {got}, expected {code}:\n{text[-3000:]}"
    for name in names:
        assert str(name) in text, f"{name!r} not in:\n{text[-3000:]}"
    assert all(len(line) <= max_line for line in text.splitlines()), "an output line is over the limit"
    return text


def quantize_args(out: Path, recipe: Path, *extra: str, model: str = MODEL) -> list[str]:
    return ["quantize", "--recipe", recipe, "--model", model, "--synthetic", "--max-samples", "8", "--device", "cpu",
            "--out", out, "-q", *extra]


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    data = fn(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# shared, made once


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faults")
    (base / "recipe.yaml").write_text(RECIPE)
    (base / "failing.yaml").write_text(FAILING_RECIPE)
    return base


@pytest.fixture(scope="module")
def run0(base) -> Path:
    out = base / "run0"
    expect(cli(*quantize_args(out, base / "recipe.yaml")), 0, "PASSED")
    return out


@pytest.fixture(scope="module")
def exported0(base, run0):
    """run0 copied and exported, with what a SIGKILLed export leaves behind placed first."""
    folder = base / "exp0"
    shutil.copytree(run0, folder)
    (base / ".exp0.partial-killed").mkdir()
    (base / ".exp0.partial-killed" / "model.onnx").write_bytes(b"half")
    (folder / ".model.onnx.killed").mkdir()
    result = cli("export", "--from", folder, "--trust-model-code", "--no-reference", "-q")
    expect(result, 0)
    return folder, result


@pytest.fixture(scope="module")
def calset(base) -> Path:
    out = base / "cal"
    expect(cli("collect", "--model", MODEL, "--synthetic", "--max-samples", "6", "--out", out, "-q"), 0)
    return out


def _own_copy(source: Path, folder: Path) -> Path:
    """A copy of a module-scoped folder that one test may break."""
    shutil.copytree(source, folder)
    return folder


@pytest.fixture
def run(tmp_path, run0) -> Path:
    return _own_copy(run0, tmp_path / "run")


@pytest.fixture
def exported(tmp_path, exported0) -> Path:
    return _own_copy(exported0[0], tmp_path / "exp")


@pytest.fixture
def cal(tmp_path, calset) -> Path:
    return _own_copy(calset, tmp_path / "cal")


# ---------------------------------------------------------------------------------------------
# output folders (items 1, 3, 4, 8)


def test_out_dot_refused_and_project_kept(tmp_path, base, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    before = tree(project)
    monkeypatch.chdir(project)
    expect(cli(*quantize_args(Path("."), base / "recipe.yaml")), 2, "current folder")
    assert tree(project) == before


def test_out_ancestor_of_cwd_refused(tmp_path, base, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README").write_text("keep me\n")
    before = tree(project)
    monkeypatch.chdir(project / "src")
    expect(cli(*quantize_args(Path(".."), base / "recipe.yaml")), 2, "holds the current folder")
    assert tree(project) == before


def test_out_equal_to_calib_refused(cal, base):
    before = tree(cal)
    args = ["quantize", "--recipe", base / "recipe.yaml", "--model", MODEL, "--calib", cal, "--out", cal, "-q",
            "--device", "cpu"]
    expect(cli(*args), 2, "calibration set", str(cal))
    assert tree(cal) == before


def test_out_inside_calib_refused(cal, base):
    before = tree(cal)
    args = ["quantize", "--recipe", base / "recipe.yaml", "--model", MODEL, "--calib", cal, "--out", cal / "run", "-q",
            "--device", "cpu"]
    expect(cli(*args), 2, "calibration set")
    assert tree(cal) == before


def test_out_regular_file_refused(tmp_path, base):
    f = tmp_path / "notes.txt"
    f.write_text("my notes\n")
    before = tree(f)
    expect(cli(*quantize_args(f, base / "recipe.yaml")), 2, str(f), "is a file")
    assert tree(f) == before


def test_out_symlink_refused(tmp_path, base, run0):
    link = tmp_path / "link"
    link.symlink_to(run0)
    before = tree(link, run0)
    expect(cli(*quantize_args(link, base / "recipe.yaml")), 2, str(link), "symbolic link")
    assert tree(link, run0) == before


def test_out_below_regular_file_refused(tmp_path, base):
    f = tmp_path / "notes.txt"
    f.write_text("my notes\n")
    before = tree(f)
    expect(cli(*quantize_args(f / "run", base / "recipe.yaml")), 2, str(f))
    assert tree(f) == before


def test_out_in_read_only_folder_refused_before_any_work(base):
    # /proc takes no new files even for root; a model spec that cannot load shows the check comes first
    result = cli(*quantize_args(Path("/proc/quantkit-faults/run"), base / "recipe.yaml", model="no_such_module_x:f"))
    expect(result, 2, "/proc", "cannot write")


def test_out_foreign_folder_refused(tmp_path, base):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html></html>")
    (site / "app.js").write_text("1")
    before = tree(site)
    expect(cli(*quantize_args(site, base / "recipe.yaml")), 2, str(site), "not a quantkit output")
    assert tree(site) == before


def test_out_folder_holding_a_calibration_set_refused(cal, base):
    before = tree(cal)
    expect(cli(*quantize_args(cal, base / "recipe.yaml")), 2, "calibration set")
    assert tree(cal) == before


def test_out_folder_with_run_json_and_user_files_refused(tmp_path, base, run0):
    # a run folder the user put their own file into is no longer ours alone
    folder = tmp_path / "mixed"
    shutil.copytree(run0, folder)
    (folder / ".quantkit-output").unlink()
    (folder / "thesis.tex").write_text("chapter 1")
    before = tree(folder)
    expect(cli(*quantize_args(folder, base / "recipe.yaml")), 2, "not a quantkit output")
    assert tree(folder) == before


def test_every_output_folder_has_the_marker(run0, exported0, calset):
    for folder in (run0, exported0[0]):
        marker = json.loads((folder / ".quantkit-output").read_text())
        assert marker["written_by"] == "quantkit" and marker["kind"] == "run"
    assert json.loads((calset / "manifest.json").read_text())["format"] == "quantkit.calibration"


def test_failed_gate_keeps_previous_passing_run(run, base):
    before = tree(run)
    text = expect(cli(*quantize_args(run, base / "failing.yaml")), 1, "FAILED", f"{run}.failed", "kept")
    assert tree(run) == before, "the passing run was replaced by a failing one"
    failed = Path(f"{run}.failed")
    assert json.loads((failed / "report.json").read_text())["passed"] is False
    assert (failed / ".quantkit-output").is_file() and "--force" in text


def test_failed_gate_with_force_replaces(run, base):
    expect(cli(*quantize_args(run, base / "failing.yaml", "--force")), 1, "FAILED")
    assert json.loads((run / "report.json").read_text())["passed"] is False
    assert not Path(f"{run}.failed").exists()


def test_held_lock_refuses_second_run(run, base):
    lock = run.parent / f".{run.name}.lock"
    before = tree(run)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        expect(cli(*quantize_args(run, base / "recipe.yaml")), 2, str(lock), "another quantkit run")
    assert tree(run) == before


def test_export_cleans_and_reports_staging_leftovers(exported0, base):
    folder, (code, out, err) = exported0
    assert not (base / ".exp0.partial-killed").exists()
    assert not (folder / ".model.onnx.killed").exists()
    assert ".exp0.partial-killed: removed" in err and ".model.onnx.killed: removed" in err


def test_export_files_are_one_unit(exported, monkeypatch):
    """Killed between model.onnx and audit.json, the previous model.onnx/export.json/audit.json stay."""
    import quantkit.export.audit as audit_mod

    before = tree(exported)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit_mod, "write_audit", killed)
    expect(cli("export", "--from", exported, "--opset", "21", "--trust-model-code", "--no-reference", "-q"), 130)
    assert tree(exported) == before
    assert not list(exported.parent.glob(f".{exported.name}.partial-*"))
    assert json.loads((exported / "export.json").read_text())["opset"] == 19


def test_export_audit_and_graph_agree(exported0):
    folder, _ = exported0
    export = json.loads((folder / "export.json").read_text())
    audit = json.loads((folder / "audit.json").read_text())
    assert export["opset"] == 19 and audit["path"] == str(folder / "model.onnx")


# ---------------------------------------------------------------------------------------------
# collect --overwrite (item 2)


def test_collect_overwrite_refuses_foreign_manifest(tmp_path):
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "my pwa", "start_url": "/"}))
    (app / "index.html").write_text("<html></html>")
    before = tree(app)
    result = cli("collect", "--model", MODEL, "--synthetic", "--max-samples", "4", "--out", app, "--overwrite", "-q")
    expect(result, 2, str(app), "not a quantkit calibration manifest")
    assert tree(app) == before


def test_collect_overwrite_refuses_set_with_other_files(cal):
    (cal / "notes.txt").write_text("why I collected this")
    before = tree(cal)
    result = cli("collect", "--model", MODEL, "--synthetic", "--max-samples", "4", "--out", cal, "--overwrite", "-q")
    expect(result, 2, "notes.txt")
    assert tree(cal) == before


def test_collect_overwrite_cwd_refused(cal, monkeypatch):
    before = tree(cal)
    monkeypatch.chdir(cal)
    result = cli("collect", "--model", MODEL, "--synthetic", "--max-samples", "4", "--out", ".", "--overwrite", "-q")
    expect(result, 2, "current folder")
    assert tree(cal) == before


def test_collect_out_is_a_file(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n1,2\n")
    before = tree(f)
    expect(cli("collect", "--model", MODEL, "--synthetic", "--out", f, "-q"), 2, str(f))
    assert tree(f) == before


def test_collect_overwrite_replaces_own_set(cal):
    expect(cli("collect", "--model", MODEL, "--synthetic", "--max-samples", "3", "--out", cal, "--overwrite", "-q"), 0)
    assert json.loads((cal / "manifest.json").read_text())["samples"] == 3


# ---------------------------------------------------------------------------------------------
# run folders: trust and integrity (items 5, 6, 8)

PAYLOAD = """\
from pathlib import Path
Path({marker!r}).write_text("pwned")


def build():
    Path({marker!r}).write_text("pwned")
"""


def plant_payload(run: Path, tmp_path: Path) -> Path:
    marker = tmp_path / "PWNED"
    (run / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    edit_json(run / "run.json", lambda d: {**d, "model": f"{run / 'payload.py'}:build"})
    return marker


@pytest.mark.parametrize("verb", ["export", "compare"])
def test_run_folder_file_spec_not_imported(run, tmp_path, verb):
    marker = plant_payload(run, tmp_path)
    before = tree(run)
    args = ["export", "--from", run, "--no-reference", "-q"] if verb == "export" else ["compare", run, "-q"]
    expect(cli(*args), 2, "run.json", "--trust-model-code")
    assert not marker.exists(), "the folder's payload ran"
    assert tree(run) == before


def test_run_folder_module_spec_not_imported(run, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    (pkg / "evil_models.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(pkg))
    edit_json(run / "run.json", lambda d: {**d, "model": "evil_models:build"})
    before = tree(run)
    expect(cli("export", "--from", run, "--no-reference", "-q"), 2, "evil_models:build", "--model")
    assert not marker.exists()
    assert tree(run) == before


def test_model_given_again_is_used(run):
    # --model instead of run.json's spec: the folder's own (trusted by the user) model rebuilds it
    expect(cli("compare", run, "--model", MODEL, "--runtime", "fake-quant", "-q", "--device", "cpu"), 0, "fake-quant")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_state_pickle_not_run_even_when_env_allows(run, tmp_path, monkeypatch):
    import torch

    marker = tmp_path / "PWNED"
    torch.save({"modelopt_state": _Payload(str(marker)), "model_state_dict": {}}, run / "modelopt_state.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    before = tree(run)
    expect(cli("export", "--from", run, "--trust-model-code", "--no-reference", "-q"), 2, "modelopt_state.pth")
    assert not marker.exists(), "a pickle in modelopt_state.pth ran"
    assert tree(run) == before


def test_state_truncated(run):
    state = run / "modelopt_state.pth"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = tree(run)
    expect(cli("export", "--from", run, "--trust-model-code", "--no-reference", "-q"), 2, "modelopt_state.pth")
    assert tree(run) == before


def test_state_not_a_checkpoint(run):
    (run / "modelopt_state.pth").write_bytes(os.urandom(4096))
    before = tree(run)
    expect(cli("export", "--from", run, "--trust-model-code", "--no-reference", "-q"), 2, "modelopt_state.pth")
    assert tree(run) == before


def test_state_of_another_model(run):
    edit_json(run / "run.json", lambda d: {**d, "model": WIDE_MODEL})
    before = tree(run)
    expect(cli("export", "--from", run, "--trust-model-code", "--no-reference", "-q"), 2, "modelopt_state.pth",
           "tiny_wide")
    assert tree(run) == before


@pytest.mark.parametrize("content, field", [
    ("{not json", "run.json"),
    ("[1, 2, 3]", "run.json"),
    ('{"dtype": "fp32"}', "'model'"),
    ('{"model": 7, "dtype": "fp32"}', "'model'"),
    ('{"model": "llama-tiny", "dtype": "fp64"}', "'dtype'"),
    ('{"model": ' + "[" * 5000 + "]" * 5000 + ', "dtype": "fp32"}', "run.json"),
], ids=["not-json", "list", "no-model", "model-int", "bad-dtype", "deep"])
def test_export_broken_run_json(run, content, field):
    (run / "run.json").write_text(content)
    before = tree(run)
    expect(cli("export", "--from", run, "--trust-model-code", "--no-reference", "-q"), 2, field)
    assert tree(run) == before


def test_export_from_folder_that_is_no_run(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    before = tree(folder)
    expect(cli("export", "--from", folder, "-q"), 2, str(folder), "not a quantize output folder")
    assert tree(folder) == before


def test_export_while_locked(exported):
    lock = exported.parent / f".{exported.name}.lock"
    before = tree(exported)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        expect(cli("export", "--from", exported, "--trust-model-code", "--no-reference", "-q"), 2, str(lock))
    assert tree(exported) == before


# ---------------------------------------------------------------------------------------------
# recipes (items 8, 9)


def plan_with(recipe: Path):
    return cli("plan", "--recipe", recipe, "--model", MODEL, "-q")


def test_recipe_not_utf8(tmp_path):
    r = tmp_path / "latin1.yaml"
    r.write_bytes("name: caf\xe9\nrules: []\n".encode("latin-1"))
    expect(plan_with(r), 2, str(r), "not UTF-8")


def test_recipe_nested_thousands_deep(tmp_path):
    r = tmp_path / "deep.yaml"
    r.write_text("name: deep\nrules: " + "[" * 5000 + "]" * 5000 + "\n")
    expect(plan_with(r), 2, str(r), "nested")


def test_recipe_nested_mappings_deep(tmp_path):
    r = tmp_path / "deep-map.yaml"
    r.write_text("name: deep\nprotect: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")
    expect(plan_with(r), 2, str(r), "nested")


def test_recipe_alias_bomb(tmp_path):
    # Under 450 bytes; a rule quoted back in full would be a line of millions of characters.
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcde", "bcdef"):
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines += ["name: bomb", "rules: [*f]"]
    r = tmp_path / "bomb.yaml"
    r.write_text("\n".join(lines) + "\n")
    assert r.stat().st_size < 450
    text = expect(plan_with(r), 2, str(r), "aliases", max_line=1000)
    assert len(text) < 4000


def test_recipe_too_large(tmp_path):
    r = tmp_path / "huge.yaml"
    r.write_text("name: huge\nrules: []\n" + "# padding\n" * 200_000)
    expect(plan_with(r), 2, str(r), "too large")


def test_recipe_long_value_is_cut_in_the_message(tmp_path):
    r = tmp_path / "long.yaml"
    r.write_text("name: long\nrules:\n  - {types: [Linear], precision: " + "x" * 100_000 + "}\n")
    text = expect(plan_with(r), 2, str(r), "precision", max_line=600)
    assert "x" * 200 not in text


def test_recipe_long_target_is_cut(tmp_path):
    r = tmp_path / "target.yaml"
    r.write_text("name: t\ntargets: [" + "y" * 50_000 + "]\nrules: []\n")
    text = expect(plan_with(r), 2, str(r), "targets", max_line=600)
    assert "y" * 200 not in text


@pytest.mark.parametrize("content, needle", [
    ("- a\n- b\n", "mapping"),
    ("name: x\nrules: [\n", "malformed YAML"),
    ("name: x\nrules: []\nextends: no-such-parent\n", "extends"),
    ("name: x\nrules: []\nbogus_key: 1\n", "bogus_key"),
    ("", "mapping"),
    ("name: x\nrules: 5\n", "rules"),
], ids=["list", "malformed", "extends-missing", "unknown-key", "empty", "rules-int"])
def test_recipe_schema_errors(tmp_path, content, needle):
    r = tmp_path / "r.yaml"
    r.write_text(content)
    expect(plan_with(r), 2, str(r), needle)


def test_recipe_is_a_folder(tmp_path):
    d = tmp_path / "recipes.yaml"
    d.mkdir()
    expect(plan_with(d), 2, str(d))


# ---------------------------------------------------------------------------------------------
# calibration data (items 8, 10)


def quantize_calib(cal: Path, tmp_path: Path, base: Path):
    return cli("quantize", "--recipe", base / "recipe.yaml", "--model", MODEL, "--calib", cal, "--out",
               tmp_path / "out", "-q", "--device", "cpu")


@pytest.mark.parametrize("edit, field", [
    (lambda m: {**m, "samples": "six"}, "`samples`"),
    (lambda m: {**m, "rows_done": 2.5}, "`rows_done`"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "samples": "6"}]}, "shards[0].samples"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "bytes": 1.5}]}, "shards[0].bytes"),
    (lambda m: {**m, "shards": [{**m["shards"][0], "samples": None}]}, "shards[0].samples"),
    (lambda m: {**m, "fields": ["kwargs.x"]}, "`fields`"),
], ids=["samples-str", "rows-float", "shard-samples-str", "shard-bytes-float", "shard-samples-null", "fields-list"])
def test_manifest_non_integer_values(cal, tmp_path, base, edit, field):
    edit_json(cal / "manifest.json", edit)
    before = tree(cal)
    expect(quantize_calib(cal, tmp_path, base), 2, "manifest.json", field)
    assert tree(cal) == before


@pytest.mark.parametrize("edit, needle", [
    (lambda f: {"kwargs.x": {**f["kwargs.x"], "dtype": "float16"}}, "dtype float32"),
    (lambda f: {"kwargs.x": {**f["kwargs.x"], "shape": [1, 9, 16]}}, "shape [1, 4, 16]"),
    (lambda f: {"kwargs.y": f["kwargs.x"]}, "kwargs.x"),
    (lambda f: {**f, "kwargs.mask": {"kind": "tensor", "dtype": "bool", "shape": [1, 4]}}, "kwargs.mask"),
    (lambda f: {"kwargs.x": {"kind": "value", "type": "int"}}, "kwargs.x"),
], ids=["dtype", "shape", "tree", "extra-field", "kind"])
def test_shards_disagree_with_manifest(cal, tmp_path, base, edit, needle):
    def apply(m):
        fields = {k: v for k, v in m["fields"].items()}
        fields = edit({k: ({**v, "shape": v.get("shape", v.get("shape_min"))} if "shape_min" in v else v)
                       for k, v in fields.items()})
        for v in fields.values():
            if "shape" in v:
                v.pop("shape_min", None), v.pop("shape_max", None)
        return {**m, "fields": fields}

    edit_json(cal / "manifest.json", apply)
    before = tree(cal)
    expect(quantize_calib(cal, tmp_path, base), 2, "shard-00000.safetensors" if needle != "kwargs.mask" else
           "manifest.json", needle)
    assert tree(cal) == before


def test_manifest_not_json(cal, tmp_path, base):
    (cal / "manifest.json").write_text("{")
    before = tree(cal)
    expect(quantize_calib(cal, tmp_path, base), 2, "manifest.json", "not valid JSON")
    assert tree(cal) == before


def test_manifest_is_a_list(cal, tmp_path, base):
    (cal / "manifest.json").write_text("[]")
    before = tree(cal)
    expect(quantize_calib(cal, tmp_path, base), 2, "manifest.json")
    assert tree(cal) == before


def test_shard_truncated(cal, tmp_path, base):
    shard = cal / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    before = tree(cal)
    expect(quantize_calib(cal, tmp_path, base), 2, "shard-00000.safetensors")
    assert tree(cal) == before


@pytest.mark.parametrize("flag, value", [("--max-samples", "0"), ("--batch-size", "0"), ("--max-samples", "-3"),
                                         ("--batch-size", "-1")])
def test_zero_counts_refused(tmp_path, base, flag, value):
    args = ["quantize", "--recipe", base / "recipe.yaml", "--model", MODEL, "--synthetic", "--device", "cpu",
            "--out", tmp_path / "out", "-q", flag, value]
    expect(cli(*args), 2, flag)
    assert not (tmp_path / "out").exists()


def test_zero_max_samples_compare(run):
    before = tree(run)
    expect(cli("compare", run, "--max-samples", "0", "--model", MODEL, "-q"), 2, "--max-samples")
    assert tree(run) == before


def test_zero_max_samples_export(exported):
    before = tree(exported)
    expect(cli("export", "--from", exported, "--max-samples", "0", "--trust-model-code", "-q"), 2, "--max-samples")
    assert tree(exported) == before


def test_help_documents_counts():
    code, out, _ = cli("quantize", "--help")
    assert code == 0 and ">= 1" in out and "--force" in out


# ---------------------------------------------------------------------------------------------
# audit (items 8, 12)


def test_audit_not_onnx(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_text("this is a text file, not a graph\n" * 10)
    expect(cli("audit", f, "--no-plan"), 2, str(f), "not")


def test_audit_truncated_onnx(exported):
    g = exported / "model.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    before = tree(exported)
    expect(cli("audit", g), 2, str(g), "truncated")
    assert tree(exported) == before


def test_audit_empty_file(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"")
    expect(cli("audit", f, "--no-plan"), 2, str(f))


def test_audit_plan_is_a_list(exported):
    (exported / "plan.json").write_text("[1, 2]")
    before = tree(exported)
    expect(cli("audit", exported / "model.onnx"), 2, "plan", "list")
    assert tree(exported) == before


def test_audit_plan_layers_not_a_list(exported):
    edit_json(exported / "plan.json", lambda p: {**p, "layers": {"a": 1}})
    before = tree(exported)
    expect(cli("audit", exported / "model.onnx"), 2, "layers")
    assert tree(exported) == before


def test_audit_plan_not_json(exported):
    (exported / "plan.json").write_text("{nope")
    before = tree(exported)
    expect(cli("audit", exported / "model.onnx"), 2, "plan.json")
    assert tree(exported) == before


def external_copy(exported: Path, tmp_path: Path) -> Path:
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    folder = tmp_path / "ext"
    folder.mkdir()
    model = onnx.load(str(exported / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder


def test_audit_external_data_present_passes(exported, tmp_path):
    folder = external_copy(exported, tmp_path)
    expect(cli("audit", folder / "model.onnx", "--no-plan", "--out", tmp_path / "audit.json"), 0)


def test_audit_external_data_missing(exported, tmp_path):
    folder = external_copy(exported, tmp_path)
    (folder / "model.onnx.data").unlink()
    before = tree(folder)
    expect(cli("audit", folder / "model.onnx", "--no-plan"), 2, "model.onnx.data", "missing")
    assert tree(folder) == before


def test_audit_external_data_truncated(exported, tmp_path):
    folder = external_copy(exported, tmp_path)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:64])
    before = tree(folder)
    expect(cli("audit", folder / "model.onnx", "--no-plan"), 2, "model.onnx.data", "truncated")
    assert tree(folder) == before


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../x.bin"])
def test_audit_external_data_outside_folder(exported, tmp_path, location):
    import onnx

    folder = external_copy(exported, tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 100_000)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(folder / "model.onnx"))
    before = tree(folder)
    expect(cli("audit", folder / "model.onnx", "--no-plan"), 2, location, "outside")
    assert tree(folder) == before


# ---------------------------------------------------------------------------------------------
# quiet (item 11)


def test_quiet_export_prints_no_modelopt_lines(exported0):
    _, (code, out, err) = exported0
    assert "Inserted" not in out + err
    assert "is not tested" not in out + err


# ---------------------------------------------------------------------------------------------
# subprocesses: two runs at once (item 4), `python -m quantkit` and the current folder (item 7)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_two_quantize_runs_into_one_out(tmp_path, base):
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "quantkit", *map(str, quantize_args(out, base / "recipe.yaml", model=SLOW_MODEL))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                              cwd=tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(r for r in results if r[0] == 0)
    loser = next(r for r in results if r[0] == 2)
    expect(loser, 2, str(tmp_path / ".shared.lock"), "another quantkit run")
    expect(winner, 0, "PASSED")
    names = {p.name for p in out.iterdir()}
    assert {"run.json", "modelopt_state.pth", "report.json", "plan.json", "recipe.yaml", ".quantkit-output"} <= names
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert not list(tmp_path.glob(".shared.partial-*")) and not list(tmp_path.glob(".shared.old-*"))
    # -q: neither ModelOpt's transformers version warning nor its "Inserted N quantizers"
    assert "is not tested" not in winner[1] + winner[2] and "Inserted" not in winner[1] + winner[2]


def test_protect_functions_never_import_from_cwd(tmp_path):
    marker = tmp_path / "PWNED"
    work = tmp_path / "work"
    work.mkdir()
    (work / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\ndef rope(x):\n    return x\n")
    (work / "r.yaml").write_text(RECIPE + "protect: {functions: ['evilmod:rope']}\n")
    before = tree(work)
    p = subprocess.run([sys.executable, "-m", "quantkit", "plan", "--recipe", "r.yaml", "--model", MODEL, "-q"],
                       capture_output=True, text=True, cwd=work, env=_env(), timeout=600)
    expect((p.returncode, p.stdout, p.stderr), 2, "protect.functions", "evilmod")
    assert not marker.exists(), "a module from the current folder was imported"
    assert tree(work) == before
