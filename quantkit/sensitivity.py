"""Sensitivity: which parts of a recipe do the most damage, and what to keep in higher precision.

Each unit (a recipe rule, the attention matmuls, or a single layer / block) is quantized alone and
the final output's cosine against FP32 ranks it. Then the units are kept in higher precision in
that order, one quantize run per step, until the full recipe reaches the target cosine; the
suggestion is a recipe override (one extra rule) that `extends:` the recipe.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch
import yaml

from quantkit import console
from quantkit.models import LoadedModel
from quantkit.plan import make_plan
from quantkit.recipe import Precision, Recipe, Rule


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
    target_cosine: float
    full_cosine: float
    units: list[Unit]  # ranked, most damaging first
    keep: list[str]  # layers to keep in higher precision
    keep_attention: bool
    reached_cosine: float
    reached: bool
    steps: list[dict[str, Any]]

    def override(self, keep_precision: Precision = Precision.SKIP) -> dict[str, Any]:
        """The suggestion as a recipe that extends the analysed one."""
        data: dict[str, Any] = {"name": f"{self.recipe.name}-sensitive", "extends": self.recipe.source or self.recipe.name}
        if self.keep:
            data["rules"] = [{"match": [_exact(n) for n in self.keep], "precision": str(keep_precision),
                              "note": "kept in higher precision by `quantkit sensitivity`"}]
        if self.keep_attention:
            data["attention"] = {"precision": "skip"}
        return data

    def override_yaml(self, keep_precision: Precision = Precision.SKIP) -> str:
        return yaml.safe_dump(self.override(keep_precision), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "target_cosine": self.target_cosine, "full_cosine": self.full_cosine,
                "ranking": [{"unit": u.name, "layers": len(u.layers), "cosine": u.cosine, "damage": u.damage}
                            for u in self.units],
                "keep": self.keep, "keep_attention": self.keep_attention, "reached_cosine": self.reached_cosine,
                "reached": self.reached, "steps": self.steps}


def _exact(name: str) -> str:
    """A glob that matches exactly this module (and its subtree)."""
    return re.sub(r"([\[\]?*])", r"[\1]", name)


def with_rules(recipe: Recipe, extra: list[Rule], attention: bool = True) -> Recipe:
    update: dict[str, Any] = {"rules": [*recipe.rules, *extra]}
    if not attention:
        update["attention"] = recipe.attention.model_copy(update={"precision": Precision.SKIP})
    return recipe.model_copy(update=update)


def _block_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.3`: the prefix up to the first numeric index."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def make_units(recipe: Recipe, model: torch.nn.Module, granularity: str) -> list[Unit]:
    plan = make_plan(model, recipe)
    rows = plan.quantized_layers()
    units: dict[str, Unit] = {}
    for row in rows:
        key = {"rule": row.rule, "layer": row.name, "block": _block_of(row.name)}[granularity]
        units.setdefault(key, Unit(key, [])).layers.append(row.name)
    out = list(units.values())
    if recipe.attention.precision != Precision.SKIP:
        out.append(Unit("attention matmuls", [], attention=True))
    return out


def analyse(make_loaded: Callable[[], LoadedModel], recipe: Recipe, calibration, *, target_cosine: float,
            granularity: str = "auto", dtype: str = "fp32", device: str | torch.device = "cpu",
            batch_size: int | None = None, max_steps: int = 32) -> SensitivityResult:
    """Rank units by damage and suggest the fewest to keep in higher precision to reach target_cosine."""
    from quantkit import ptq

    device = torch.device(device)
    batch_size = batch_size or recipe.calibration.batch_size
    calib_part, heldout = ptq.split_calibration(calibration, recipe)
    loaded = make_loaded()
    loaded.model.to(device=device, dtype=torch.float32)
    reference = ptq.run_outputs(loaded, loaded.model, heldout, batch_size, device, "fp32", "reference (fp32)")
    if granularity == "auto":
        n = len(make_plan(loaded.model, recipe).quantized_layers())
        granularity = "layer" if n <= 64 else "block"
    units = make_units(recipe, loaded.model, granularity)
    all_layers = [n for u in units for n in u.layers]

    def final_cosine(r: Recipe) -> float:
        lm = make_loaded()
        ptq.quantize_model(lm, r, calib_part, dtype=dtype, device=device, batch_size=batch_size)
        cand = ptq.run_outputs(lm, lm.model, heldout, batch_size, device, dtype, "evaluate")
        metrics = ptq.compare_runs(reference, cand)
        return min((m.cosine if m.finite else -1.0) for m in metrics.values())

    skip = Precision.SKIP
    for i, unit in enumerate(units):
        others = [n for n in all_layers if n not in unit.layers]
        extra = [Rule(match=[_exact(n) for n in others], precision=skip)] if others else []
        unit.cosine = final_cosine(with_rules(recipe, extra, attention=unit.attention))
        console.info(f"[{i + 1}/{len(units)}] {unit.name}: cosine {unit.cosine:.6f} with only it quantized")
    units.sort(key=lambda u: u.damage, reverse=True)

    full = final_cosine(recipe)
    steps = [{"kept_units": 0, "cosine": full}]
    keep: list[str] = []
    keep_attention = False
    cosine = full
    for k, unit in enumerate(units[:max_steps], start=1):
        if cosine >= target_cosine:
            break
        keep += unit.layers
        keep_attention = keep_attention or unit.attention
        extra = [Rule(match=[_exact(n) for n in keep], precision=skip)] if keep else []
        cosine = final_cosine(with_rules(recipe, extra, attention=not keep_attention))
        steps.append({"kept_units": k, "unit": unit.name, "cosine": cosine})
        console.info(f"keeping {k} unit(s) (+{unit.name}): cosine {cosine:.6f}")
    return SensitivityResult(recipe, target_cosine, full, units, keep, keep_attention, cosine,
                             cosine >= target_cosine, steps)
