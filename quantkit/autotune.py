"""Autotune: move layers down the precision ladder, one step at a time, until a measured cosine is reached.

Starting from a recipe, each quantized layer (and the attention matmuls) can step down its ladder
(nvfp4 -> fp8 -> the model's 16-bit dtype -> skip; int8 -> fp16 -> skip; ...). Every rung's layers
are calibrated once (the recipe itself, plus, when the recipe misses the target, one calibration
per other quantized precision on the ladders); candidates are then evaluated by swapping already-calibrated layers into
one model, so no candidate is recalibrated. Each unit's gain for its next step is measured on the
held-out samples; the step with the best cosine gain per weight byte is taken, until the target is
reached; steps that turn out unneeded are undone, and the result, a recipe that `extends` the
original, is verified by quantizing a fresh model with it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from quantkit import console
from quantkit.models import LoadedModel
from quantkit.plan import DTYPE_BYTES, Plan
from quantkit.recipe import FORMATS, Precision, Recipe, Rule

RESULT_FILE = "autotune.json"
RECIPE_FILE = "autotuned-recipe.yaml"
ATTENTION_UNIT = "attention matmuls"


def ladder(precision: Precision, model_dtype: str) -> list[Precision]:
    """The rungs below `precision`, nearest first, ending at skip (the layer as the model has it)."""
    sixteen = {"bf16": Precision.BF16, "fp16": Precision.FP16}.get(model_dtype, Precision.FP16)
    full = {Precision.NVFP4: [Precision.FP8, sixteen], Precision.FP8: [sixteen], Precision.INT8: [sixteen],
            Precision.FP16: [], Precision.BF16: []}.get(precision, [])
    # A 16-bit rung equal to the model's own dtype is the same as skip.
    return [p for p in full if not (not FORMATS[p].quantized and model_dtype != "fp32")] + [Precision.SKIP]


@dataclasses.dataclass
class Unit:
    """A layer (or the attention matmuls) and where it stands on its ladder."""

    name: str
    params: int
    rungs: list[Precision]  # [recipe precision, next, ..., skip]
    position: int = 0
    next_gain: float | None = None  # measured cosine gain of one step down from `position`

    @property
    def precision(self) -> Precision:
        return self.rungs[self.position]

    @property
    def can_step(self) -> bool:
        return self.position + 1 < len(self.rungs)

    def bytes_at(self, position: int, model_dtype: str) -> int:
        p = self.rungs[position]
        if p == Precision.SKIP:
            return self.params * DTYPE_BYTES[model_dtype]
        return int(round(self.params * FORMATS[p].bytes_per_weight))


@dataclasses.dataclass
class AutotuneResult:
    recipe: Recipe
    target_cosine: float
    max_linear_bytes: int | None
    model_dtype: str
    start_cosine: float
    start_bytes: int
    units: list[Unit]
    steps: list[dict[str, Any]]
    reached_cosine: float  # of the fresh, verified model when verification ran
    linear_bytes: int
    reached: bool
    samples: int
    heldout_samples: int
    timings: dict[str, float]
    calibrations: int

    def __bool__(self) -> bool:
        return self.reached

    def changes(self) -> dict[str, Precision]:
        return {u.name: u.precision for u in self.units if u.position > 0}

    def override(self) -> dict[str, Any]:
        from quantkit.sensitivity import _exact, _extends_spec

        data: dict[str, Any] = {"name": f"{self.recipe.name}-autotuned", "extends": _extends_spec(self.recipe)}
        by_precision: dict[Precision, list[str]] = {}
        attention_skip = False
        for name, p in self.changes().items():
            if name == ATTENTION_UNIT:
                attention_skip = True
            else:
                by_precision.setdefault(p, []).append(name)
        if by_precision:
            data["rules"] = [{"match": [_exact(n) for n in names], "precision": str(p),
                              "note": "moved down the precision ladder by `quantkit autotune`"}
                             for p, names in by_precision.items()]
        if attention_skip:
            data["attention"] = {"precision": "skip"}
        data["thresholds"] = {"cosine_min": self.target_cosine}
        return data

    def override_yaml(self) -> str:
        header = (f"# Written by `quantkit autotune --target {self.target_cosine}`: {self.recipe.name} with the layers "
                  f"below moved down\n# the precision ladder; cosine {self.reached_cosine:.6f} on "
                  f"{self.heldout_samples} held-out of {self.samples} samples, quantized-linear weights "
                  f"{self.linear_bytes} bytes (recipe: {self.start_bytes}).\n")
        return header + yaml.safe_dump(self.override(), sort_keys=False)

    def pareto(self) -> list[dict[str, Any]]:
        """(bytes, cosine) of every measured configuration, and whether it is on the Pareto front."""
        points = [{"bytes": s["linear_bytes"], "cosine": s["cosine"], "step": i} for i, s in enumerate(self.steps)
                  if "cosine" in s and "linear_bytes" in s]
        for p in points:
            p["pareto"] = not any(q["bytes"] <= p["bytes"] and q["cosine"] > p["cosine"] or
                                  q["bytes"] < p["bytes"] and q["cosine"] >= p["cosine"] for q in points)
        return points

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "quantkit.autotune/1", "recipe": self.recipe.name, "target_cosine": self.target_cosine,
                "max_linear_bytes": self.max_linear_bytes, "model_dtype": self.model_dtype,
                "start_cosine": self.start_cosine, "start_linear_bytes": self.start_bytes,
                "reached_cosine": self.reached_cosine, "linear_bytes": self.linear_bytes, "reached": self.reached,
                "samples": self.samples, "heldout_samples": self.heldout_samples, "calibrations": self.calibrations,
                "timings": self.timings,
                "units": [{"unit": u.name, "params": u.params, "ladder": [str(p) for p in u.rungs],
                           "precision": str(u.precision)} for u in self.units],
                "changes": {k: str(v) for k, v in self.changes().items()},
                "steps": self.steps, "pareto": self.pareto(), "override": self.override()}


def _worst_cosine(metrics) -> float:
    return min((m.cosine if m.finite else -1.0) for m in metrics.values())


class LayerBank:
    """Calibrated versions of each layer, one per rung, swapped into one model to evaluate a configuration."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.model = model
        self.versions: dict[str, dict[Precision, nn.Module]] = {}
        self.attention_quantizers = [q for a in plan.attention if a.get("converted")
                                     for q in (a.get("quantizers") or {}).values()]
        self._modules = dict(model.named_modules())

    def add(self, name: str, precision: Precision, module: nn.Module) -> None:
        self.versions.setdefault(name, {})[precision] = module

    def set(self, unit: Unit) -> None:
        if unit.name == ATTENTION_UNIT:
            for q in self.attention_quantizers:
                m = self._modules[q]
                m.enable() if unit.precision != Precision.SKIP else m.disable()
            return
        self.model.set_submodule(unit.name, self.versions[unit.name][unit.precision])


def _rule_for(names: list[str], precision: Precision) -> Rule:
    from quantkit.sensitivity import _exact

    return Rule(match=[_exact(n) for n in names], precision=precision)


def autotune(make_loaded: Callable[[], LoadedModel], recipe: Recipe, calibration, *, target_cosine: float,
             max_linear_bytes: int | None = None, dtype: str = "fp32", device: str | torch.device = "cpu",
             batch_size: int | None = None, max_steps: int = 256, verify: bool = True) -> AutotuneResult:
    """Find the cheapest steps down the precision ladder that reach `target_cosine` (see the module docstring)."""
    from quantkit import ptq
    from quantkit.layer_dtype import set_layer_dtype

    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    device = torch.device(device)
    batch_size = batch_size or recipe.calibration.batch_size
    calib_part, heldout = ptq.split_calibration(calibration, recipe)
    model_torch_dtype = ptq._torch_dtype(dtype)

    t0 = time.perf_counter()
    pristine = make_loaded()
    pristine.model.to(device=device, dtype=torch.float32)
    reference = ptq.run_outputs(pristine, pristine.model, heldout, batch_size, device, "fp32", "reference (fp32)")
    pristine.model.to(dtype=model_torch_dtype)
    pristine_modules = dict(pristine.model.named_modules())

    base = make_loaded()
    base.model.to(device=device, dtype=torch.float32)
    plan = ptq.quantize_model(base, recipe, calib_part, dtype=dtype, device=device, batch_size=batch_size)
    calibrations = 1
    bank = LayerBank(base.model, plan)
    base_modules = dict(base.model.named_modules())
    units: list[Unit] = []
    for row in plan.quantized_layers():
        rungs = [row.precision] + ladder(row.precision, dtype)
        units.append(Unit(row.name, row.params, rungs))
        bank.add(row.name, row.precision, base_modules[row.name])
        for p in rungs[1:]:
            if p == Precision.SKIP:
                bank.add(row.name, p, copy.deepcopy(pristine_modules[row.name]))
            elif not FORMATS[p].quantized:
                m = copy.deepcopy(pristine_modules[row.name])
                set_layer_dtype(m, getattr(torch, FORMATS[p].torch_dtype), model_torch_dtype)
                bank.add(row.name, p, m)
    if bank.attention_quantizers:
        units.append(Unit(ATTENTION_UNIT, 0, [recipe.attention.precision, Precision.SKIP]))
    del pristine, pristine_modules
    timings["calibrate_s"] = time.perf_counter() - t0

    def calibrate_rungs() -> int:
        """One calibration per other quantized precision on the ladders, for all the layers that need it."""
        t1 = time.perf_counter()
        needed: dict[Precision, list[str]] = {}
        for u in units:
            for p in u.rungs[1:]:
                if FORMATS[p].quantized and u.name != ATTENTION_UNIT:
                    needed.setdefault(p, []).append(u.name)
        for p, names in needed.items():
            other = make_loaded()
            other.model.to(device=device, dtype=torch.float32)
            variant = recipe.model_copy(update={"rules": [*recipe.rules, _rule_for(names, p)]})
            console.info(f"calibrating the {p} rung of {len(names)} layer(s)")
            ptq.quantize_model(other, variant, calib_part, dtype=dtype, device=device, batch_size=batch_size)
            other_modules = dict(other.model.named_modules())
            for n in names:
                bank.add(n, p, other_modules[n])
        timings["calibrate_s"] += time.perf_counter() - t1
        return len(needed)

    def linear_bytes() -> int:
        return sum(u.bytes_at(u.position, dtype) for u in units)

    def evaluate(desc: str) -> float:
        outputs = ptq.run_outputs(base, base.model, heldout, batch_size, device, dtype, desc)
        return _worst_cosine(ptq.compare_runs(reference, outputs))

    def measure_next(unit: Unit, current: float) -> None:
        """The cosine gain of stepping `unit` one rung down from where it is, everything else as it is."""
        if not unit.can_step:
            unit.next_gain = None
            return
        unit.position += 1
        bank.set(unit)
        unit.next_gain = evaluate(f"measure {unit.name}") - current
        unit.position -= 1
        bank.set(unit)

    def step_cost(unit: Unit) -> int:
        return max(1, unit.bytes_at(unit.position + 1, dtype) - unit.bytes_at(unit.position, dtype))

    t0 = time.perf_counter()
    cosine = evaluate("evaluate recipe")
    start_cosine, start_bytes = cosine, linear_bytes()
    steps: list[dict[str, Any]] = [{"step": 0, "action": "start", "cosine": cosine, "linear_bytes": start_bytes}]
    console.info(f"{recipe.name}: cosine {cosine:.6f}, quantized-linear weights {start_bytes} bytes; target {target_cosine}")
    if cosine < target_cosine and max_steps > 0:
        # The other rungs are calibrated only when the search runs (a recipe that reaches the target needs none).
        calibrations += calibrate_rungs()
        for i, unit in enumerate(units):
            measure_next(unit, cosine)
            console.info(f"[{i + 1}/{len(units)}] {unit.name}: {unit.precision} -> {unit.rungs[1]} gains "
                         f"{unit.next_gain:+.6f}")
        steps.append({"action": "measured", "gains": {u.name: u.next_gain for u in units}})
    moved: list[tuple[Unit, float]] = []  # (unit, the gain measured for the step it took), in order
    while cosine < target_cosine and len(moved) < max_steps:
        candidates = [u for u in units if u.can_step and u.next_gain is not None
                      and (max_linear_bytes is None or linear_bytes() + step_cost(u) - 0 <= max_linear_bytes
                           or u.bytes_at(u.position + 1, dtype) <= u.bytes_at(u.position, dtype))]
        if not candidates:
            break
        best = max(candidates, key=lambda u: (u.next_gain / step_cost(u), u.next_gain))
        gain = best.next_gain
        best.position += 1
        bank.set(best)
        cosine = evaluate(f"step {len(moved) + 1}")
        moved.append((best, gain))
        steps.append({"step": len(moved), "action": "down", "unit": best.name, "to": str(best.precision),
                      "from": str(best.rungs[best.position - 1]), "measured_gain": gain, "cosine": cosine,
                      "linear_bytes": linear_bytes()})
        console.info(f"step {len(moved)}: {best.name} -> {best.precision}: cosine {cosine:.6f}, "
                     f"{linear_bytes()} bytes")
        if cosine < target_cosine:
            measure_next(best, cosine)
    best_cosine = max(s["cosine"] for s in steps if "cosine" in s)

    if cosine >= target_cosine and moved:
        # Greedy order can take a step that later steps made unnecessary: undo those, smallest gain first.
        for unit, _ in sorted({id(u): (u, g) for u, g in moved}.values(), key=lambda ug: ug[1]):
            while unit.position > 0:
                unit.position -= 1
                bank.set(unit)
                c = evaluate(f"undo {unit.name}")
                if c >= target_cosine:
                    cosine = c
                    steps.append({"action": "undo", "unit": unit.name, "to": str(unit.precision), "cosine": c,
                                  "linear_bytes": linear_bytes()})
                    console.info(f"{unit.name} back to {unit.precision}: cosine {c:.6f} still reaches the target")
                else:
                    unit.position += 1
                    bank.set(unit)
                    break
    timings["search_s"] = time.perf_counter() - t0

    result_recipe_cosine = cosine
    result = AutotuneResult(recipe, target_cosine, max_linear_bytes, dtype, start_cosine, start_bytes, units, steps,
                            cosine, linear_bytes(), cosine >= target_cosine, len(calibration), len(heldout),
                            timings, calibrations)
    if verify and result.reached and result.changes():
        t0 = time.perf_counter()
        fresh = make_loaded()
        fresh.model.to(device=device, dtype=torch.float32)
        tuned = tuned_recipe(result)
        ptq.quantize_model(fresh, tuned, calib_part, dtype=dtype, device=device, batch_size=batch_size,
                           allow_nothing=True)
        outputs = ptq.run_outputs(fresh, fresh.model, heldout, batch_size, device, dtype, "verify")
        verified = _worst_cosine(ptq.compare_runs(reference, outputs))
        steps.append({"action": "verified", "cosine": verified, "linear_bytes": linear_bytes(),
                      "with_swapped_layers": result_recipe_cosine})
        console.info(f"autotuned recipe quantized afresh: cosine {verified:.6f} (swapped layers: "
                     f"{result_recipe_cosine:.6f})")
        result.reached_cosine = verified
        result.reached = verified >= target_cosine
        timings["verify_s"] = time.perf_counter() - t0
    if not result.reached:
        result.reached_cosine = max(result.reached_cosine, best_cosine) if not result.changes() else result.reached_cosine
        result.steps.append({"action": "unreachable", "best_cosine": best_cosine})
    result.best_cosine = best_cosine  # type: ignore[attr-defined]
    timings["total_s"] = time.perf_counter() - t_all
    return result


def tuned_recipe(result: AutotuneResult) -> Recipe:
    """The written recipe as a Recipe: the original's rules plus the override's (what `extends` merges)."""
    from quantkit.sensitivity import with_rules

    override = result.override()
    rules = [Rule.model_validate(r) for r in override.get("rules", [])]
    tuned = with_rules(result.recipe, rules, attention="attention" not in override)
    return tuned.model_copy(update={"name": override["name"]})


# ---------------------------------------------------------------------------------------------
# Output folder


def pareto_plot_png(result: AutotuneResult) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    points = result.pareto()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [p["bytes"] / 2**20 for p in points]
    ys = [p["cosine"] for p in points]
    ax.plot(xs, ys, "o-", color="#999", lw=1, ms=4, label="autotune steps")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["bytes"])
    ax.plot([p["bytes"] / 2**20 for p in front], [p["cosine"] for p in front], "o-", color="#c33", ms=5,
            label="Pareto front")
    ax.axhline(result.target_cosine, color="#36c", ls="--", lw=1, label=f"target {result.target_cosine}")
    ax.set_xlabel("quantized-linear weights (MiB)")
    ax.set_ylabel("held-out cosine vs FP32")
    ax.set_title(f"autotune of {result.recipe.name}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def html_report(result: AutotuneResult) -> str:
    import base64
    import html

    png = pareto_plot_png(result)
    img = (f'<img alt="bytes vs cosine" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
           if png else "<p>(matplotlib is not installed: no plot)</p>")
    rows = "".join(
        f"<tr><td>{s.get('step', '')}</td><td>{html.escape(s['action'])}</td><td>{html.escape(s.get('unit', ''))}</td>"
        f"<td>{html.escape(s.get('from', ''))} &rarr; {html.escape(s.get('to', ''))}</td>"
        f"<td>{s['cosine']:.6f}</td><td>{s.get('linear_bytes', '')}</td></tr>"
        for s in result.steps if "cosine" in s)
    verdict = "reached" if result.reached else "NOT reached"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>autotune {html.escape(result.recipe.name)}</title>"
            "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
            "table{border-collapse:collapse}</style></head><body>"
            f"<h1>autotune: {html.escape(result.recipe.name)}</h1>"
            f"<p>target cosine {result.target_cosine}: {verdict}, cosine {result.reached_cosine:.6f}; "
            f"quantized-linear weights {result.linear_bytes} bytes (recipe {result.start_bytes}, cosine "
            f"{result.start_cosine:.6f}); {result.heldout_samples} held-out of {result.samples} samples; "
            f"{result.calibrations} calibration(s).</p>{img}"
            "<table><tr><th>step</th><th>action</th><th>unit</th><th>precision</th><th>cosine</th><th>bytes</th></tr>"
            f"{rows}</table></body></html>")


def write_outputs(result: AutotuneResult, out: Path) -> None:
    from quantkit.outdir import OutputFolder, atomic_write_json, atomic_write_text

    with OutputFolder.staged(out) as tmp:
        atomic_write_json(tmp / RESULT_FILE, result.to_dict())
        atomic_write_text(tmp / RECIPE_FILE, result.override_yaml())
        atomic_write_text(tmp / "report.html", html_report(result))


def run(recipe_spec: str, model_spec: str | None, *, target_cosine: float, max_linear_bytes: int | None = None,
        dtype: str | None = None, device: str | None = None, calib: str | None = None,
        max_samples: int | None = None, batch_size: int | None = None, out: str | Path | None = None
        ) -> tuple[AutotuneResult, Path]:
    """`quantkit autotune`: load, autotune, write `out` (autotune.json, the recipe, report.html)."""
    from quantkit import ptq
    from quantkit.errors import InputError
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    if not -1.0 < target_cosine <= 1.0:
        raise InputError(f"--target {target_cosine}: a cosine target lies in (-1, 1], e.g. 0.99")
    if max_linear_bytes is not None and max_linear_bytes <= 0:
        raise InputError(f"--max-linear-bytes {max_linear_bytes}: a byte budget is a positive number")
    recipe = load_recipe(recipe_spec)
    torch_device = ptq.resolve_device(device)
    loaded = load_model(model_spec)
    calibration = ptq.open_calibration(loaded, calib, False, max_samples or recipe.calibration.max_samples)
    out_dir = Path(out) if out else Path("runs") / f"autotune-{ptq._default_out(recipe_spec, model_spec).name}"
    made = [loaded]  # the first model is reused; later calls load afresh

    def make_loaded() -> LoadedModel:
        return made.pop() if made else load_model(model_spec)

    result = autotune(make_loaded, recipe, calibration, target_cosine=target_cosine,
                      max_linear_bytes=max_linear_bytes, dtype=dtype or "fp32", device=torch_device,
                      batch_size=batch_size)
    write_outputs(result, out_dir)
    return result, out_dir
