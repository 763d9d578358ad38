"""report.json's content, rendered in this one place from the stages' typed results.

`quantize_report(QuantizeResult)` is the document a quantization starts; `reference_sections`,
`compile_check_sections` and `comparison_sections` are what the ONNX Runtime reference, the compile
check and `compare` put into it. `write_quantize` and `record` are the only writers of report.json
(through `document.write_reports`): a stage hands its result over and never edits the dict itself.
The stages sit above this module, so their results are read by attribute, not imported.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Mapping

from quantkit.metrics import Metrics, Thresholds, judge
from quantkit.report.document import SCHEMA, load_report, write_reports

def _metrics(metrics: Mapping[str, Metrics]) -> dict[str, Any]:
    return {k: m.to_dict() for k, m in metrics.items()}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The document a quantization starts (ptq.QuantizeResult)


def quantize_report(result: Any) -> dict[str, Any]:
    """report.json of a `quantize` run, from its ptq.QuantizeResult (extras: placement, data_parallel)."""
    recipe, plan = result.recipe, result.plan
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": result.created,
        "versions": dict(result.versions),
        "recipe": {"name": recipe.name, "sha256": recipe.sha256(), "targets": list(recipe.targets)},
        "model": dict(result.model_info),
        "calibration": dict(result.calibration),
        "coverage": plan.coverage(),
        "protections": plan.protections,
        "attention": plan.attention,
        "quantizers": dict(result.quantizers),
        "metrics": {"fake-quant": _metrics(result.metrics)},
        "error_histograms": {"fake-quant": result.histograms},
        "thresholds": result.thresholds.to_dict(),
        "passed": not result.failures,
        "failures": list(result.failures),
        "timings": dict(result.timings),
        "warnings": list(result.warnings),
        "per_layer": list(result.per_layer),
    }
    if result.placement is not None:
        report["placement"] = result.placement
    if result.data_parallel is not None:
        report["data_parallel"] = result.data_parallel
    return report


def write_quantize(result: Any, out_dir: str | os.PathLike) -> list[Path]:
    """report.json/.md/.html of a run being saved: a QuantizeResult's, rendered; a reloaded
    ptq.QuantizedRun's, the document its folder holds."""
    return write_reports(result.report, out_dir)


# ---------------------------------------------------------------------------------------------
# What later stages add to it


def reference_sections(result: Any) -> dict[str, Any]:
    """The ONNX Runtime reference (verify.reference.ReferenceResult): ORT vs FP32 into `metrics`, ORT vs
    fake-quant end to end and per block, and its run (`onnxruntime`)."""
    return {
        "metrics": {"onnxruntime": _metrics(result.vs_fp32)},
        "onnxruntime_vs_fake_quant": _metrics(result.vs_fake_quant),
        "onnxruntime_vs_fake_quant_per_block": _metrics(result.per_block or {}),
        "onnxruntime": {"verdict": result.verdict, "cosine_min": result.cosine_min, "passed": bool(result),
                        "graph": result.graph, "samples": result.samples, "verification_copy": list(result.notes),
                        "graph_optimization": "disabled (ORT_DISABLE_ALL)", "seconds": round(result.seconds, 2)},
    }


def _apply_reference(report: dict[str, Any], result: Any) -> None:
    sections = reference_sections(result)
    report.setdefault("metrics", {}).update(sections.pop("metrics"))
    report.setdefault("onnxruntime", {}).update(sections.pop("onnxruntime"))
    report.update(sections)


def compile_check_sections(check: Any) -> dict[str, Any]:
    """The compile check (verify.compile_check.CompileCheck), replacing any earlier one."""
    return {"compile_check": check.to_dict()}


def _apply_compile_check(report: dict[str, Any], check: Any) -> None:
    report.update(compile_check_sections(check))


def _apply_comparison(report: dict[str, Any], comparison: Any) -> None:
    """`compare` (compare.Comparison): each runtime's metrics and histograms against FP32 (a runtime tried
    and not run loses its older figures, which would describe another run), runtime status, the
    comparison against another reference, and the report's gate re-judged over every runtime measured."""
    table = report.setdefault("metrics", {})
    hists = report.setdefault("error_histograms", {})
    for name in comparison.runtimes:  # every runtime it tried, in compare's order
        if name == "fp32":  # the reference the others are measured against
            continue
        if name in comparison.vs_fp32:
            table[name] = _metrics(comparison.vs_fp32[name])
            hists[name] = comparison.histograms[name]
        elif name in comparison.runtimes:
            table.pop(name, None)
            hists.pop(name, None)
    if comparison.ort_vs_fake_quant is not None:
        report["onnxruntime_vs_fake_quant"] = _metrics(comparison.ort_vs_fake_quant)
    report.setdefault("runtimes", {}).update({n: s.to_dict() for n, s in comparison.runtimes.items()})
    if comparison.against != "fp32":
        report.setdefault("comparisons", {})[comparison.against] = {
            "samples": comparison.samples,
            "metrics": {n: _metrics(ms) for n, ms in comparison.metrics.items()}, **comparison.verdict.to_dict()}
    thresholds: Thresholds = comparison.thresholds
    gate = judge({n: {k: Metrics.from_dict(d) for k, d in outs.items()} for n, outs in table.items() if outs},
                 thresholds)
    failures = list(gate.failures) + [f"{n}: failed: {s.error}" for n, s in comparison.runtimes.items() if s.error]
    report.update(thresholds=thresholds.to_dict(), passed=not failures, failures=failures)
    report["compare"] = {"against": comparison.against, "samples": comparison.samples,
                         "seconds": round(comparison.seconds, 2), "created": now()}


_APPLY = {"reference": _apply_reference, "compile_check": _apply_compile_check, "comparison": _apply_comparison}


def record(out_dir: str | os.PathLike, stage: str, result: Any, *, pages: bool = True) -> dict[str, Any] | None:
    """Put one later stage's result (`stage`: reference, compile_check, comparison) into OUT/report.json
    and write it back, with report.md/.html re-rendered unless `pages` is False. A folder without a
    report.json is left as it is (None); returns the document written."""
    from quantkit.outdir import atomic_write_json
    from quantkit.report.document import _json_safe

    path = Path(out_dir) / "report.json"
    if not path.is_file():
        return None
    report = load_report(path)
    _APPLY[stage](report, result)
    if pages:
        write_reports(report, out_dir)
    else:
        atomic_write_json(path, _json_safe(report))
    return report
