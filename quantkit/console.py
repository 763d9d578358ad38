"""Terminal output: the plan table, the coverage summary and result tables, and --quiet.

Results are printed last as short tables (rich); progress bars come from the stages themselves
(tqdm) and are silenced by `set_quiet(True)`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def is_quiet() -> bool:
    return _state["quiet"]


# What ModelOpt says on import that --quiet is not asked to repeat (its version check of transformers).
_QUIET_WARNINGS = (r"transformers .* is not tested with current version of modelopt",)


def quiet_warnings():
    """A block in which --quiet also hides ModelOpt's own import-time warnings; the filters are
    restored when it ends (nothing outlives the command)."""
    import contextlib
    import warnings

    if not is_quiet():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    return stack


def console() -> Console:
    # A wide console when piped, so tables are not squeezed in logs and tests.
    return Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)


def info(message: str) -> None:
    if not is_quiet():
        # Messages are text, not rich markup: TensorRT's "[pass.cpp:1500: run_passes]" must print as written.
        console().print(escape(message), highlight=False)


def warn(message: str) -> None:
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(
        f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plan_table(plan_dict: dict[str, Any]) -> Table:
    t = Table(title=f"plan: recipe {plan_dict['recipe']['name']}", title_justify="left")
    for col in ("layer", "type", "role", "shape", "params", "precision", "rule"):
        t.add_column(col, overflow="fold")
    for row in plan_dict["layers"]:
        prec = row["precision"]
        if row["weights"] and row["activations"] and row["weights"] != row["activations"]:
            prec = f"w:{row['weights']} a:{row['activations']}"
        elif row["weights"] and not row["activations"]:
            prec = f"w:{row['weights']} (weight-only)"
        rule = row["rule"] + (f" — {row['note']}" if row.get("note") else "")
        role = row.get("role") or "?"
        t.add_row(row["name"], row["type"], role, "x".join(map(str, row["shape"])), f"{row['params']:,}", prec, rule)
    return t


def coverage_table(coverage: dict[str, Any]) -> Table:
    t = Table(title="coverage by precision", title_justify="left")
    for col in ("precision", "layers", "params", "% of params", "% of linear params", "weight bytes"):
        t.add_column(col, justify="right" if col != "precision" else "left")
    for prec, row in coverage["by_precision"].items():
        t.add_row(prec, str(row["layers"]), f"{row['params']:,}", f"{100 * row['param_fraction']:.1f}%",
                  f"{100 * row['linear_param_fraction']:.1f}%", _fmt_bytes(row["weight_bytes"]))
    if "unquantized" not in coverage["by_precision"]:
        # Shown even when empty: "nothing left as the model has it" is worth reading, not guessing.
        t.add_row("unquantized", "0", "0", "0.0%", "0.0%", _fmt_bytes(0))
    t.caption = (f"weights: {_fmt_bytes(coverage['weight_bytes_before'])} before -> "
                 f"{_fmt_bytes(coverage['weight_bytes_after'])} after")
    return t


def rows_table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*[str(c) for c in row])
    return t


def metrics_table(metrics: dict[str, dict[str, dict[str, Any]]], cosine_min: float | None = None) -> Table:
    t = Table(title="accuracy on held-out samples (vs FP32 reference)", title_justify="left")
    for col in ("runtime", "output", "cosine", "SNR dB", "rel L2", "MSE", "max abs", "pass"):
        t.add_column(col, justify="left" if col in ("runtime", "output") else "right")
    for runtime, outputs in metrics.items():
        for out, m in outputs.items():
            if not m.get("finite", True):
                t.add_row(runtime, out, "NaN/Inf", "-", "-", "-", "-", "FAIL")
                continue
            ok = "" if cosine_min is None else ("yes" if m["cosine"] >= cosine_min else "NO")
            t.add_row(runtime, out, f"{m['cosine']:.6f}", f"{float(m['snr_db']):.2f}", f"{float(m['rel_l2']):.4g}",
                      f"{m['mse']:.4g}", f"{m['max_abs_err']:.4g}", ok)
    return t


def show(*renderables: Any) -> None:
    c = console()
    for r in renderables:
        c.print(r)
