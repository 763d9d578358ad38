"""What a report says, section by section, read from a report.json dict (`report_sections`):
verdict, accuracy per runtime and output, per-layer error, coverage, calibration, timings, versions.
Markdown, HTML and the notebook all render these same sections.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from quantkit.metrics import Metrics, Thresholds
from quantkit.report.blocks import Banner, Block, BulletList, Paragraph, Plot, Section, Table
from quantkit.report.format import (NOT_MEASURED, PRECISION_ORDER, RUNTIMES, _fmt, _num, _ordered, _text, _thresholds,
                                    fmt_bytes, fmt_int, fmt_percent)
from quantkit.report.plots import plot_coverage, plot_error_histograms, plot_per_layer


def _recipe_name(report: Mapping[str, Any]) -> str:
    return _text((report.get("recipe") or {}).get("name"))


def _metric_row(runtime: str, output: str, d: Mapping[str, Any], th: Thresholds | None) -> tuple[list[str], str]:
    m = Metrics.from_dict({"numel": 0, "finite": True, **d}) if isinstance(d, Mapping) else None
    if m is None or not m.finite:
        reason = (m.reason if m else None) or "no figures"
        return [runtime, output, "not finite", "—", "—", "—", "—", "—", "—", "—", f"fail: {reason}"], "fail"
    if th is not None and m.cosine is not None:
        fails = m.failures(th) if (th.snr_min_db is None or m.snr_db is not None) else ["no SNR"]
        status, cls = ("fail: " + "; ".join(fails), "fail") if fails else ("pass", "pass")
    else:
        status, cls = "—", ""
    p = "" if m.percentiles_exact else " (sampled)"
    return [
        runtime,
        output,
        _fmt(m.cosine, ".6f"),
        _fmt(m.snr_db, ".2f"),
        _fmt(m.mse, ".3e"),
        _fmt(m.rel_l2, ".3e"),
        _fmt(m.max_abs_err, ".3e"),
        _fmt(m.mean_abs_err, ".3e"),
        _fmt(m.median_abs_err, ".3e") + p,
        _fmt(m.p99_abs_err, ".3e") + p,
        status,
    ], cls


def runtime_status(report: Mapping[str, Any], runtime: str) -> str:
    """Why a runtime has no figures: "not available: <why>" / "failed: <why>" as `compare` recorded it."""
    status = (report.get("runtimes") or {}).get(runtime)
    if isinstance(status, Mapping):
        if status.get("error"):
            return f"failed: {status['error']}"
        if status.get("available") is False:
            return f"not available: {status.get('reason') or 'no reason recorded'}"
    return NOT_MEASURED


def _accuracy_section(report: Mapping[str, Any]) -> Section:
    metrics = report.get("metrics") or {}
    th = _thresholds(report)
    rows, classes = [], []
    for runtime in _ordered(list(metrics) + [r for r in RUNTIMES if r not in metrics], RUNTIMES):
        outputs = metrics.get(runtime)
        if not outputs:
            # Why it has no figures goes in the verdict column, which wraps: in a numeric column a long
            # reason would stretch the table and push the figures of the other runtimes off the page.
            rows.append([runtime, "—"] + ["—"] * 8 + [runtime_status(report, runtime)])
            classes.append("muted")
            continue
        for output, d in outputs.items():
            row, cls = _metric_row(runtime, output, d, th)
            rows.append(row)
            classes.append(cls)
    blocks: list[Block] = []
    if th is not None:
        snr = "no SNR gate" if th.snr_min_db is None else f"SNR ≥ {th.snr_min_db} dB"
        blocks.append(
            Paragraph(f"Thresholds: cosine ≥ {th.cosine_min}; {snr}. Reference: FP32 on the held-out samples.")
        )
    else:
        blocks.append(Paragraph(f"Thresholds: {NOT_MEASURED}.", "muted"))
    columns = [
        "runtime",
        "output",
        "cosine",
        "SNR (dB)",
        "MSE",
        "rel L2",
        "max |err|",
        "mean |err|",
        "median |err|",
        "p99 |err|",
        "verdict",
    ]
    blocks.append(Table(columns, rows, numeric=set(range(2, 10)), wide={10}, row_classes=classes))
    agreement = _agreement_table(report, th)
    if agreement is not None:
        blocks.append(Paragraph("Runtimes against each other (`quantkit compare --against`, `quantkit export`):"))
        blocks.append(agreement)
    hists = report.get("error_histograms") or {}
    if any(hists.get(r) for r in hists):
        blocks.append(
            Plot(
                "error_histogram",
                "Error histogram (candidate − reference) per output and runtime, log counts",
                lambda: plot_error_histograms(report),
            )
        )
    else:
        blocks.append(Paragraph(f"Error histogram: {NOT_MEASURED}.", "muted"))
    return Section("Accuracy against the FP32 reference", blocks, "accuracy")


def _agreement_table(report: Mapping[str, Any], th: Thresholds | None) -> Table | None:
    """Rows of report["comparisons"][reference]["metrics"][runtime][output] and onnxruntime_vs_fake_quant."""
    pairs: dict[tuple[str, str], Mapping[str, Any]] = {}
    for reference, entry in (report.get("comparisons") or {}).items():
        if isinstance(entry, Mapping):
            for runtime, outputs in (entry.get("metrics") or {}).items():
                if isinstance(outputs, Mapping):
                    pairs[(reference, runtime)] = outputs
    ort = report.get("onnxruntime_vs_fake_quant")
    if isinstance(ort, Mapping) and ort:
        pairs.setdefault(("fake-quant", "onnxruntime"), ort)
    rows, classes = [], []
    for (reference, runtime), outputs in pairs.items():
        for output, d in outputs.items():
            row, cls = _metric_row(runtime, output, d, th)
            rows.append([reference, *row[:4], row[6], row[-1]])
            classes.append(cls)
    if not rows:
        return None
    columns = ["reference", "runtime", "output", "cosine", "SNR (dB)", "max |err|", "verdict"]
    return Table(columns, rows, numeric={3, 4, 5}, wide={6}, row_classes=classes)


def _per_layer_section(report: Mapping[str, Any]) -> Section:
    layers = [x for x in (report.get("per_layer") or []) if isinstance(x, Mapping)]
    if not layers:
        return Section("Per-layer error", [Paragraph(f"Per-layer error: {NOT_MEASURED}.", "muted")], "per-layer")
    rows, ids, hover = [], [], []
    for i, layer in enumerate(layers):
        name = _text(layer.get("name"))
        prec = _text(layer.get("precision"))
        if layer.get("finite") is False:
            cos = snr = "not finite"
        else:
            cos, snr = _fmt(layer.get("cosine"), ".6f"), _fmt(layer.get("snr_db"), ".2f")
        rows.append([str(i), name, prec, cos, snr])
        ids.append(f"layer-{i}")
        hover.append((f"layer-{i}", f"#{i} {name} ({prec}): cosine {cos}, SNR {snr} dB"))
    return Section(
        "Per-layer error",
        [
            Paragraph(
                "Each quantized layer's output against the FP32 model's at the same point, in execution order: "
                "where error enters and where it grows. Hover a point in report.html to name its layer."
            ),
            Plot("per_layer", "Cosine and SNR by layer index", lambda: plot_per_layer(report), hover=hover),
            Table(
                ["#", "layer", "precision", "cosine", "SNR (dB)"],
                rows,
                numeric={0, 3, 4},
                row_ids=ids,
                collapse_after=40,
            ),
        ],
        "per-layer",
    )


def _coverage_section(report: Mapping[str, Any]) -> Section:
    cov = report.get("coverage") or {}
    by = cov.get("by_precision") or {}
    if not by:
        return Section("Coverage by precision", [Paragraph(f"Coverage: {NOT_MEASURED}.", "muted")], "coverage")
    rows = []
    for prec in _ordered(list(by), PRECISION_ORDER):
        d = by[prec] or {}
        rows.append(
            [
                prec,
                fmt_int(d.get("layers")),
                fmt_int(d.get("params")),
                fmt_percent(d.get("param_fraction")),
                fmt_bytes(d.get("weight_bytes")),
            ]
        )
    rows.append(
        [
            "total",
            fmt_int(sum(int(_num((by[p] or {}).get("layers")) or 0) for p in by)),
            fmt_int(cov.get("total_params")),
            fmt_percent(1.0 if cov.get("total_params") else None),
            fmt_bytes(cov.get("weight_bytes_after")),
        ]
    )
    blocks: list[Block] = [
        Table(
            ["precision", "layers", "params", "share of params", "weight bytes"],
            rows,
            numeric={1, 2, 3, 4},
            row_classes=[""] * (len(rows) - 1) + ["total"],
        )
    ]
    before, after = _num(cov.get("weight_bytes_before")), _num(cov.get("weight_bytes_after"))
    if before and after:
        blocks.append(
            Paragraph(
                f"Weights: {fmt_bytes(before)} before → {fmt_bytes(after)} after "
                f"({before / after:.2f}× smaller; {int(before):,} → {int(after):,} bytes)."
            )
        )
    blocks.append(Plot("coverage", "Share of parameters and weight bytes by precision", lambda: plot_coverage(report)))
    return Section("Coverage by precision", blocks, "coverage")


def _records_table(items: Any, columns: list[str], get: Callable[[Mapping[str, Any]], list[Any]]) -> Table | None:
    rows = [[_text(v) for v in get(x)] for x in (items or []) if isinstance(x, Mapping)]
    return Table(columns, rows) if rows else None


def _key_values(pairs: list[tuple[str, Any]], columns: tuple[str, str] = ("field", "value")) -> Table:
    return Table(list(columns), [[k, _text(v)] for k, v in pairs])


def _compile_check_section(check: Any) -> Section | None:
    """report.json's compile_check (quantkit.verify.compile_check): one row per target."""
    if not isinstance(check, Mapping):
        return None
    verdict = check.get("verdict")
    blocks: list[Block] = [Banner({"passed": True, "failed": False}.get(str(verdict)), [str(f) for f in check.get("failures") or []])]
    label = "TensorRT-RTX" if check.get("backend") == "tensorrt-rtx" else "TensorRT"
    if check.get("skipped"):
        blocks.append(Paragraph(f"Not compiled: {check['skipped']}", "muted"))
        return Section("TensorRT compile check", blocks, "compile")
    how = "ahead of time, for each target," if check.get("backend") == "tensorrt-rtx" else "for this GPU"
    blocks.append(Paragraph(f"{label} {_text(check.get('version'))} parsed {_text(check.get('graph'))} into a strongly "
                            f"typed network and built it {how} with {len(check.get('profiles') or [])} optimization "
                            "profile(s); the engines were measured, not kept, and none was run."))
    rows = []
    for r in check.get("targets") or []:
        if not isinstance(r, Mapping):
            continue
        where = ", ".join(str(t.get("sm")) for t in r.get("targets") or []) or "this GPU"
        by_dtype = ", ".join(f"{k} {v}" for k, v in (r.get("layers_by_dtype") or {}).items())
        rows.append([where, _text(r.get("parsed")), _text(r.get("built")), fmt_bytes(r.get("engine_bytes")),
                     _fmt(r.get("build_seconds"), ".1f"), fmt_int(len(r.get("warnings") or [])),
                     f"{fmt_int(r.get('layers'))} ({by_dtype})" if r.get("parsed") else "-"])
    if rows:
        blocks.append(Table(["target", "parsed", "built", "engine", "seconds", "warnings", "layers by output dtype"],
                            rows, numeric={3, 4, 5}))
    notes = [str(t.get("note")) for r in check.get("targets") or [] if isinstance(r, Mapping)
             for t in r.get("targets") or [] if t.get("stand_in")]
    warns = notes + [str(n) for n in check.get("not_checked") or []] + [str(w) for w in check.get("warnings") or []]
    if warns:
        blocks.append(BulletList(warns, "warn"))
    return Section("TensorRT compile check", blocks, "compile")


def report_sections(report: Mapping[str, Any]) -> list[Section]:
    """The report laid out once; render_markdown, render_html and the notebook all show these."""
    recipe, model = report.get("recipe") or {}, report.get("model") or {}
    passed = report.get("passed")
    details = [str(f) for f in (report.get("failures") or [])]
    head: list[Block] = [Banner(passed if isinstance(passed, bool) else None, details)]
    head.append(
        _key_values(
            [
                ("recipe", recipe.get("name")),
                ("recipe sha256", recipe.get("sha256")),
                ("targets", recipe.get("targets")),
                ("model", model.get("spec")),
                ("model class", model.get("class")),
                ("dtype / device", f"{_text(model.get('dtype'))} / {_text(model.get('device'))}"),
                ("created", report.get("created")),
            ]
        )
    )
    warnings = [str(w) for w in (report.get("warnings") or [])]
    if warnings:
        head.append(BulletList(warnings, "warn"))
    sections = [
        Section(f"quantkit accuracy report: {_recipe_name(report)}", head, "summary"),
        _accuracy_section(report),
        _per_layer_section(report),
        _coverage_section(report),
    ]

    q = report.get("quantizers")
    prot = _records_table(
        report.get("protections"), ["module", "op", "how"], lambda p: [p.get("name"), p.get("op"), p.get("how")]
    )
    attn = _records_table(
        report.get("attention"),
        ["module", "class", "converted", "via", "q", "k", "v", "p"],
        lambda a: [
            a.get("name"),
            a.get("class"),
            a.get("converted"),
            a.get("via"),
            *((a.get("quantizers") or {}).get(k) for k in "qkvp"),
        ],
    )
    quant: list[Block] = []
    if isinstance(q, Mapping) and q:
        keys = ["weight", "input", "bmm", "enabled", "disabled"]
        quant.append(
            Table(
                _ordered(list(q), keys), [[fmt_int(q[k]) for k in _ordered(list(q), keys)]], numeric=set(range(len(q)))
            )
        )
    else:
        quant.append(Paragraph(f"Quantizer counts: {NOT_MEASURED}.", "muted"))
    quant.append(Paragraph("FP32 protections (kept out of low precision):"))
    quant.append(prot or Paragraph("none recorded", "muted"))
    quant.append(Paragraph("Attention matmuls:"))
    quant.append(attn or Paragraph("none recorded", "muted"))
    sections.append(Section("Quantizers, protections and attention", quant, "quantizers"))

    cal = report.get("calibration")
    if isinstance(cal, Mapping) and cal:
        cal_blocks: list[Block] = [
            _key_values(
                [
                    ("path", cal.get("path")),
                    ("source", cal.get("source")),
                    ("samples", fmt_int(cal.get("samples_total"))),
                    ("used for calibration", fmt_int(cal.get("calibration_samples"))),
                    ("held out for evaluation", fmt_int(cal.get("heldout_samples"))),
                    ("synthetic", cal.get("synthetic")),
                ]
            )
        ]
        if cal.get("synthetic"):
            cal_blocks.append(
                Paragraph("Synthetic calibration data: the accuracy figures may not hold on real inputs.", "warn")
            )
    else:
        cal_blocks = [Paragraph(f"Calibration: {NOT_MEASURED}.", "muted")]
    sections.append(Section("Calibration", cal_blocks, "calibration"))

    compile_section = _compile_check_section(report.get("compile_check"))
    if compile_section is not None:
        sections.append(compile_section)

    timings = report.get("timings") or {}
    versions = report.get("versions") or {}
    run: list[Block] = []
    run.append(
        _key_values(
            [(k.removesuffix("_s").replace("_", " "), _fmt(v, ".2f") + " s") for k, v in timings.items()],
            ("stage", "time"),
        )
        if timings
        else Paragraph(f"Timings: {NOT_MEASURED}.", "muted")
    )
    run.append(
        _key_values(list(versions.items()), ("package", "version"))
        if versions
        else Paragraph(f"Versions: {NOT_MEASURED}.", "muted")
    )
    sections.append(Section("Timings and versions", run, "run"))
    return sections
