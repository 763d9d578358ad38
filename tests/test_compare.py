"""`quantkit compare` and `quantkit compare-recipes` on the tiny model of test_export: exit codes 0/1/2,
the printed tables' numbers, report.json entries for ONNX Runtime and for an unavailable TensorRT,
and the side-by-side comparison's weight bytes and metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_export import trust_own_runs  # noqa: F401 (autouse)
from tests.test_export import HERE, save_tiny_run, write_recipe

from quantkit import console
from quantkit.cli import main

TINY = f"{HERE}:tiny_model"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(autouse=True)
def _loud_again():
    yield
    console.set_quiet(False)  # main(["-q", ...]) sets it for the process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A quantize output folder: tiny model, FP8 linears, 20 synthetic samples (2 held out)."""
    return save_tiny_run(tmp_path_factory.mktemp("compare"), "fp8", samples=20)


@pytest.fixture(scope="module")
def exported_dir(run_dir, tmp_path_factory):
    from quantkit.export.onnx_export import export_run

    out = tmp_path_factory.mktemp("exported") / "out"
    shutil.copytree(run_dir, out)
    export_run(out)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    return out


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """{(first cell, second cell): cells} of the rich tables in `text` (one line per row)."""
    rows = {}
    for line in text.splitlines():
        if line.count("│") >= 3:
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            if cells[0]:
                rows[(cells[0], cells[1])] = cells
    return rows


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------------------------------------
# compare


def test_compare_passes_and_records_what_cannot_run(run_copy, capsys):
    before = report_of(run_copy)["metrics"]["fake-quant"]["y"]
    assert main(["compare", str(run_copy), "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    report = report_of(run_copy)
    fq = report["metrics"]["fake-quant"]["y"]
    # Reloaded from modelopt_state.pth, the model gives what quantize measured on the same 2 held-out samples.
    assert fq["numel"] == before["numel"] == 2 * 2 * 8 * 16  # 2 samples of y: [2, 8, 16]
    assert fq["cosine"] == pytest.approx(before["cosine"], abs=1e-7)
    assert fq["cosine"] >= 0.999, f"fake-quant cosine {fq['cosine']}"
    row = table_rows(out)[("fake-quant", "y")]
    assert row[2] == f"{fq['cosine']:.6f}" and row[3] == f"{float(fq['snr_db']):.2f}"
    assert row[4] == f"{fq['mse']:.3e}" and row[-1] == "pass"
    assert "against fp32 on 2 held-out samples (cosine >= 0.99, from the recipe)" in out
    assert out.strip().splitlines()[-1].startswith("PASSED · report: ")

    runtimes = report["runtimes"]
    assert runtimes["fp32"]["available"] and runtimes["fake-quant"]["samples"] == 2
    assert runtimes["onnxruntime"] == {"available": False, "reason": runtimes["onnxruntime"]["reason"],
                                       "samples": 0, "seconds": 0.0, "notes": []}
    assert runtimes["onnxruntime"]["reason"].startswith(f"no model.onnx in {run_copy} (export one with")
    assert runtimes["tensorrt"]["available"] is False
    trt_reason = (f"no model.engine in {run_copy} (build one with" if HAS_TENSORRT else
                  f"TensorRT is not installed here, and there is no model.engine in {run_copy} (on a machine with "
                  f"TensorRT and a GPU: `quantkit build --from {run_copy}`, then compare there)")
    assert runtimes["tensorrt"]["reason"].startswith(trt_reason)
    assert set(report["metrics"]) == {"fake-quant"} and report["passed"] is True and report["failures"] == []
    assert report["compare"]["against"] == "fp32" and report["compare"]["samples"] == 2
    md = (run_copy / "report.md").read_text()
    dashes = "| — " * 9  # output and the eight figures; the reason is the verdict
    assert f"| tensorrt {dashes}| not available: {trt_reason}" in md
    assert f"| onnxruntime {dashes}| not available: no model.onnx" in md
    # In the page the reason sits in the wrapping verdict cell, not in a (no-wrap) figure column.
    assert f'<td class="wide">not available: {trt_reason}' in (run_copy / "report.html").read_text()


def test_compare_runs_onnxruntime_when_exported(exported_dir, capsys):
    assert main(["compare", str(exported_dir), "--device", "cpu", "-q"]) == 0
    report = report_of(exported_dir)
    ort, fq = report["metrics"]["onnxruntime"]["y"], report["metrics"]["fake-quant"]["y"]
    assert ort["numel"] == 512 and ort["cosine"] >= 0.999, f"ORT vs FP32 cosine {ort['cosine']}"
    assert abs(ort["cosine"] - fq["cosine"]) < 1e-5, "ORT is as close to FP32 as the fake-quant model"
    assert report["onnxruntime_vs_fake_quant"]["y"]["cosine"] >= 0.9999
    assert report["runtimes"]["onnxruntime"]["available"] is True and report["runtimes"]["onnxruntime"]["samples"] == 2
    assert len(report["error_histograms"]["onnxruntime"]["y"]["counts"]) == 50
    rows = table_rows(capsys.readouterr().out)
    assert rows[("onnxruntime", "y")][2] == f"{ort['cosine']:.6f}" and rows[("onnxruntime", "y")][-1] == "pass"

    # Against the fake-quant model: ORT agrees to rounding; the report keeps both views.
    assert main(["compare", str(exported_dir), "--against", "fake-quant", "--device", "cpu", "-q"]) == 0
    out = capsys.readouterr().out
    report = report_of(exported_dir)
    agree = report["comparisons"]["fake-quant"]
    assert set(agree["metrics"]) == {"onnxruntime"} and agree["passed"] is True and agree["samples"] == 2
    cos = agree["metrics"]["onnxruntime"]["y"]["cosine"]
    assert cos >= 0.9999, f"ORT vs fake-quant cosine {cos}"
    rows = table_rows(out)
    assert ("fake-quant", "y") not in rows, "the reference is not compared with itself"
    assert rows[("onnxruntime", "y")][2] == f"{cos:.6f}"
    assert "onnxruntime" in report["metrics"], "metrics against FP32 are refreshed whatever --against says"
    md = (exported_dir / "report.md").read_text()
    assert "Runtimes against each other" in md and f"| fake-quant | onnxruntime | y | {cos:.6f} |" in md


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message given where TensorRT is not installed")
def test_tensorrt_engine_without_tensorrt_is_not_available(run_copy, capsys):
    (run_copy / "model.engine").write_bytes(b"not an engine")
    (run_copy / "engine.json").write_text("{}")
    assert main(["compare", str(run_copy), "--device", "cpu", "-q"]) == 0
    reason = report_of(run_copy)["runtimes"]["tensorrt"]["reason"]
    assert reason.startswith("TensorRT is not installed here (import tensorrt:"), reason
    assert table_rows(capsys.readouterr().out)[("tensorrt", "—")][-1].startswith("not available: TensorRT is not")
    for flag in (["--runtime", "fake-quant,tensorrt"], ["--against", "tensorrt"]):
        assert main(["compare", str(run_copy), "--device", "cpu", "-q", *flag]) == 2
        err = capsys.readouterr().err
        assert f"InputError: {flag[0]} tensorrt: not available: TensorRT is not installed here" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_compare_exits_1_when_the_recipes_threshold_is_missed(run_copy, capsys):
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["thresholds"] = {"cosine_min": 0.99999}
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["compare", str(run_copy), "--device", "cpu", "-q"]) == 1
    out = capsys.readouterr().out
    report = report_of(run_copy)
    cos = report["metrics"]["fake-quant"]["y"]["cosine"]
    assert report["passed"] is False and report["thresholds"]["cosine_min"] == 0.99999
    assert report["failures"] == [f"fake-quant/y: cosine {cos:.6f} < 0.99999"]
    assert table_rows(out)[("fake-quant", "y")][-1] == f"FAIL: cosine {cos:.6f} < 0.99999"
    assert out.strip().splitlines()[-1].startswith(f"FAILED: fake-quant/y: cosine {cos:.6f} < 0.99999")
    assert "**FAILED**" in (run_copy / "report.md").read_text()


def test_quantize_exits_1_below_the_recipes_threshold_and_0_above(tmp_path, capsys):
    """The gate a CI uses: the recipe's thresholds (overridable through extends) decide quantize's exit code."""
    base = write_recipe(tmp_path, "fp8")
    strict = tmp_path / "strict.yaml"
    strict.write_text(f"name: strict\nextends: {base}\nthresholds: {{cosine_min: 0.99999}}\n")
    common = ["--model", TINY, "--synthetic", "--max-samples", "10", "--device", "cpu", "-q"]
    assert main(["quantize", "--recipe", str(strict), "--out", str(tmp_path / "strict"), *common]) == 1
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    report = report_of(tmp_path / "strict")
    cos = report["metrics"]["fake-quant"]["y"]["cosine"]
    assert 0.999 < cos < 0.99999, f"fp8 tiny-model cosine {cos}"
    assert report["passed"] is False and report["thresholds"] == {"cosine_min": 0.99999, "snr_min_db": None}
    assert report["failures"] == [f"fake-quant/y: cosine {cos:.6f} < 0.99999"]
    assert verdict.startswith(f"FAILED: fake-quant/y: cosine {cos:.6f} < 0.99999 · results in {tmp_path / 'strict'}/")
    assert "**FAILED**" in (tmp_path / "strict" / "report.md").read_text()
    assert "FAILED" in (tmp_path / "strict" / "report.html").read_text()

    assert main(["quantize", "--recipe", str(base), "--out", str(tmp_path / "base"), *common]) == 0
    report = report_of(tmp_path / "base")
    assert report["passed"] is True and report["thresholds"]["cosine_min"] == 0.99  # the FP8 default
    assert report["metrics"]["fake-quant"]["y"]["cosine"] == pytest.approx(cos, abs=1e-12), "same data, same model"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("PASSED · results in ")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message given where TensorRT is not installed")
def test_against_tensorrt_without_tensorrt_or_engine_says_so(run_copy, capsys):
    before = (run_copy / "report.json").read_bytes()
    assert main(["compare", str(run_copy), "--against", "tensorrt", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"InputError: --against tensorrt: not available: TensorRT is not installed here, and there "
                           f"is no model.engine in {run_copy} (on a machine with TensorRT and a GPU: `quantkit build "
                           f"--from {run_copy}`, then compare there)")
    assert (run_copy / "report.json").read_bytes() == before, "nothing is written for a comparison that cannot run"


def test_unknown_against_exits_2_naming_the_choices(run_copy, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's choices: exit 2 with the usage line
        main(["compare", str(run_copy), "--against", "trt"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "--against" in ln and "invalid choice" in ln)
    assert "'trt'" in line and all(name in line for name in ("fp32", "fake-quant", "onnxruntime", "tensorrt"))
    assert "Traceback" not in err


@pytest.mark.parametrize("damage,expected", [
    ("no-folder", "InputError: {out}-missing: no such folder"),
    ("no-state", "InputError: {out}/modelopt_state.pth: not found"),
    ("corrupt-report", "InputError: {out}/report.json: corrupt report (invalid JSON at line 1 column 2"),
    ("corrupt-state", "InputError: {out}/modelopt_state.pth: cannot be restored onto the model"),
    ("bad-runtime", "InputError: --runtime trt: not a runtime; use fake-quant, onnxruntime, tensorrt"),
])
def test_compare_bad_input_exits_2_with_one_line(run_copy, capsys, damage, expected):
    target = run_copy
    args = []
    if damage == "no-folder":
        target = Path(f"{run_copy}-missing")
    elif damage == "no-state":
        (run_copy / "modelopt_state.pth").unlink()
    elif damage == "corrupt-report":
        (run_copy / "report.json").write_text("{not json")
    elif damage == "corrupt-state":
        (run_copy / "modelopt_state.pth").write_bytes(b"\x00" * 64)
    else:
        args = ["--runtime", "trt"]
    before = (run_copy / "report.json").read_bytes()
    assert main(["compare", str(target), "--device", "cpu", "-q", *args]) == 2
    err = capsys.readouterr().err
    assert expected.format(out=run_copy) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (run_copy / "report.json").read_bytes() == before, "bad input changes nothing"


# ---------------------------------------------------------------------------------------------
# compare-recipes


def test_compare_recipes_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare-recipes", "--recipes", "fp8,nvfp4", "--model", TINY, "--synthetic", "--max-samples", "20",
            "--device", "cpu", "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "comparison.json").read_text())
    assert data["schema"] == "quantkit.comparison/1" and data["calibration"]["samples_total"] == 20
    fp8, nvfp4 = data["recipes"]
    assert (fp8["name"], nvfp4["name"]) == ("fp8", "nvfp4")
    # 12 linears of 32x32/32x64/64x32 (16,832 params) in the format, the head (528) in FP16 ("*head" rule).
    for e in (fp8, nvfp4):
        assert e["coverage"]["total_params"] == 17_360 and e["weight_bytes_before"] == 17_360 * 4
        assert e["coverage"]["by_precision"]["fp16"]["params"] == 528 and e["heldout_samples"] == 2
    assert fp8["coverage"]["by_precision"]["fp8"]["layers"] == 12
    assert fp8["weight_bytes_after"] == 16_832 * 1 + 528 * 2 == 17_888
    assert nvfp4["weight_bytes_after"] == 16_832 * 9 // 16 + 528 * 2 == 10_524  # 4 bits + an FP8 scale per 16
    assert nvfp4["compression"] == pytest.approx(69_440 / 10_524)
    assert fp8["worst"]["cosine"] >= 0.999, fp8["worst"]
    assert 0.99 <= nvfp4["worst"]["cosine"] < fp8["worst"]["cosine"], nvfp4["worst"]
    assert nvfp4["thresholds"]["cosine_min"] == 0.97 and fp8["thresholds"]["cosine_min"] == 0.99
    assert fp8["passed"] and nvfp4["passed"] and data["passed"]

    md = (out / "comparison.md").read_text()
    c = fp8["worst"]["cosine"]
    assert (f"| fp8 | {c:.6f} | {fp8['worst']['snr_db']:.2f} | {fp8['worst']['mse']:.3e} | 67.81 KiB | 17.47 KiB "
            f"| 3.88× | cosine ≥ 0.99 | pass |") in md
    assert "| nvfp4 | 97.0% (12) | — | 3.0% (1) | 67.81 KiB | 10.28 KiB |" in md
    assert "every recipe: calibrated on SYNTHETIC data" in md
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "<script" not in page
    rows = table_rows(printed)
    assert rows[("fp8", "fp8 97.0% · fp16 3.0%")][2:6] == ["67.81 KiB -> 17.47 KiB (3.88x)", f"{c:.6f}",
                                                           f"{fp8['worst']['snr_db']:.2f}", f"{fp8['worst']['mse']:.3e}"]
    assert rows[("nvfp4", "nvfp4 97.0% · fp16 3.0%")][-1] == "pass"


def test_compare_recipes_exits_1_only_with_gate(tmp_path, capsys):
    strict = tmp_path / "strict.yaml"
    strict.write_text(f"name: strict\nextends: {write_recipe(tmp_path, 'fp8')}\nthresholds: {{cosine_min: 0.99999}}\n")
    args = ["compare-recipes", "--recipes", str(strict), "--model", TINY, "--synthetic", "--max-samples", "10",
            "--device", "cpu", "--out", str(tmp_path / "cmp"), "-q"]
    assert main([*args, "--gate"]) == 1
    printed = capsys.readouterr().out
    (entry,) = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["recipes"]
    assert entry["passed"] is False and entry["failures"][0].startswith("fake-quant/y: cosine 0.99")
    assert re.search(r"strict .* fail: fake-quant/y: cosine 0\.99\d+ < 0\.99999", printed)
    assert "**FAILED**" in (tmp_path / "cmp" / "comparison.md").read_text()
    # Without --gate the comparison is information: the failed recipe is in the table, the exit code is 0.
    assert main(args) == 0
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["passed"] is False


@pytest.mark.parametrize("recipes,expected", [
    ("fp8,nope", "RecipeError: nope: no such recipe file or shipped recipe"),
    ("fp8,fp8", "InputError: --recipes: fp8 given more than once"),
    (" , ", "InputError: --recipes: give at least one recipe"),
])
def test_compare_recipes_bad_input_exits_2(tmp_path, capsys, recipes, expected):
    assert main(["compare-recipes", "--recipes", recipes, "--model", TINY, "--synthetic",
                 "--out", str(tmp_path / "cmp"), "-q"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


def test_torch_fp8_runtime_needs_a_gpu(run_copy, capsys):
    """On the CPU the real-FP8 runtime is recorded as not available, and asking for it is exit 2."""
    assert main(["compare", str(run_copy), "--device", "cpu", "-q"]) == 0
    status = report_of(run_copy)["runtimes"]["torch-fp8"]
    assert status["available"] is False
    assert status["reason"].startswith("runs FP8 GEMMs on the GPU (torch._scaled_mm): needs --device cuda")
    capsys.readouterr()
    assert main(["compare", str(run_copy), "--runtime", "torch-fp8", "--device", "cpu", "-q"]) == 2
    assert "InputError: --runtime torch-fp8: not available: runs FP8 GEMMs on the GPU" in capsys.readouterr().err


def test_saved_recipe_carries_the_resolved_gate(run_dir):
    """recipe.yaml records the threshold in force at quantize time, so a later default cannot flip the verdict."""
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["thresholds"]["cosine_min"] == 0.99  # FP8 recipe, none set: the FP8/INT8 default
