"""How report values read: the runtimes and precisions a report speaks of (order, colours) and
the number formatting shared by every rendering (Markdown, HTML, plots, the notebook).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.metrics import Thresholds


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




def _md_cell(s: str) -> str:
    # "|" would split the cell; "<" before a letter could open an HTML tag ("cosine 0.98 < 0.99" stays).
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)


def _thresholds(report: Mapping[str, Any]) -> Thresholds | None:
    th = report.get("thresholds")
    try:
        return Thresholds.from_dict(th) if isinstance(th, Mapping) else None
    except (KeyError, ValueError, TypeError):
        return None


def _ordered(keys: Sequence[str], first: Sequence[str]) -> list[str]:
    return [k for k in first if k in keys] + [k for k in keys if k not in first]
