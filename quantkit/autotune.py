"""Autotune: move layers down the precision ladder, one step at a time, until a measured cosine is reached.

Starting from a recipe, each quantized layer (and the attention matmuls) can step down its ladder of
rungs (`Rung`: a precision plus the rule fields it implies): nvfp4 (as the recipe's rule says) ->
nvfp4-gptq (GPTQ weights, only when the rule names no weight algorithm; `nvfp4_algorithm` picks
another or none) -> nvfp4-w4a8-gptq (the same NVFP4 weights, FP8 activations; only when the rule
quantizes the activations to NVFP4) -> fp8 -> the model's 16-bit dtype -> skip; int8 -> fp16 -> skip;
... Every rung's layers are calibrated once (the recipe itself, plus, when the recipe misses the
target, one calibration per other quantized rung on the ladders); candidates are then evaluated by
swapping already-calibrated layers into one model, so no candidate is recalibrated. Each unit's gain
for its next step is measured on the held-out samples. Steps that cost no weight bytes (the NVFP4
rungs, the attention matmuls) are taken first, largest measured gain first, when that gain is positive; then
the step with the best cosine gain per weight byte, until the target is reached. A zero-byte rung
that measures no gain is passed over for that unit (its next step is measured to the rung below).
Steps that turn out unneeded are undone, and the result, a recipe that `extends` the original, is
verified by quantizing a fresh model with it.
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
from quantkit.plan import DTYPE_BYTES, LayerPlan, Plan
from quantkit.recipe import (DEFAULT_NVFP4_ALGORITHM, FORMATS, WEIGHT_ALGORITHMS, WEIGHT_REWRITING_CALIBRATORS,
                             Precision, Recipe, Rule)

RESULT_FILE = "autotune.json"
RECIPE_FILE = "autotuned-recipe.yaml"
ATTENTION_UNIT = "attention matmuls"


@dataclasses.dataclass(frozen=True)
class Rung:
    """One rung of a unit's ladder: a precision and the recipe-rule fields it implies.

    `weights` / `activations` are the formats as a plan row has them (None: not quantized, e.g. a
    weight-only rule's inputs); `algorithm` and `calibrator` are the recipe rule's, which the W4A8 rung
    keeps (it changes only the activation format). Hashable: the layer bank and the override recipe are
    keyed by rung.
    """

    precision: Precision
    weights: Precision | None = None
    activations: Precision | None = None
    algorithm: str | None = None
    calibrator: str | None = None

    @classmethod
    def plain(cls, precision: Precision) -> "Rung":
        """`precision` for weights and activations alike (nothing quantized for fp16/bf16/skip)."""
        q = FORMATS[precision].quantized
        return cls(precision, precision if q else None, precision if q else None)

    @classmethod
    def of_row(cls, row: LayerPlan) -> "Rung":
        """Where the recipe puts a planned layer: the start of its ladder."""
        return cls(row.precision, row.weights, row.activations, row.algorithm, row.calibrator)

    @property
    def quantized(self) -> bool:
        return FORMATS[self.precision].quantized

    @property
    def weight_precision(self) -> Precision:
        return self.weights or self.precision

    @property
    def label(self) -> str:
        """"nvfp4", "nvfp4-gptq", "nvfp4-w4a8-gptq", "fp8", "fp16", "skip", ...: what autotune.json and the
        console name it (the weight algorithm, when the rung has one, last)."""
        if not self.quantized:
            return str(self.precision)
        w, a = self.weight_precision, self.activations
        name = str(w) if a == w else f"{w}-weight-only" if a is None else f"{w}-w{FORMATS[w].bits}a{FORMATS[a].bits}"
        return f"{name}-{self.algorithm}" if self.algorithm else name

    def __str__(self) -> str:
        return self.label

    def rule_fields(self) -> dict[str, Any]:
        """The recipe-rule fields (YAML-ready strings) that put a layer on this rung."""
        fields: dict[str, Any] = {"precision": str(self.precision)}
        if not self.quantized:
            return fields
        if self.weight_precision != self.precision:
            fields["weights"] = str(self.weight_precision)
        if self.activations != self.precision:
            # None: inputs left in floating point (any unquantized format reads so in the plan).
            fields["activations"] = str(self.activations or Precision.SKIP)
        if self.algorithm:
            fields["algorithm"] = self.algorithm
        if self.calibrator:
            fields["calibrator"] = self.calibrator
        return fields

    def rule_dict(self, names: list[str], note: str | None = None) -> dict[str, Any]:
        """The recipe rule (YAML-ready) that puts exactly the layers `names` on this rung."""
        from quantkit.sensitivity import _exact

        return {"match": [_exact(n) for n in names], **self.rule_fields(), **({"note": note} if note else {})}

    def rule(self, names: list[str], note: str | None = None) -> Rule:
        return Rule.model_validate(self.rule_dict(names, note))


def ladder(start: Rung | Precision, model_dtype: str, nvfp4_algorithm: str | None = DEFAULT_NVFP4_ALGORITHM
           ) -> list[Rung]:
    """A unit's rungs from `start` (where the recipe puts it) down, nearest first, ending at skip.

    By weight format: NVFP4 -> [NVFP4 with `nvfp4_algorithm`, when the rule names no weight algorithm
    and no calibrator that rewrites the weights (smoothquant, awq)]
    -> [W4A8, when the activations are NVFP4] -> fp8 -> 16-bit -> skip; fp8 or int8 -> 16-bit -> skip.
    The NVFP4 rungs cost no weight bytes; the W4A8 rung keeps the weight algorithm (the rule's, else
    `nvfp4_algorithm`) and the calibrator.
    """
    start = start if isinstance(start, Rung) else Rung.plain(start)
    sixteen = {"bf16": Precision.BF16, "fp16": Precision.FP16}.get(model_dtype, Precision.FP16)
    below = {Precision.NVFP4: [Precision.FP8, sixteen], Precision.FP8: [sixteen],
             Precision.INT8: [sixteen]}.get(start.weight_precision, []) if start.quantized else []
    rungs = [start]
    if start.quantized and start.weight_precision == Precision.NVFP4:
        last = start
        if nvfp4_algorithm and not start.algorithm and start.calibrator not in WEIGHT_REWRITING_CALIBRATORS:
            # Same formats, better NVFP4 weights: the weight algorithm alone changes.
            last = dataclasses.replace(start, algorithm=nvfp4_algorithm)
            rungs.append(last)
        if start.activations == Precision.NVFP4:
            # W4A4 -> W4A8: the NVFP4 weights stay (zero weight bytes), the activations go to FP8.
            rungs.append(dataclasses.replace(last, activations=Precision.FP8))
    # A 16-bit rung equal to the model's own dtype is the same as skip.
    rungs += [Rung.plain(p) for p in below if FORMATS[p].quantized or model_dtype == "fp32"]
    return rungs + [Rung.plain(Precision.SKIP)]


@dataclasses.dataclass
class Unit:
    """A layer (or the attention matmuls) and where it stands on its ladder."""

    name: str
    params: int
    rungs: list[Rung]  # [where the recipe puts it, next, ..., skip]
    position: int = 0
    # The rung its next step goes to (usually position + 1; further when a zero-byte rung was passed
    # over) and that step's measured cosine gain; None when it cannot step.
    next_position: int | None = None
    next_gain: float | None = None

    @property
    def rung(self) -> Rung:
        return self.rungs[self.position]

    @property
    def precision(self) -> Precision:
        return self.rung.precision

    @property
    def can_step(self) -> bool:
        return self.position + 1 < len(self.rungs)

    def bytes_at(self, position: int, model_dtype: str) -> int:
        r = self.rungs[position]
        if r.precision == Precision.SKIP:
            return self.params * DTYPE_BYTES[model_dtype]
        return int(round(self.params * FORMATS[r.weight_precision].bytes_per_weight))


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

    def changes(self) -> dict[str, Rung]:
        return {u.name: u.rung for u in self.units if u.position > 0}

    def override(self) -> dict[str, Any]:
        """The written recipe: `extends` the original, one rule per rung the moved layers stand on."""
        from quantkit.sensitivity import _extends_spec

        data: dict[str, Any] = {"name": f"{self.recipe.name}-autotuned", "extends": _extends_spec(self.recipe)}
        by_rung: dict[Rung, list[str]] = {}
        attention_skip = False
        for name, rung in self.changes().items():
            if name == ATTENTION_UNIT:
                attention_skip = True
            else:
                by_rung.setdefault(rung, []).append(name)
        if by_rung:
            # A rule replaces the recipe's rule for its layers (the last match wins, fields do not
            # merge), so each states the rung in full: W4A8 keeps the weight algorithm and calibrator.
            data["rules"] = [rung.rule_dict(names, f"moved down the precision ladder to {rung} by `quantkit autotune`")
                             for rung, names in by_rung.items()]
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
        return {"schema": "quantkit.autotune/2", "recipe": self.recipe.name, "target_cosine": self.target_cosine,
                "max_linear_bytes": self.max_linear_bytes, "model_dtype": self.model_dtype,
                "start_cosine": self.start_cosine, "start_linear_bytes": self.start_bytes,
                "reached_cosine": self.reached_cosine, "linear_bytes": self.linear_bytes, "reached": self.reached,
                "samples": self.samples, "heldout_samples": self.heldout_samples, "calibrations": self.calibrations,
                "timings": self.timings,
                "units": [{"unit": u.name, "params": u.params, "ladder": [r.label for r in u.rungs],
                           "rung": u.rung.label, "precision": str(u.precision)} for u in self.units],
                "changes": {k: str(v) for k, v in self.changes().items()},
                "steps": self.steps, "pareto": self.pareto(), "override": self.override()}


def _worst_cosine(metrics) -> float:
    return min((m.cosine if m.finite else -1.0) for m in metrics.values())


class LayerBank:
    """Calibrated versions of each layer, one per rung, swapped into one model to evaluate a configuration."""

    def __init__(self, model: nn.Module, plan: Plan):
        self.model = model
        self.versions: dict[str, dict[Rung, nn.Module]] = {}
        self.attention_quantizers = [q for a in plan.attention if a.get("converted")
                                     for q in (a.get("quantizers") or {}).values()]
        self._modules = dict(model.named_modules())

    def add(self, name: str, rung: Rung, module: nn.Module) -> None:
        self.versions.setdefault(name, {})[rung] = module

    def set(self, unit: Unit) -> None:
        if unit.name == ATTENTION_UNIT:
            for q in self.attention_quantizers:
                m = self._modules[q]
                m.enable() if unit.precision != Precision.SKIP else m.disable()
            return
        self.model.set_submodule(unit.name, self.versions[unit.name][unit.rung])


def measure_next(unit: Unit, gain_at: Callable[[int], float], model_dtype: str) -> list[tuple[int, float]]:
    """Set `unit.next_position` / `next_gain`: its next step down and that step's measured cosine gain
    (`gain_at(position)`); returns the (position, gain) of the rungs passed over on the way.

    A rung that costs no weight bytes (W4A8) and measures no gain is passed over: the step is then
    measured to the rung below, so a unit whose FP8 activations do not help still reaches fp8 (one
    measurement more). The last rung is never passed over."""
    unit.next_position = unit.next_gain = None
    passed: list[tuple[int, float]] = []
    here = unit.bytes_at(unit.position, model_dtype)
    for to in range(unit.position + 1, len(unit.rungs)):
        unit.next_position, unit.next_gain = to, gain_at(to)
        if unit.next_gain > 0 or unit.bytes_at(to, model_dtype) > here or to + 1 == len(unit.rungs):
            break
        passed.append((to, unit.next_gain))
    return passed


def _priority(gain: float, cost: int) -> tuple[int, float, float]:
    """Which candidate step goes first (the largest key): steps that cost no weight bytes (W4A8, the
    attention matmuls) by measured gain when it is positive; then by gain per weight byte (gain breaks
    ties); last, free steps that measured no gain (a gain per byte would divide by zero)."""
    if cost <= 0:
        return (2, gain, 0.0) if gain > 0 else (0, gain, 0.0)
    return (1, gain / cost, gain)


def autotune(make_loaded: Callable[[], LoadedModel], recipe: Recipe, calibration, *, target_cosine: float,
             max_linear_bytes: int | None = None, dtype: str = "fp32", device: str | torch.device = "cpu",
             batch_size: int | None = None, max_steps: int = 256, verify: bool = True,
             nvfp4_algorithm: str | None = DEFAULT_NVFP4_ALGORITHM) -> AutotuneResult:
    """Find the cheapest steps down the precision ladder that reach `target_cosine` (see the module docstring).

    `nvfp4_algorithm`: the weight algorithm of the extra NVFP4 rung (see `ladder`); None: no such rung."""
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
        rungs = ladder(Rung.of_row(row), dtype, nvfp4_algorithm)
        units.append(Unit(row.name, row.params, rungs))
        bank.add(row.name, rungs[0], base_modules[row.name])
        for r in rungs[1:]:
            if r.precision == Precision.SKIP:
                bank.add(row.name, r, copy.deepcopy(pristine_modules[row.name]))
            elif not r.quantized:
                m = copy.deepcopy(pristine_modules[row.name])
                set_layer_dtype(m, getattr(torch, FORMATS[r.precision].torch_dtype), model_torch_dtype)
                bank.add(row.name, r, m)
    if bank.attention_quantizers:
        units.append(Unit(ATTENTION_UNIT, 0, [Rung.plain(recipe.attention.precision), Rung.plain(Precision.SKIP)]))
    del pristine, pristine_modules
    timings["calibrate_s"] = time.perf_counter() - t0

    def calibrate_rungs() -> int:
        """One calibration per other quantized rung on the ladders (fp8, nvfp4-w4a8 per weight algorithm,
        ...), for all the layers that need it."""
        t1 = time.perf_counter()
        needed: dict[Rung, list[str]] = {}
        for u in units:
            for r in u.rungs[1:]:
                if r.quantized and u.name != ATTENTION_UNIT:
                    needed.setdefault(r, []).append(u.name)
        for r, names in needed.items():
            other = make_loaded()
            other.model.to(device=device, dtype=torch.float32)
            variant = recipe.model_copy(update={"rules": [*recipe.rules, r.rule(names)]})
            console.info(f"calibrating the {r} rung of {len(names)} layer(s)")
            ptq.quantize_model(other, variant, calib_part, dtype=dtype, device=device, batch_size=batch_size)
            other_modules = dict(other.model.named_modules())
            for n in names:
                bank.add(n, r, other_modules[n])
        timings["calibrate_s"] += time.perf_counter() - t1
        return len(needed)

    def linear_bytes() -> int:
        return sum(u.bytes_at(u.position, dtype) for u in units)

    def evaluate(desc: str) -> float:
        outputs = ptq.run_outputs(base, base.model, heldout, batch_size, device, dtype, desc)
        return _worst_cosine(ptq.compare_runs(reference, outputs))

    def measure(unit: Unit, current: float) -> None:
        """`unit`'s next step and its cosine gain, everything else as it is (see measure_next)."""

        def gain_at(position: int) -> float:
            here = unit.position
            unit.position = position
            bank.set(unit)
            gain = evaluate(f"measure {unit.name}") - current
            unit.position = here
            bank.set(unit)
            return gain

        for position, gain in measure_next(unit, gain_at, dtype):
            steps.append({"action": "passed", "unit": unit.name, "rung": unit.rungs[position].label,
                          "measured_gain": gain})
            console.info(f"{unit.name}: {unit.rung} -> {unit.rungs[position]} gains {gain:+.6f} and costs no "
                         f"bytes: passed over")

    def step_cost(unit: Unit) -> int:
        return unit.bytes_at(unit.next_position, dtype) - unit.bytes_at(unit.position, dtype)

    t0 = time.perf_counter()
    cosine = evaluate("evaluate recipe")
    start_cosine, start_bytes = cosine, linear_bytes()
    steps: list[dict[str, Any]] = [{"step": 0, "action": "start", "cosine": cosine, "linear_bytes": start_bytes}]
    console.info(f"{recipe.name}: cosine {cosine:.6f}, quantized-linear weights {start_bytes} bytes; target {target_cosine}")
    if cosine < target_cosine and max_steps > 0:
        # The other rungs are calibrated only when the search runs (a recipe that reaches the target needs none).
        calibrations += calibrate_rungs()
        for i, unit in enumerate(units):
            measure(unit, cosine)
            if unit.next_position is not None:
                console.info(f"[{i + 1}/{len(units)}] {unit.name}: {unit.rung} -> {unit.rungs[unit.next_position]} "
                             f"gains {unit.next_gain:+.6f}")
        steps.append({"action": "measured", "gains": {u.name: u.next_gain for u in units},
                      "to": {u.name: u.rungs[u.next_position].label for u in units if u.next_position is not None}})
    moved: list[tuple[Unit, float]] = []  # (unit, the gain measured for the step it took), in order
    while cosine < target_cosine and len(moved) < max_steps:
        candidates = [u for u in units if u.next_position is not None
                      and (max_linear_bytes is None or step_cost(u) <= 0
                           or linear_bytes() + step_cost(u) <= max_linear_bytes)]
        if not candidates:
            break
        best = max(candidates, key=lambda u: _priority(u.next_gain, step_cost(u)))
        gain, came_from = best.next_gain, best.rung
        best.position, best.next_position = best.next_position, None
        bank.set(best)
        cosine = evaluate(f"step {len(moved) + 1}")
        moved.append((best, gain))
        steps.append({"step": len(moved), "action": "down", "unit": best.name, "to": best.rung.label,
                      "from": came_from.label, "measured_gain": gain, "cosine": cosine,
                      "linear_bytes": linear_bytes()})
        console.info(f"step {len(moved)}: {best.name} -> {best.rung}: cosine {cosine:.6f}, "
                     f"{linear_bytes()} bytes")
        if cosine < target_cosine:
            measure(best, cosine)
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
                    steps.append({"action": "undo", "unit": unit.name, "to": unit.rung.label, "cosine": c,
                                  "linear_bytes": linear_bytes()})
                    console.info(f"{unit.name} back to {unit.rung}: cosine {c:.6f} still reaches the target")
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
        max_samples: int | None = None, batch_size: int | None = None, out: str | Path | None = None,
        nvfp4_algorithm: str | None = DEFAULT_NVFP4_ALGORITHM) -> tuple[AutotuneResult, Path]:
    """`quantkit autotune`: load, autotune, write `out` (autotune.json, the recipe, report.html)."""
    from quantkit import ptq
    from quantkit.errors import InputError
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    if not -1.0 < target_cosine <= 1.0:
        raise InputError(f"--target {target_cosine}: a cosine target lies in (-1, 1], e.g. 0.99")
    if max_linear_bytes is not None and max_linear_bytes <= 0:
        raise InputError(f"--max-linear-bytes {max_linear_bytes}: a byte budget is a positive number")
    if nvfp4_algorithm is not None and nvfp4_algorithm not in WEIGHT_ALGORITHMS:
        raise InputError(f"nvfp4_algorithm {nvfp4_algorithm!r}: not one of {', '.join(WEIGHT_ALGORITHMS)} "
                         "(None: no such rung)")
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
                      batch_size=batch_size, nvfp4_algorithm=nvfp4_algorithm)
    write_outputs(result, out_dir)
    return result, out_dir
