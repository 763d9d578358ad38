import base64
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from quantkit import report as qr

SAMPLE = Path(__file__).parent / "fixtures" / "sample_report.json"


@pytest.fixture(scope="module")
def sample() -> dict:
    return qr.load_report(SAMPLE)


@pytest.fixture(scope="module")
def rendered(sample):
    return qr.render_markdown(sample), qr.render_html(sample)


def test_sample_report_is_consistent(sample):
    cov = sample["coverage"]
    by = cov["by_precision"]
    assert sum(v["params"] for v in by.values()) == cov["total_params"] == 22_713_216
    assert sum(v["weight_bytes"] for v in by.values()) == cov["weight_bytes_after"]
    assert sum(v["param_fraction"] for v in by.values()) == pytest.approx(1.0, abs=1e-5)
    for runtime, outputs in sample["error_histograms"].items():
        for name, h in outputs.items():
            assert len(h["bin_edges"]) == len(h["counts"]) + 1
            assert sum(h["counts"]) == sample["metrics"][runtime][name]["numel"]


def test_markdown_names_recipe_and_verdict(rendered):
    md, _ = rendered
    assert md.startswith("# quantkit accuracy report: balanced\n")
    assert "**PASSED**" in md
    assert "| recipe | balanced |" in md
    assert "| targets | thor, h100 |" in md


def test_markdown_coverage_rows_have_the_sample_numbers(rendered):
    md, _ = rendered
    assert "| nvfp4 | 8 | 4,726,272 | 20.8% | 2.56 MiB |" in md
    assert "| fp8 | 28 | 5,911,296 | 26.0% | 5.67 MiB |" in md
    assert "| fp16 | 1 | 147,840 | 0.7% | 288.75 KiB |" in md
    assert "| unquantized | 16 | 11,927,808 | 52.5% | 45.50 MiB |" in md
    assert "| total | 53 | 22,713,216 | 100.0% | 54.02 MiB |" in md
    assert "86.64 MiB before → 54.02 MiB after (1.60× smaller; 90,852,864 → 56,642,304 bytes)" in md


def test_markdown_accuracy_rows(sample, rendered):
    md, _ = rendered
    m = sample["metrics"]["fake-quant"]["last_hidden_state"]
    row = next(line for line in md.splitlines() if line.startswith("| fake-quant | last_hidden_state |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{m['cosine']:.6f}" == "0.997278"
    assert cells[3] == f"{m['snr_db']:.2f}" == "22.62"
    assert cells[4] == f"{m['mse']:.3e}"
    assert cells[-1] == "pass"
    assert "| tensorrt | — | — | — | — | — | — | — | — | — | not measured |" in md
    assert "Thresholds: cosine ≥ 0.99; no SNR gate." in md


def test_markdown_per_layer_table(sample, rendered):
    md, _ = rendered
    first = sample["per_layer"][0]
    assert f"| 0 | {first['name']} | {first['precision']} | {first['cosine']:.6f} | {first['snr_db']:.2f} |" in md
    assert "| 36 | pooler.dense | fp16 |" in md


def test_html_is_self_contained(rendered):
    _, page = rendered
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert page.count("data:image/png;base64,") == len(images) >= 3
    for b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<style>" in page and "balanced" in page


def test_html_names_layers_on_hover(sample, rendered):
    _, page = rendered
    areas = re.findall(r'<area shape="rect" coords="(\d+),(\d+),(\d+),(\d+)" href="#layer-(\d+)" title="([^"]*)"', page)
    assert len(areas) == len(sample["per_layer"]) == 37
    assert areas[0][5].startswith("#0 encoder.layer.0.attention.self.query (fp8): cosine")
    xs = [int(a[0]) for a in areas]
    assert xs == sorted(xs) and len(set(xs)) == 37  # one column per layer, left to right
    assert all(f'id="layer-{i}"' in page for i in range(37))  # each area links to its table row


def _minimal(**extra) -> dict:
    return {"schema": qr.SCHEMA, "recipe": {"name": "fp8-only"}, **extra}


def test_missing_sections_say_not_measured():
    report = _minimal(
        metrics={"fake-quant": {"logits": {"numel": 10, "finite": True, "cosine": 0.9995, "snr_db": 30.1, "mse": 1e-4}}}
    )
    md, page = qr.render_markdown(report), qr.render_html(report)
    assert "# quantkit accuracy report: fp8-only" in md
    assert "Per-layer error: not measured." in md
    dashes = "| — " * 9 + "|"  # output and the eight figures; the reason is the verdict
    assert f"| onnxruntime {dashes} not measured |" in md and f"| tensorrt {dashes} not measured |" in md
    assert "| fake-quant | logits | 0.999500 | 30.10 | 1.000e-04 |" in md
    assert "Error histogram: not measured." in md and "Coverage: not measured." in md
    assert "Calibration: not measured." in md and "Versions: not measured." in md
    assert "**NOT JUDGED**" in md and "Thresholds: not measured." in md
    assert "data:image/png" not in page and "not measured" in page
    assert qr.plot_per_layer(report) is None and qr.plot_coverage(report) is None
    assert qr.plot_error_histograms(report) is None


def test_empty_report_renders():
    md = qr.render_markdown({})
    assert md.startswith("# quantkit accuracy report: —")
    assert "<html" in qr.render_html({})


def _without_plots(sample) -> dict:
    report = copy.deepcopy(sample)
    for key in ("per_layer", "error_histograms", "coverage"):
        del report[key]
    return report


def test_failed_report_shows_failures_and_nonfinite(sample):
    report = _without_plots(sample)
    report["passed"] = False
    report["failures"] = ["onnxruntime/last_hidden_state: not finite: candidate has 3 NaN among 3,145,728 values"]
    report["metrics"]["onnxruntime"]["last_hidden_state"] = {
        "numel": 3145728,
        "finite": False,
        "reason": "candidate has 3 NaN among 3,145,728 values",
    }
    report["thresholds"] = {"cosine_min": 0.998, "snr_min_db": 25.0}
    md, page = qr.render_markdown(report), qr.render_html(report)
    assert "**FAILED**" in md and '<div class="banner fail">' in page
    assert "- onnxruntime/last_hidden_state: not finite: candidate has 3 NaN" in md
    assert "| onnxruntime | last_hidden_state | not finite |" in md
    assert "fail: candidate has 3 NaN among 3,145,728 values" in md
    row = next(line for line in md.splitlines() if line.startswith("| fake-quant | last_hidden_state |"))
    assert row.endswith("| fail: cosine 0.997278 < 0.998; SNR 22.62 dB < 25.0 dB |")
    assert "Thresholds: cosine ≥ 0.998; SNR ≥ 25.0 dB." in md


def test_report_text_is_escaped():
    report = _minimal(
        recipe={"name": "<b>x</b>|y"},
        warnings=["a <script>alert(1)</script> b"],
        per_layer=[{"name": "blocks.0.attn|qkv", "precision": "fp8", "cosine": 0.99, "snr_db": 20}],
    )
    md, page = qr.render_markdown(report), qr.render_html(report)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
    assert "| 0 | blocks.0.attn\\|qkv | fp8 |" in md
    assert "&lt;script>" in md
    assert md.startswith("# quantkit accuracy report: &lt;b>x&lt;/b>\\|y\n")


def test_infinite_snr_renders_and_stays_strict_json(tmp_path, sample):
    report = _without_plots(sample)
    report["metrics"]["fake-quant"]["pooler_output"]["snr_db"] = float("inf")
    report["per_layer"] = [
        {"name": "fc", "precision": "fp8", "cosine": 1.0, "snr_db": "inf"},
        {"name": "fc2", "precision": "nvfp4", "cosine": None, "snr_db": None, "finite": False},
    ]
    report["timings"] = {"quantize_s": np.float64(3.25)}
    report["quantizers"] = {"weight": np.int64(37)}
    json_path, md_path, html_path = qr.write_reports(report, tmp_path)
    text = json_path.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["metrics"]["fake-quant"]["pooler_output"]["snr_db"] == "inf"
    assert data["timings"] == {"quantize_s": 3.25} and data["quantizers"] == {"weight": 37}
    md = md_path.read_text()
    assert "| fake-quant | pooler_output | 0.999377 | ∞ |" in md
    assert "| 0 | fc | fp8 | 1.000000 | ∞ |" in md
    assert "| 1 | fc2 | nvfp4 | not finite | not finite |" in md
    assert html_path.read_text().count("data:image/png;base64,") == 1  # the per-layer plot skips the inf point


def test_write_reports(tmp_path, sample):
    paths = qr.write_reports(sample, tmp_path / "run")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.html", "report.json", "report.md"]
    assert json.loads(paths[0].read_text()) == sample  # report.json is the single source
    assert paths[1].read_text() == qr.render_markdown(sample)
    assert paths[2].read_text().count("data:image/png;base64,") == 3


def test_write_reports_failure_leaves_previous_files(tmp_path, sample, monkeypatch):
    qr.write_reports(_minimal(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(report):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr("quantkit.report.document.render_html", broken)
    with pytest.raises(RuntimeError, match="renderer broke"):
        qr.write_reports(sample, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_build_error_histogram():
    h = qr.build_error_histogram([0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.5, 1.0], bins=4)
    assert h["bin_edges"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert h["counts"] == [1, 0, 1, 2]
    assert (h["numel"], h["nonfinite"], h["quantity"]) == (4, 0, "candidate - reference")
    h = qr.build_error_histogram([[1.0, 2.0]], [[1.0, float("nan")]], bins=2)
    assert (sum(h["counts"]), h["nonfinite"], h["bin_edges"]) == (1, 1, [-1.0, 0.0, 1.0])
    assert len(qr.build_error_histogram([1.0] * 10, [1.5] * 10)["counts"]) == 50
    with pytest.raises(ValueError, match=r"reference \(2,\) vs candidate \(3,\)"):
        qr.build_error_histogram([0.0, 0.0], [0.0, 0.0, 0.0])


def test_plots_have_their_panels(sample):
    per_layer = qr.plot_per_layer(sample)
    assert len(per_layer.axes) == 2
    assert [t.get_text() for t in per_layer.axes[1].get_xticklabels()][:2] == [
        "0 encoder.layer.0.attention.self.query",
        "1 encoder.layer.0.attention.self.key",
    ]
    hist = qr.plot_error_histograms(sample)
    assert [ax.get_title(loc="left") for ax in hist.axes if ax.get_visible()] == ["last_hidden_state", "pooler_output"]
    cov = qr.plot_coverage(sample)
    assert [t.get_text() for t in cov.axes[0].get_yticklabels()] == ["nvfp4", "fp8", "fp16", "unquantized"]
