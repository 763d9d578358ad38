"""Accuracy and coverage reports: report.json is the single source; report.md and a self-contained
report.html (inline CSS, matplotlib plots as base64 PNG) are rendered from it and nothing else.

The report is laid out once as sections of tables, text and plots (`report_sections`); Markdown,
HTML and the notebook (notebooks/accuracy_report.ipynb) each render those same sections. Every
section but the title is optional: what the report lacks is shown as "not measured".
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.metrics import Metrics, Thresholds, as_float64
from quantkit.outdir import atomic_write_json, atomic_write_text

SCHEMA = "quantkit.report/1"
# Runtimes a report is expected to speak of, in this order; any other present is listed after them.
RUNTIMES = ("fake-quant", "onnxruntime", "tensorrt")
NOT_MEASURED = "not measured"
PRECISION_ORDER = ("nvfp4", "fp4", "fp8", "int8", "int4", "fp16", "bf16", "fp32", "unquantized", "skip")
PRECISION_COLORS = {
    "nvfp4": "#7b3294",
    "fp4": "#7b3294",
    "fp8": "#d95f02",
    "int8": "#e7a600",
    "int4": "#a6761d",
    "fp16": "#1b9e77",
    "bf16": "#66a61e",
    "fp32": "#4d6b9a",
    "unquantized": "#4d6b9a",
    "skip": "#999999",
}
RUNTIME_COLORS = {"fake-quant": "#d95f02", "onnxruntime": "#1f78b4", "tensorrt": "#33a02c"}
# CSS pixels per inch of figure: a figure of 11 in shows 1100 px wide; PNGs are stored at twice that.
_CSS_DPI = 100
_PNG_DPI = 200


# --------------------------------------------------------------------------------------------------
# Error histograms (stored in report.json under error_histograms/<runtime>/<output>)


def histogram_of_errors(errors: Any, bins: int = 50) -> dict[str, Any]:
    """Histogram of signed errors over `bins` equal bins symmetric about 0; non-finite values are counted apart."""
    e = as_float64(errors).reshape(-1)
    finite = np.isfinite(e)
    nonfinite = int(e.size - finite.sum())
    e = e[finite]
    limit = float(np.abs(e).max()) if e.size else 0.0
    if limit == 0.0:
        limit = 1.0  # all errors zero: one centred bin still shows where they are
    counts, edges = np.histogram(e, bins=bins, range=(-limit, limit))
    return {
        "quantity": "candidate - reference",
        "bin_edges": [float(x) for x in edges],
        "counts": [int(x) for x in counts],
        "numel": int(e.size + nonfinite),
        "nonfinite": nonfinite,
    }


def build_error_histogram(reference: Any, candidate: Any, bins: int = 50) -> dict[str, Any]:
    """`error_histograms` entry for one output: {"bin_edges": [bins+1], "counts": [bins], ...}."""
    r, c = as_float64(reference), as_float64(candidate)
    if r.shape != c.shape:
        raise ValueError(f"shape mismatch: reference {r.shape} vs candidate {c.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        return histogram_of_errors(c - r, bins)


# --------------------------------------------------------------------------------------------------
# Reading and writing


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if not isinstance(report, dict):
        raise TypeError(f"{path}: a report is a JSON object, got {type(report).__name__}")
    return report


def _json_safe(obj: Any) -> Any:
    # Strict JSON has no Infinity/NaN (browsers and jq reject them): write them as "inf", "-inf", "nan".
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Metrics):
        return obj.to_dict()
    if isinstance(obj, np.generic):  # numpy scalars: plain Python numbers, not their str()
        return _json_safe(obj.item())
    return obj


def write_reports(report: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write report.json, then report.md and report.html rendered from it; each file atomically."""
    out = Path(out_dir)
    data = _json_safe(report)
    md, page = render_markdown(data), render_html(data)  # render first: a failure writes nothing
    return [
        atomic_write_json(out / "report.json", data),
        atomic_write_text(out / "report.md", md),
        atomic_write_text(out / "report.html", page),
    ]


# --------------------------------------------------------------------------------------------------
# Formatting


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(v: Any, spec: str) -> str:
    x = _num(v)
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if math.isnan(x):
        return "NaN"
    return format(x, spec)


def fmt_int(v: Any) -> str:
    x = _num(v)
    return "—" if x is None else f"{int(x):,}"


def fmt_bytes(v: Any) -> str:
    x = _num(v)
    if x is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def fmt_percent(v: Any) -> str:
    x = _num(v)
    return "—" if x is None else f"{100 * x:.1f}%"


def _text(v: Any) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ", ".join(_text(x) for x in v) or "—"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_text(x)}" for k, x in v.items()) or "—"
    return str(v)


# --------------------------------------------------------------------------------------------------
# The document: sections of blocks, each rendered to Markdown and to HTML


def _md_cell(s: str) -> str:
    # "|" would split the cell; "<" before a letter could open an HTML tag ("cosine 0.98 < 0.99" stays).
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)


@dataclass
class Paragraph:
    text: str
    kind: str = "text"  # text | muted | warn

    def markdown(self) -> str:
        text = _md_cell(self.text)
        return f"_{text}_" if self.kind == "muted" else text

    def html(self) -> str:
        return f'<p class="{self.kind}">{html.escape(self.text)}</p>'


@dataclass
class BulletList:
    items: list[str]
    kind: str = "text"

    def markdown(self) -> str:
        return "\n".join(f"- {_md_cell(i)}" for i in self.items)

    def html(self) -> str:
        lis = "".join(f"<li>{html.escape(i)}</li>" for i in self.items)
        return f'<ul class="{self.kind}">{lis}</ul>'


@dataclass
class Banner:
    """The verdict: passed True/False, or None when the report was not judged."""

    passed: bool | None
    details: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {True: "PASSED", False: "FAILED", None: "NOT JUDGED"}[self.passed]

    def markdown(self) -> str:
        lines = [f"**{self.label}**"]
        lines += [f"- {_md_cell(d)}" for d in self.details]
        return "\n".join(lines)

    def html(self) -> str:
        cls = {True: "pass", False: "fail", None: "unknown"}[self.passed]
        items = "".join(f"<li>{html.escape(d)}</li>" for d in self.details)
        return (
            f'<div class="banner {cls}"><strong>{self.label}</strong>'
            + (f"<ul>{items}</ul>" if items else "")
            + "</div>"
        )


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices
    wide: set[int] = field(default_factory=set)  # HTML: columns given a minimum width (long text)
    row_ids: list[str] | None = None  # HTML anchors, one per row
    row_classes: list[str] | None = None
    collapse_after: int | None = None  # HTML: fold into <details> beyond this many rows

    def markdown(self) -> str:
        head = "| " + " | ".join(_md_cell(c) for c in self.columns) + " |"
        rule = "|" + "|".join("---:" if i in self.numeric else "---" for i in range(len(self.columns))) + "|"
        body = ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join([head, rule, *body])

    def html(self) -> str:
        def cell(tag: str, i: int, text: str) -> str:
            classes = " ".join(c for c, cols in (("num", self.numeric), ("wide", self.wide)) if i in cols)
            cls = f' class="{classes}"' if classes else ""
            return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

        head = "".join(cell("th", i, c) for i, c in enumerate(self.columns))
        body = []
        for n, row in enumerate(self.rows):
            attrs = ""
            if self.row_ids:
                attrs += f' id="{html.escape(self.row_ids[n])}"'
            if self.row_classes and self.row_classes[n]:
                attrs += f' class="{html.escape(self.row_classes[n])}"'
            body.append(f"<tr{attrs}>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>")
        table = f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
        if self.collapse_after is not None and len(self.rows) > self.collapse_after:
            return f"<details><summary>Show all {len(self.rows)} rows</summary>{table}</details>"
        return table


@dataclass
class Plot:
    """A figure made on demand by `build`; `hover` gives a tooltip per x index (per-layer plot)."""

    key: str
    caption: str
    build: Callable[[], Any]
    hover: list[tuple[str, str]] | None = None  # (anchor id, tooltip) per x index
    page: str = "report.html"  # where Markdown readers find the rendered plot

    def markdown(self) -> str:
        return f"_Plot ({self.caption}): see {self.page}._"

    def html(self) -> str:
        fig = self.build()
        if fig is None:
            return Paragraph(f"{self.caption}: {NOT_MEASURED}.", "muted").html()
        width, height = (round(v * _CSS_DPI) for v in fig.get_size_inches())
        png = base64.b64encode(figure_png(fig)).decode("ascii")
        usemap = f' usemap="#map-{self.key}"' if self.hover else ""
        img = (
            f'<img src="data:image/png;base64,{png}" width="{width}" height="{height}"'
            f' alt="{html.escape(self.caption)}"{usemap}>'
        )
        area_map = self._image_map(fig, width, height) if self.hover else ""
        return f'<figure class="plot">{img}{area_map}<figcaption>{html.escape(self.caption)}</figcaption></figure>'

    def _image_map(self, fig: Any, width: int, height: int) -> str:
        # One column per x index, spanning all axes, so hovering anywhere above a point names it.
        # Positions are read from the layout of the last draw, the PNG's (a redraw at another dpi
        # would move the axes by a few pixels).
        axes = fig.axes
        top = max(ax.get_position().y1 for ax in axes)
        bottom = min(ax.get_position().y0 for ax in axes)
        ax = axes[-1]
        pos = ax.get_position()

        def x_css(x: float) -> float:
            frac = ax.transAxes.inverted().transform(ax.transData.transform((x, 0.0)))[0]
            return (pos.x0 + frac * pos.width) * width

        y0, y1 = round((1 - top) * height), round((1 - bottom) * height)
        areas = []
        for i, (anchor, title) in enumerate(self.hover):
            x0, x1 = round(x_css(i - 0.5)), round(x_css(i + 0.5))
            t = html.escape(title)
            areas.append(
                f'<area shape="rect" coords="{x0},{y0},{x1},{y1}" href="#{html.escape(anchor)}" title="{t}" alt="{t}">'
            )
        return f'<map name="map-{self.key}">{"".join(areas)}</map>'


Block = Paragraph | BulletList | Banner | Table | Plot


@dataclass
class Section:
    title: str
    blocks: list[Block]
    anchor: str = ""


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


def _thresholds(report: Mapping[str, Any]) -> Thresholds | None:
    th = report.get("thresholds")
    try:
        return Thresholds.from_dict(th) if isinstance(th, Mapping) else None
    except (KeyError, ValueError, TypeError):
        return None


def _ordered(keys: Sequence[str], first: Sequence[str]) -> list[str]:
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


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


# --------------------------------------------------------------------------------------------------
# Markdown and HTML


def render_markdown(report: Mapping[str, Any]) -> str:
    return sections_markdown(report_sections(report))


def sections_markdown(sections: Sequence[Section]) -> str:
    """Markdown of any document laid out as sections (the report, `compare-recipes`' comparison)."""
    out = []
    for n, s in enumerate(sections):
        out.append(("# " if n == 0 else "## ") + _md_cell(s.title))
        out.extend(b.markdown() for b in s.blocks)
    return "\n\n".join(out) + "\n"


_CSS = """
:root { --fg:#1d232b; --muted:#6b7480; --line:#dde2e8; --bg:#f6f8fa; --pass:#1a7f37; --fail:#cf222e; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:#fff; }
main { max-width:1160px; margin:0 auto; padding:24px 20px 48px; }
h1 { font-size:24px; margin:0 0 14px; }
h2 { font-size:18px; margin:34px 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
nav { font-size:13px; margin:0 0 16px; color:var(--muted); }
nav a { color:#0a5bb5; text-decoration:none; margin-right:14px; }
p { margin:8px 0; } p.muted { color:var(--muted); font-style:italic; }
p.warn, ul.warn { color:#8a4b00; background:#fff8e6; border-left:4px solid #e7a600; padding:8px 12px 8px 28px; }
p.warn { padding-left:12px; }
.banner { border-radius:6px; padding:10px 16px; margin:0 0 14px; color:#fff; }
.banner strong { font-size:18px; letter-spacing:.04em; }
.banner ul { margin:6px 0 0; padding-left:20px; }
.banner.pass { background:var(--pass); } .banner.fail { background:var(--fail); }
.banner.unknown { background:#6b7480; }
.scroll { overflow-x:auto; margin:8px 0; }
table { border-collapse:collapse; font-size:13px; }
th, td { padding:4px 7px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
thead th { background:var(--bg); border-bottom:2px solid var(--line); white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.wide { min-width:12em; }
tbody tr:nth-child(even) { background:#fbfcfd; }
tr.fail td { color:var(--fail); } tr.pass td:last-child { color:var(--pass); font-weight:600; }
tr.muted td { color:var(--muted); font-style:italic; }
tr.total td { font-weight:600; border-top:2px solid var(--line); }
tr:target td { background:#fff3b0; }
figure.plot { margin:12px 0; overflow-x:auto; }
figure.plot img { display:block; max-width:none; }
figcaption { color:var(--muted); font-size:12px; margin-top:4px; }
details summary { cursor:pointer; color:#0a5bb5; margin:8px 0; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page: inline CSS, plots as data: URIs, no script, nothing fetched."""
    return sections_html(
        report_sections(report),
        f"quantkit report: {_recipe_name(report)}",
        f"Rendered from report.json ({_text(report.get('schema'))}) by quantkit.report.",
    )


def sections_html(sections: Sequence[Section], title: str, footer: str) -> str:
    """A self-contained page of any document laid out as sections (see render_html)."""
    body = []
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections[1:] if s.anchor)
    for n, s in enumerate(sections):
        tag = "h1" if n == 0 else "h2"
        body.append(f'<section id="{s.anchor}"><{tag}>{html.escape(s.title)}</{tag}>')
        if n == 0:
            body.append(f"<nav>{nav}</nav>")
        body.extend(b.html() for b in s.blocks)
        body.append("</section>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><main>{''.join(body)}<footer>{html.escape(footer)}</footer></main>"
        "</body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API: no pyplot, no global state, no display needed)


def _figure(width_in: float, height_in: float, **kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_CSS_DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any, dpi: int = _PNG_DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _short_names(names: list[str]) -> list[str]:
    # Drop the dotted prefix every name shares, so tick labels show what differs.
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def plot_per_layer(report: Mapping[str, Any]):
    """Cosine (top) and SNR (bottom) of each layer's output by layer index, points coloured by precision."""
    layers = [layer for layer in (report.get("per_layer") or []) if isinstance(layer, Mapping)]
    if not layers:
        return None
    from matplotlib.lines import Line2D

    n = len(layers)
    names = [_text(layer.get("name")) for layer in layers]
    label_names = n <= 48
    fig = _figure(11, 7.2 if label_names else 5.2)
    ax_cos, ax_snr = fig.subplots(2, 1, sharex=True)
    th = _thresholds(report)
    x = np.arange(n)
    precs = [_text(layer.get("precision")) for layer in layers]
    colors = [PRECISION_COLORS.get(p, "#555555") for p in precs]
    for ax, key, label in ((ax_cos, "cosine", "cosine"), (ax_snr, "snr_db", "SNR (dB)")):
        y = np.array([v if (v := _num(layer.get(key))) is not None else np.nan for layer in layers])
        y_plot = np.where(np.isposinf(y), np.nan, y)  # an exact layer (SNR inf) has no place on the axis
        ax.plot(x, y_plot, color="#9aa4ae", lw=1, zorder=1)
        ax.scatter(x, y_plot, c=colors, s=22 if n <= 60 else max(4.0, 22 * 60 / n), zorder=2)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    if th is not None:
        ax_cos.axhline(th.cosine_min, color="#cf222e", ls="--", lw=1)
        ax_cos.annotate(
            f"min {th.cosine_min}",
            (1, th.cosine_min),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            color="#cf222e",
            fontsize=8,
        )
        if th.snr_min_db is not None:
            ax_snr.axhline(th.snr_min_db, color="#cf222e", ls="--", lw=1)
    fig.suptitle("Per-layer error against the FP32 reference", fontsize=11, x=0.01, ha="left")
    seen = list(dict.fromkeys(precs))
    fig.legend(
        handles=[Line2D([], [], ls="", marker="o", color=PRECISION_COLORS.get(p, "#555555"), label=p) for p in seen],
        loc="outside upper right",
        fontsize=8,
        ncols=len(seen),
        frameon=False,
    )
    ax_snr.set_xlim(-0.5, n - 0.5)
    if label_names:
        ax_snr.set_xticks(x, [f"{i} {s}" for i, s in enumerate(_short_names(names))], rotation=90, fontsize=6.5)
    else:
        ax_snr.set_xlabel("layer index (hover in report.html or see the table for names)")
    return fig


def plot_error_histograms(report: Mapping[str, Any]):
    """One panel per output, the runtimes' error histograms overlaid, counts on a log scale."""
    hists = report.get("error_histograms") or {}
    outputs = list(dict.fromkeys(o for r in hists.values() if isinstance(r, Mapping) for o in r))
    if not outputs:
        return None
    cols = min(3, len(outputs))
    rows = math.ceil(len(outputs) / cols)
    fig = _figure(11, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, output in zip(axes, outputs):
        for runtime in _ordered(list(hists), RUNTIMES):
            h = (hists.get(runtime) or {}).get(output)
            if not isinstance(h, Mapping) or not h.get("counts"):
                continue
            counts = np.asarray(h["counts"], dtype=float)
            edges = np.asarray(h["bin_edges"], dtype=float)
            ax.stairs(
                counts,
                edges,
                label=runtime,
                color=RUNTIME_COLORS.get(runtime),
                lw=1.4,
                fill=runtime == "fake-quant",
                alpha=0.35 if runtime == "fake-quant" else 1.0,
            )
        ax.set_yscale("log")
        ax.set_title(output, fontsize=10, loc="left")
        ax.set_xlabel("candidate − reference")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_ylabel("values")
    for ax in axes[len(outputs) :]:
        ax.set_visible(False)
    return fig


def plot_coverage(report: Mapping[str, Any]):
    """Share of parameters (left) and weight bytes (right) per precision."""
    by = ((report.get("coverage") or {}).get("by_precision")) or {}
    precs = _ordered([p for p in by if isinstance(by[p], Mapping)], PRECISION_ORDER)
    if not precs:
        return None
    fig = _figure(11, 1.1 + 0.38 * len(precs))
    ax_p, ax_b = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(precs))
    colors = [PRECISION_COLORS.get(p, "#555555") for p in precs]
    frac = [100 * (_num(by[p].get("param_fraction")) or 0.0) for p in precs]
    mib = [(_num(by[p].get("weight_bytes")) or 0.0) / (1 << 20) for p in precs]
    ax_p.barh(y, frac, color=colors)
    ax_b.barh(y, mib, color=colors)
    for i, p in enumerate(precs):
        n = _num(by[p].get("layers"))
        layers = "" if n is None else f" · {int(n):,} layer{'' if n == 1 else 's'}"
        ax_p.annotate(f" {frac[i]:.1f}%{layers}", (frac[i], i), va="center", fontsize=8)
        ax_b.annotate(f" {fmt_bytes(by[p].get('weight_bytes'))}", (mib[i], i), va="center", fontsize=8)
    ax_p.set_yticks(y, precs)
    ax_p.invert_yaxis()
    ax_p.set_xlim(0, max(frac + [1.0]) * 1.35)
    ax_b.set_xlim(0, max(mib + [1e-9]) * 1.25)
    ax_p.set_xlabel("share of parameters (%)")
    ax_b.set_xlabel("weight bytes after quantization (MiB)")
    for ax in (ax_p, ax_b):
        ax.grid(True, axis="x", alpha=0.3)
    return fig
