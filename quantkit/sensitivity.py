"""Sensitivity: which parts of a recipe do the most damage, and what to keep in higher precision.

The model is calibrated once under the full recipe; each unit (a recipe rule, a block, a single
layer, or the attention matmuls) is then evaluated with only its quantizers switched on, and the
final output's cosine against FP32 ranks the units. Units are kept in higher precision in that
order until the target cosine is reached, needless ones are pruned, and the suggestion, a recipe
that `extends:` the analysed one, is checked by a real quantize run of that recipe.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import yaml
from torch import nn

from quantkit import console
from quantkit.models import LoadedModel
from quantkit.plan import Plan
from quantkit.recipe import Precision, Recipe, Rule, shipped_recipes_dir

GRANULARITIES = ("auto", "rule", "block", "layer")
# `auto` ranks single layers up to this many quantized layers, else blocks (one evaluation per unit).
AUTO_LAYER_LIMIT = 64
SUGGESTION_FILE = "suggested-recipe.yaml"
RESULT_FILE = "sensitivity.json"


@dataclasses.dataclass
class Unit:
    """A set of layers (and/or the attention matmuls) quantized or kept together."""

    name: str
    layers: list[str]
    attention: bool = False
    cosine: float | None = None  # final-output cosine with only this unit quantized

    @property
    def damage(self) -> float:
        return 1.0 - (self.cosine if self.cosine is not None else 1.0)


@dataclasses.dataclass
class SensitivityResult:
    recipe: Recipe
    granularity: str
    target_cosine: float
    full_cosine: float
    units: list[Unit]  # ranked, most damaging first
    keep: list[str]  # layers to keep in higher precision
    keep_attention: bool
    reached_cosine: float  # of the suggestion, from a real quantize run of it when one was needed
    reached: bool
    steps: list[dict[str, Any]]
    # The figures hold for these samples: a quantize run on other (more) held-out samples measures afresh.
    samples: int = 0  # calibration samples given (calibration + held-out)
    heldout_samples: int = 0  # the held-out share every cosine here is measured on

    def __bool__(self) -> bool:
        return self.reached

    def override(self, keep_precision: Precision = Precision.SKIP) -> dict[str, Any]:
        """The suggestion as a recipe that extends the analysed one."""
        data: dict[str, Any] = {"name": f"{self.recipe.name}-sensitive", "extends": _extends_spec(self.recipe)}
        if self.keep:
            data["rules"] = [{"match": [_exact(n) for n in self.keep], "precision": str(keep_precision),
                              "note": "kept in higher precision by `quantkit sensitivity`"}]
        if self.keep_attention:
            data["attention"] = {"precision": "skip"}
        return data

    def override_yaml(self, keep_precision: Precision = Precision.SKIP) -> str:
        header = (f"# Suggested by `quantkit sensitivity` ({self.granularity} granularity): keeps the units that "
                  f"damage\n# {self.recipe.name} most out of quantization; cosine {self.reached_cosine:.6f} "
                  f"(target {self.target_cosine}) on {self.heldout_samples} held-out of {self.samples} samples;\n"
                  f"# `quantize --max-samples {self.samples}` (same --calib) evaluates it on the same held-out samples."
                  "\n")
        return header + yaml.safe_dump(self.override(keep_precision), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "granularity": self.granularity, "target_cosine": self.target_cosine,
                "full_cosine": self.full_cosine,
                "ranking": [{"unit": u.name, "layers": len(u.layers), "attention": u.attention, "cosine": u.cosine,
                             "damage": u.damage} for u in self.units],
                "keep": self.keep, "keep_attention": self.keep_attention, "reached_cosine": self.reached_cosine,
                "reached": self.reached, "samples": self.samples, "heldout_samples": self.heldout_samples,
                "steps": self.steps, "override": self.override()}


def _extends_spec(recipe: Recipe) -> str:
    """A shipped recipe by name (the suggestion then works in any checkout), anything else by its path."""
    if recipe.source:
        path = Path(recipe.source).resolve()
        try:
            if path.parent == shipped_recipes_dir().resolve():
                return path.stem
        except Exception:  # no shipped recipes in this installation: the path still works
            pass
        return str(path)
    return recipe.name


def _exact(name: str) -> str:
    """A glob that matches exactly this module (and its subtree)."""
    return re.sub(r"([\[\]?*])", r"[\1]", name)


def with_rules(recipe: Recipe, extra: list[Rule], attention: bool = True) -> Recipe:
    update: dict[str, Any] = {"rules": [*recipe.rules, *extra]}
    if not attention:
        update["attention"] = recipe.attention.model_copy(update={"precision": Precision.SKIP})
    return recipe.model_copy(update=update)


def keep_recipe(recipe: Recipe, keep: list[str], keep_attention: bool) -> Recipe:
    """`recipe` with `keep` layers (and the attention matmuls) left unquantized: what override() says."""
    extra = [Rule(match=[_exact(n) for n in keep], precision=Precision.SKIP)] if keep else []
    return with_rules(recipe, extra, attention=not keep_attention)


def _block_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.3`: the prefix up to the first numeric index."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def resolve_granularity(granularity: str, plan: Plan) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "auto":
        return "layer" if len(plan.quantized_layers()) <= AUTO_LAYER_LIMIT else "block"
    return granularity


def make_units(plan: Plan, granularity: str) -> list[Unit]:
    """The plan's quantized layers grouped by rule, block or layer, plus the attention matmuls if quantized."""
    units: dict[str, Unit] = {}
    for row in plan.quantized_layers():
        key = {"rule": row.rule, "layer": row.name, "block": _block_of(row.name)}[granularity]
        units.setdefault(key, Unit(key, [])).layers.append(row.name)
    out = list(units.values())
    if any(a.get("converted") and a.get("quantizers") for a in plan.attention):
        out.append(Unit("attention matmuls", [], attention=True))
    return out


class QuantizerSwitches:
    """Turns the quantizers of chosen units on and everything else the recipe quantized off.

    Quantizers are found by ModelOpt's naming (`<layer>.weight_quantizer`, `<attention>.q_bmm_quantizer`)
    and duck typing (`is_enabled`, `enable`, `disable`), so no ModelOpt import is needed here. Only
    quantizers the recipe left enabled are ever switched back on; `restore()` puts every one back.
    """

    def __init__(self, model: nn.Module, plan: Plan, units: Iterable[Unit]):
        quantizers = {name: m for name, m in model.named_modules()
                      if name.endswith("_quantizer") and hasattr(m, "is_enabled") and hasattr(m, "disable")}
        self._original = {name: bool(q.is_enabled) for name, q in quantizers.items()}
        self._quantizers = quantizers
        attention_names = {q for a in plan.attention if a.get("converted") for q in (a.get("quantizers") or {}).values()}
        self._of_unit: dict[str, list[str]] = {}
        for unit in units:
            layers = set(unit.layers)
            names = [n for n in quantizers if self._original[n] and
                     (n.rsplit(".", 1)[0] in layers or (unit.attention and n in attention_names))]
            self._of_unit[unit.name] = names
        self._managed = {n for names in self._of_unit.values() for n in names}

    def quantizers_of(self, unit: Unit) -> list[str]:
        return list(self._of_unit[unit.name])

    def only(self, units: Iterable[Unit]) -> None:
        on = {n for u in units for n in self._of_unit[u.name]}
        for name in self._managed:
            if name in on:
                self._quantizers[name].enable()
            else:
                self._quantizers[name].disable()

    def restore(self) -> None:
        for name, q in self._quantizers.items():
            if self._original[name]:
                q.enable()
            else:
                q.disable()


def _worst_cosine(metrics) -> float:
    return min((m.cosine if m.finite else -1.0) for m in metrics.values())


def analyse(make_loaded: Callable[[], LoadedModel], recipe: Recipe, calibration, *, target_cosine: float,
            granularity: str = "auto", dtype: str = "fp32", device: str | torch.device = "cpu",
            batch_size: int | None = None, max_steps: int = 32, verify: bool = True) -> SensitivityResult:
    """Rank units by damage and suggest the fewest to keep in higher precision to reach target_cosine.

    One calibration under the full recipe serves every trial: ModelOpt collects calibration
    statistics with quantization off, so a unit's scales do not depend on which other units are
    quantized, and switching quantizers off is the same as not quantizing those layers (exactly so
    for max/histogram calibration; SmoothQuant/AWQ leave their smoothing in the kept layers, which
    is exact in floating point). With verify, a fresh model is quantized under the suggestion and
    its cosine is the one reported.
    """
    from quantkit import ptq

    device = torch.device(device)
    batch_size = batch_size or recipe.calibration.batch_size
    calib_part, heldout = ptq.split_calibration(calibration, recipe)
    loaded = make_loaded()
    loaded.model.to(device=device, dtype=torch.float32)
    reference = ptq.run_outputs(loaded, loaded.model, heldout, batch_size, device, "fp32", "reference (fp32)")
    plan = ptq.quantize_model(loaded, recipe, calib_part, dtype=dtype, device=device, batch_size=batch_size)
    granularity = resolve_granularity(granularity, plan)
    units = make_units(plan, granularity)
    switches = QuantizerSwitches(loaded.model, plan, units)

    def cosine_with(quantized: list[Unit]) -> float:
        switches.only(quantized)
        outputs = ptq.run_outputs(loaded, loaded.model, heldout, batch_size, device, dtype, "evaluate")
        return _worst_cosine(ptq.compare_runs(reference, outputs))

    try:
        full = cosine_with(units)
        for i, unit in enumerate(units):
            unit.cosine = cosine_with([unit])
            console.info(f"[{i + 1}/{len(units)}] {unit.name}: cosine {unit.cosine:.6f} with only it quantized")
        units.sort(key=lambda u: u.damage, reverse=True)

        steps: list[dict[str, Any]] = [{"kept_units": 0, "cosine": full}]
        kept: list[Unit] = []
        cosine = full
        for unit in units[:max_steps]:
            if cosine >= target_cosine:
                break
            kept.append(unit)
            cosine = cosine_with([u for u in units if u not in kept])
            steps.append({"kept_units": len(kept), "unit": unit.name, "cosine": cosine})
            console.info(f"keeping {len(kept)} unit(s) (+{unit.name}): cosine {cosine:.6f}")
        if cosine >= target_cosine:
            # Greedy order can keep a unit that later ones made unnecessary: drop those, least damaging first.
            for unit in sorted(kept, key=lambda u: u.damage):
                trial = [u for u in kept if u is not unit]
                c = cosine_with([u for u in units if u not in trial])
                if c >= target_cosine:
                    kept, cosine = trial, c
                    steps.append({"kept_units": len(kept), "pruned": unit.name, "cosine": c})
                    console.info(f"{unit.name} is not needed: cosine {c:.6f} without keeping it")
    finally:
        switches.restore()

    keep = [n for u in units if u in kept for n in u.layers]
    keep_attention = any(u.attention for u in kept)
    if verify and kept:
        fresh = make_loaded()
        suggestion = keep_recipe(recipe, keep, keep_attention)
        fresh.model.to(device=device, dtype=torch.float32)
        ptq.quantize_model(fresh, suggestion, calib_part, dtype=dtype, device=device, batch_size=batch_size,
                           allow_nothing=True)  # a suggestion may keep every unit wide
        outputs = ptq.run_outputs(fresh, fresh.model, heldout, batch_size, device, dtype, "verify suggestion")
        verified = _worst_cosine(ptq.compare_runs(reference, outputs))
        steps.append({"kept_units": len(kept), "verified": True, "cosine": verified})
        console.info(f"suggestion quantized afresh: cosine {verified:.6f} (with quantizers switched off: {cosine:.6f})")
        cosine = verified
    return SensitivityResult(recipe, granularity, target_cosine, full, units, keep, keep_attention, cosine,
                             cosine >= target_cosine, steps, samples=len(calibration), heldout_samples=len(heldout))
