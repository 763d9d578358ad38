"""The accuracy notebook runs headless against a report and shows its tables and plots."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from quantkit.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "accuracy_report.ipynb"
SAMPLE = Path(__file__).parent / "fixtures" / "sample_report.json"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    # A "python3" kernelspec for this very interpreter, found first (JUPYTER_PATH has priority), so the
    # kernel runs in the venv that has quantkit whatever other python3 kernels the machine knows.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (quantkit tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return monkeypatch


def _execute(nb):
    NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    return nb


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_renders_sample_report(kernel_env):
    kernel_env.setenv("QUANTKIT_REPORT", str(SAMPLE))
    nb = _execute(nbformat.read(NOTEBOOK, as_version=4))
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3, "error histogram, per-layer curve, coverage"
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    summary = next(h for h in html if "<table" in h and "recipe sha256" in h)
    assert "<td>balanced</td>" in summary
    assert any('<div class="banner pass"><strong>PASSED</strong>' in h for h in html)
    accuracy = next(h for h in html if "last_hidden_state" in h and "<table" in h)
    assert "0.997278" in accuracy and "not measured" in accuracy
    assert any("4,726,272" in h for h in html)  # the coverage table's nvfp4 params
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{SAMPLE} (quantkit.report/1): 7 sections" in stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A real `make demo` output, smaller: the same `quantize --recipe balanced` on the default model (MiniLM),
    run as a process like the Makefile does, on 16 of the built-in sentences instead of all of them."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([sys.executable, "-m", "quantkit", "quantize", "--recipe", "balanced", "--max-samples", "16",
                           "--device", "cpu", "--out", str(out), "-q"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    return out, proc


def test_demo_run_writes_the_three_reports_and_gates_its_exit_code(demo_run):
    out, proc = demo_run
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads((out / "report.json").read_text())
    # The exit code is the gate: 0 when the recipe's thresholds are met, 1 when not (CI gates on it).
    assert proc.returncode == (0 if report["passed"] else 1), (proc.returncode, report["failures"])
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith("PASSED" if report["passed"] else "FAILED: fake-quant/last_hidden_state: cosine ")
    assert f"results in {out}/ (report.json, report.md, report.html" in verdict
    assert "Inserted" not in proc.stdout  # ModelOpt's own prints are silenced under -q
    assert report["recipe"]["name"] == "balanced" and report["model"]["spec"] == "minilm"
    assert report["calibration"]["samples_total"] == 16 and report["calibration"]["synthetic"] is False
    # balanced sets no threshold: the gate is the stated default for a recipe with NVFP4 (0.95).
    assert report["thresholds"]["cosine_min"] == load_recipe("balanced").default_cosine_min() == 0.95
    cos = report["metrics"]["fake-quant"]["last_hidden_state"]["cosine"]
    assert 0.9 < cos < 1.0, f"balanced MiniLM cosine {cos}"
    # 12 NVFP4 MLP + 24 FP8 attention linears + 4 FP16 (embeddings, pooler), each with its per-layer figures.
    assert len(report["per_layer"]) == 40 and all(r["cosine"] is not None for r in report["per_layer"])
    assert len(report["error_histograms"]["fake-quant"]["last_hidden_state"]["counts"]) == 50
    md = (out / "report.md").read_text()
    assert md.startswith("# quantkit accuracy report: balanced")
    assert f"| fake-quant | last_hidden_state | {cos:.6f} |" in md
    page = (out / "report.html").read_text()
    # Self-contained: the three plots (error histogram, per-layer curve, coverage) embedded, nothing fetched.
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page and 'src="http' not in page


def test_notebook_renders_a_real_demo_report(kernel_env, demo_run):
    out, _ = demo_run
    kernel_env.setenv("QUANTKIT_REPORT", str(out / "report.json"))
    report = json.loads((out / "report.json").read_text())
    nb = _execute(nbformat.read(NOTEBOOK, as_version=4))
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3, "error histogram, per-layer, coverage"
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    label = "PASSED" if report["passed"] else "FAILED"
    assert any(f'<div class="banner {"pass" if report["passed"] else "fail"}"><strong>{label}</strong>' in h
               for h in html)
    cos = report["metrics"]["fake-quant"]["last_hidden_state"]["cosine"]
    assert any(f"{cos:.6f}" in h and "last_hidden_state" in h for h in html)
    nvfp4_params = report["coverage"]["by_precision"]["nvfp4"]["params"]
    assert any(f"{nvfp4_params:,}" in h for h in html)
    stdout = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{out / 'report.json'} (quantkit.report/1): " in stdout


def test_notebook_says_where_the_report_is_missing(kernel_env, tmp_path):
    missing = tmp_path / "nowhere" / "report.json"
    kernel_env.setenv("QUANTKIT_REPORT", str(missing))
    with pytest.raises(CellExecutionError, match="run `make demo` or set QUANTKIT_REPORT"):
        _execute(nbformat.read(NOTEBOOK, as_version=4))
