"""The report's plots, made with matplotlib's object API (no pyplot, no global state, no display):
per-layer error, error histograms per output and runtime, coverage by precision.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantkit.report.format import PRECISION_COLORS, PRECISION_ORDER, RUNTIMES, RUNTIME_COLORS, _num, _ordered, _text, _thresholds, fmt_bytes


# CSS pixels per inch of figure: a figure of 11 in shows 1100 px wide; PNGs are stored at twice that.
_CSS_DPI = 100
_PNG_DPI = 200


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
