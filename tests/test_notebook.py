"""The accuracy notebook runs headless against a report and shows its tables and plots."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

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


def test_notebook_says_where_the_report_is_missing(kernel_env, tmp_path):
    missing = tmp_path / "nowhere" / "report.json"
    kernel_env.setenv("QUANTKIT_REPORT", str(missing))
    with pytest.raises(CellExecutionError, match="run `make demo` or set QUANTKIT_REPORT"):
        _execute(nbformat.read(NOTEBOOK, as_version=4))
