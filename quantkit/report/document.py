"""report.json, the single source every other report file is rendered from: its schema, error
histograms, strict-JSON values, reading it, and writing report.json/.md/.html together.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.metrics import Metrics, as_float64
from quantkit.outdir import atomic_write_json, atomic_write_text
from quantkit.report.markdown import render_markdown
from quantkit.report.page import render_html


SCHEMA = "quantkit.report/1"


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
