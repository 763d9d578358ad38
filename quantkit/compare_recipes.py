"""`quantkit compare-recipes`: one model quantized under several recipes, side by side.

Every recipe sees the same calibration samples, the same copy of the FP32 weights and one FP32
reference (computed once per held-out split), so the figures differ only by the recipe: coverage
per precision, weight bytes before/after (from the plan), cosine/SNR/MSE on the held-out samples,
and each recipe's own pass/fail. comparison.json is the source; comparison.md and comparison.html
are rendered from it with quantkit.report's building blocks.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from quantkit import console
from quantkit.errors import InputError, QuantkitError

SCHEMA = "quantkit.comparison/1"
FILES = ("comparison.json", "comparison.md", "comparison.html")


@dataclasses.dataclass
class RecipeComparison:
    """comparison.json's content; truthy when every recipe ran and passed its own thresholds."""

    data: dict[str, Any]

    @property
    def recipes(self) -> list[dict[str, Any]]:
        return self.data["recipes"]

    def __bool__(self) -> bool:
        return all(r.get("passed") for r in self.recipes)


def parse_recipes(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise InputError("--recipes: give at least one recipe, e.g. --recipes balanced,fp8,nvfp4")
    return specs


def default_out(model_spec: str | None) -> Path:
    name = Path(model_spec).name if model_spec else "minilm"
    return Path("runs") / f"compare-{name.replace(':', '-').replace('/', '-')}"


def _worst(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The worst figure over the outputs: lowest cosine and SNR, highest MSE (None when any is not finite)."""
    values = list(metrics.values())
    if not values or not all(m.get("finite") for m in values):
        return {"cosine": None, "snr_db": None, "mse": None, "finite": False}
    snr = [float(m["snr_db"]) for m in values]  # "inf" strings for an exact output
    return {"cosine": min(m["cosine"] for m in values), "snr_db": min(snr), "mse": max(m["mse"] for m in values),
            "finite": True}


def _entry(spec: str, recipe, report: Mapping[str, Any]) -> dict[str, Any]:
    cov = report["coverage"]
    before, after = cov["weight_bytes_before"], cov["weight_bytes_after"]
    metrics = report["metrics"]["fake-quant"]
    return {
        "name": recipe.name, "spec": spec, "source": recipe.source, "sha256": recipe.sha256(),
        "targets": list(recipe.targets),
        "coverage": cov, "weight_bytes_before": before, "weight_bytes_after": after,
        "compression": before / after if after else None,
        "metrics": metrics, "worst": _worst(metrics),
        "thresholds": report["thresholds"], "passed": report["passed"], "failures": report["failures"],
        "quantizers": report.get("quantizers"), "warnings": report.get("warnings", []),
        "timings": report.get("timings", {}),
    }


def compare_recipes(specs: Sequence[str], model_spec: str | None, *, dtype: str = "fp32",
                    device: str | torch.device = "cpu", calib: str | None = None, synthetic: bool = False,
                    max_samples: int | None = None, batch_size: int | None = None) -> RecipeComparison:
    """Quantize `model_spec` under each recipe (fake-quant PyTorch) and collect the side-by-side figures.

    A recipe that fails to quantize (e.g. a plan ModelOpt rejects) is recorded with its error and
    the others still run; bad input (an unknown recipe, too few samples) raises before any work.
    """
    from quantkit import ptq
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    recipes = [(spec, load_recipe(spec)) for spec in specs]
    names = [r.name for _, r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--recipes: {', '.join(twice)} given more than once")
    device = torch.device(device)
    loaded = load_model(model_spec)
    calibration = ptq.open_calibration(loaded, calib, synthetic, max_samples)
    batch_size = batch_size or recipes[0][1].calibration.batch_size
    console.info(f"{len(recipes)} recipes · model {loaded.spec} · {dtype} on {device} · {len(calibration)} samples "
                 f"from {calibration.info().get('source')}" + (" (SYNTHETIC)" if calibration.synthetic else ""))

    # One FP32 reference per held-out split (recipes may set different heldout_fraction), on weights
    # that no recipe has touched: every recipe quantizes its own copy of them.
    loaded.model.to(device=device, dtype=torch.float32).eval()
    pristine = copy.deepcopy(loaded.model)
    references: dict[float, Any] = {}
    heldout_sizes: dict[str, int] = {}
    for _, recipe in recipes:
        fraction = recipe.calibration.heldout_fraction
        _, heldout = ptq.split_calibration(calibration, recipe)
        heldout_sizes[recipe.name] = len(heldout)
        if fraction not in references:
            references[fraction] = ptq.run_outputs(loaded, loaded.model, heldout, batch_size, device, "fp32",
                                                   "reference (fp32)")

    entries = []
    for i, (spec, recipe) in enumerate(recipes):
        console.info(f"[{i + 1}/{len(recipes)}] {recipe.name}")
        candidate = dataclasses.replace(loaded, model=copy.deepcopy(pristine))
        try:
            result = ptq.quantize(candidate, recipe, calibration, dtype=dtype, device=device, batch_size=batch_size,
                                  per_layer=False, reference=references[recipe.calibration.heldout_fraction])
        except QuantkitError as e:
            console.warn(f"{recipe.name}: {type(e).__name__}: {e}")
            entries.append({"name": recipe.name, "spec": spec, "source": recipe.source, "passed": False,
                            "error": f"{type(e).__name__}: {e}", "failures": [f"did not quantize: {e}"]})
            continue
        entry = _entry(spec, recipe, result.report)
        entry["heldout_samples"] = heldout_sizes[recipe.name]
        entries.append(entry)

    info = dict(calibration.info())
    info.pop("fields", None)
    data = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": ptq.versions(),
        "model": {"spec": loaded.spec, "class": type(loaded.model).__name__, "dtype": dtype, "device": str(device)},
        "calibration": info,
        "batch_size": batch_size,
        "reference": "fp32, computed once per held-out split and shared by every recipe",
        "recipes": entries,
    }
    data["passed"] = all(e.get("passed") for e in entries)
    return RecipeComparison(data)


# ---------------------------------------------------------------------------------------------
# Rendering: comparison.json -> Markdown / HTML through quantkit.report's sections


def _precisions(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    from quantkit.report import PRECISION_ORDER

    seen = {p for e in entries for p in ((e.get("coverage") or {}).get("by_precision") or {})}
    return [p for p in PRECISION_ORDER if p in seen] + sorted(seen - set(PRECISION_ORDER))


def _verdict_text(e: Mapping[str, Any]) -> str:
    if e.get("error"):
        return f"error: {e['error']}"
    return "pass" if e.get("passed") else "fail: " + "; ".join(e.get("failures") or [])


def comparison_sections(data: Mapping[str, Any]):
    from quantkit.report import (Banner, BulletList, Paragraph, Plot, Section, Table, _fmt, fmt_bytes, fmt_int,
                                 fmt_percent)

    entries = data.get("recipes") or []
    model = data.get("model") or {}
    cal = data.get("calibration") or {}
    failures = [f"{e.get('name')}: {f}" for e in entries if not e.get("passed") for f in (e.get("failures") or [])]
    head = [
        Banner(bool(data.get("passed")), failures),
        Table(["field", "value"], [
            ["model", str(model.get("spec"))], ["dtype / device", f"{model.get('dtype')} / {model.get('device')}"],
            ["calibration", f"{cal.get('source')} · {fmt_int(cal.get('samples_total'))} samples"],
            ["reference", str(data.get("reference"))], ["created", str(data.get("created"))]]),
    ]
    if cal.get("synthetic"):
        head.append(Paragraph("Synthetic calibration data: the accuracy figures may not hold on real inputs.", "warn"))

    rows, classes = [], []
    for e in entries:
        w = e.get("worst") or {}
        th = e.get("thresholds") or {}
        gate = "—" if not th else f"cosine ≥ {th.get('cosine_min')}" + (
            f", SNR ≥ {th['snr_min_db']} dB" if th.get("snr_min_db") is not None else "")
        ratio = e.get("compression")
        rows.append([str(e.get("name")), _fmt(w.get("cosine"), ".6f"), _fmt(w.get("snr_db"), ".2f"),
                     _fmt(w.get("mse"), ".3e"), fmt_bytes(e.get("weight_bytes_before")),
                     fmt_bytes(e.get("weight_bytes_after")), "—" if ratio is None else f"{ratio:.2f}×", gate,
                     _verdict_text(e)])
        classes.append("pass" if e.get("passed") else "fail")
    side = Table(["recipe", "cosine", "SNR (dB)", "MSE", "weights before", "weights after", "smaller by",
                  "threshold", "verdict"], rows, numeric={1, 2, 3, 4, 5, 6}, wide={8}, row_classes=classes)
    side_blocks = [Paragraph("Fake-quantized PyTorch model against the shared FP32 reference on the held-out "
                             "samples; the worst output for models with several."), side]
    plot_points = [e for e in entries if (e.get("worst") or {}).get("cosine") is not None]
    if plot_points:
        side_blocks.append(Plot("tradeoff", "Weight bytes after quantization against cosine, one point per recipe",
                                lambda: plot_tradeoff(data), page=FILES[2]))

    precs = _precisions(entries)
    cov_rows = []
    for e in entries:
        by = (e.get("coverage") or {}).get("by_precision") or {}
        cells = [f"{fmt_percent(by[p].get('param_fraction'))} ({fmt_int(by[p].get('layers'))})" if p in by else "—"
                 for p in precs]
        cov_rows.append([str(e.get("name")), *cells, fmt_bytes(e.get("weight_bytes_before")),
                         fmt_bytes(e.get("weight_bytes_after"))])
    coverage = Table(["recipe", *precs, "weights before", "weights after"], cov_rows,
                     numeric=set(range(1, len(precs) + 3)))

    sections = [
        Section(f"quantkit recipe comparison: {model.get('spec')}", head, "summary"),
        Section("Side by side", side_blocks, "side-by-side"),
        Section("Coverage by precision", [Paragraph("Share of parameters (layers) per precision; weight bytes from "
                                                    "the plan's formats, block scales included."), coverage],
                "coverage"),
    ]
    if any(len(e.get("metrics") or {}) > 1 for e in entries):
        out_rows = [[str(e.get("name")), o, _fmt(m.get("cosine"), ".6f"), _fmt(m.get("snr_db"), ".2f"),
                     _fmt(m.get("mse"), ".3e"), _fmt(m.get("rel_l2"), ".3e"), _fmt(m.get("max_abs_err"), ".3e")]
                    for e in entries for o, m in (e.get("metrics") or {}).items()]
        sections.append(Section("Accuracy per output", [Table(
            ["recipe", "output", "cosine", "SNR (dB)", "MSE", "rel L2", "max |err|"], out_rows,
            numeric={2, 3, 4, 5, 6})], "outputs"))
    # A warning every recipe gives (synthetic data, say) is said once.
    common = set.intersection(*(set(e.get("warnings") or []) for e in entries)) if len(entries) > 1 else set()
    notes = [f"every recipe: {w}" for w in (entries[0].get("warnings") or []) if w in common]
    notes += [f"{e.get('name')}: {w}" for e in entries for w in (e.get("warnings") or []) if w not in common]
    if notes:
        sections.append(Section("Warnings", [BulletList(notes, "warn")], "warnings"))
    return sections


def plot_tradeoff(data: Mapping[str, Any]):
    """Each recipe at (weight MiB after, worst cosine): the trade the recipes make."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from quantkit.report import PRECISION_COLORS

    points = [e for e in data.get("recipes") or [] if (e.get("worst") or {}).get("cosine") is not None]
    if not points:
        return None
    fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for e in points:
        x = e["weight_bytes_after"] / (1 << 20)
        y = e["worst"]["cosine"]
        by = (e.get("coverage") or {}).get("by_precision") or {}
        main = max(by, key=lambda p: by[p].get("params", 0)) if by else ""
        ax.scatter([x], [y], s=60, color=PRECISION_COLORS.get(main, "#555555"), zorder=2,
                   edgecolors="black" if e.get("passed") else "#cf222e", linewidths=1.5)
        ax.annotate(e["name"] + ("" if e.get("passed") else " (fail)"), (x, y), xytext=(7, 0),
                    textcoords="offset points", fontsize=9, va="center")
    before = max(e["weight_bytes_before"] for e in points) / (1 << 20)
    ax.axvline(before, color="#9aa4ae", ls=":", lw=1)
    ax.annotate(" FP weights", (before, ax.get_ylim()[0]), fontsize=8, color="#6b7480", va="bottom")
    ax.set_xlim(0, before * 1.25)
    ax.set_xlabel("weight bytes after quantization (MiB)")
    ax.set_ylabel("cosine vs FP32 (worst output)")
    ax.grid(True, alpha=0.3)
    return fig


def write_comparison(result: RecipeComparison, out: str | Path) -> Path:
    """comparison.json, .md and .html in `out`, each written atomically (rendered before any is written)."""
    from quantkit.outdir import atomic_write_json, atomic_write_text, write_marker
    from quantkit.report import _json_safe, sections_html, sections_markdown

    out = Path(out)
    data = _json_safe(result.data)
    sections = comparison_sections(data)
    md = sections_markdown(sections)
    page = sections_html(sections, f"quantkit recipe comparison: {data['model']['spec']}",
                         f"Rendered from comparison.json ({SCHEMA}) by quantkit.compare_recipes.")
    atomic_write_json(out / FILES[0], data)
    atomic_write_text(out / FILES[1], md)
    atomic_write_text(out / FILES[2], page)
    write_marker(out, "comparison")  # the folder is a quantkit output (quantkit.outdir)
    return out


def _coverage_text(e: Mapping[str, Any]) -> str:
    by = (e.get("coverage") or {}).get("by_precision") or {}
    return " · ".join(f"{p} {100 * by[p]['param_fraction']:.1f}%" for p in _precisions([e]) if p in by)


def print_comparison(result: RecipeComparison, out: Path) -> None:
    from quantkit.report import fmt_bytes

    rows = []
    for e in result.recipes:
        if e.get("error"):
            rows.append((e["name"], "—", "—", "—", "—", "—", _verdict_text(e)))
            continue
        w = e["worst"]
        snr = "inf" if w["snr_db"] is not None and math.isinf(w["snr_db"]) else (
            "-" if w["snr_db"] is None else f"{w['snr_db']:.2f}")
        rows.append((e["name"], _coverage_text(e),
                     f"{fmt_bytes(e['weight_bytes_before'])} -> {fmt_bytes(e['weight_bytes_after'])}"
                     + (f" ({e['compression']:.2f}x)" if e.get("compression") else ""),
                     "-" if w["cosine"] is None else f"{w['cosine']:.6f}", snr,
                     "-" if w["mse"] is None else f"{w['mse']:.3e}", _verdict_text(e)))
    m = result.data["model"]
    console.show(console.rows_table(
        f"recipes side by side: {m['spec']} ({m['dtype']}), fake-quant vs one FP32 reference",
        ("recipe", "coverage (share of params)", "weights", "cosine", "SNR dB", "MSE", "verdict"), rows))
    print(f"comparison: {out}/{FILES[0]}, {FILES[1]}, {FILES[2]}")
