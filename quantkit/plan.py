"""The plan: which precision each layer of a model gets, and which recipe rule decided it.

`make_plan(model, recipe)` walks the model's quantizable leaf modules (Linear, Conv, Embedding),
infers each one's role (quantkit.roles), applies the recipe's rules by name, type and role (the last
matching rule wins), gives layers that share a weight one precision, checks that each layer's shape
suits its format, and returns a `Plan` with per-layer rows, a coverage summary and warnings (rules
that matched nothing, precisions not native on the targets, shape fallbacks). No ModelOpt here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from torch import nn

from quantkit.errors import PlanError
from quantkit.layers import class_names, iter_layers
from quantkit.recipe import FORMATS, Precision, Recipe, Rule
from quantkit.roles import infer_roles

QUANTIZABLE_KINDS = {"linear", "conv"}  # what ModelOpt can put quantizers on (an Embedding has none)
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _types_match(rule: Rule, module: nn.Module) -> bool:
    if not rule.types:
        return True
    names = set(class_names(module))
    if "Conv1D" in names:  # transformers' GPT-2 Conv1D is a Linear with its weight stored transposed
        names.add("Linear")
    qualified = {f"{c.__module__}.{c.__name__}" for c in type(module).__mro__}
    return any(t in names or t in qualified for t in rule.types)


def _weight_shape(module: nn.Module) -> list[int]:
    w = getattr(module, "weight", None)
    return list(w.shape) if w is not None else []


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _in_features(module: nn.Module, kind: str) -> int | None:
    if kind != "linear":
        return None
    if hasattr(module, "in_features"):
        return int(module.in_features)
    shape = _weight_shape(module)  # Conv1D stores (in, out)
    return shape[0] if shape else None


@dataclasses.dataclass
class LayerPlan:
    name: str
    type: str
    kind: str
    shape: list[int]
    params: int
    precision: Precision  # what the layer runs in (after any fallback)
    weights: Precision | None  # quantized weight format, None when not quantized
    activations: Precision | None  # quantized input format, None when inputs stay in floating point
    rule: str  # "rules[2] (*mlp* [Linear])", "default" ...
    rule_index: int | None
    calibrator: str | None = None
    note: str | None = None
    role: str | None = None  # quantkit.roles: what the layer does; None when it could not be inferred
    role_how: str = ""  # how the role was inferred
    shares_weight_with: list[str] = dataclasses.field(default_factory=list)
    algorithm: str | None = None  # the rule's NVFP4 weight algorithm (recipe.WEIGHT_ALGORITHMS), if it applies

    @property
    def quantized(self) -> bool:
        return self.weights is not None or self.activations is not None

    def weight_bytes(self, model_dtype: str) -> int:
        if self.precision == Precision.SKIP:
            return self.params * DTYPE_BYTES[model_dtype]
        fmt = FORMATS[self.weights] if self.weights else FORMATS[self.precision]
        return int(round(self.params * fmt.bytes_per_weight))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("precision", "weights", "activations"):
            d[k] = None if d[k] is None else str(d[k])
        return d


@dataclasses.dataclass
class Plan:
    recipe: Recipe
    model_dtype: str
    layers: list[LayerPlan]
    unmatched_rules: list[str]
    warnings: list[str]
    # Filled by the stages that act on the plan (protect, attention); shown in plan.json.
    protections: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attention: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Layers that hold one and the same weight tensor, and the one precision they got.
    shared_weights: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    role_notes: list[str] = dataclasses.field(default_factory=list)

    def roles_not_inferred(self) -> list[str]:
        return [r.name for r in self.layers if r.role is None]

    def layer(self, name: str) -> LayerPlan:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def quantized_layers(self) -> list[LayerPlan]:
        return [row for row in self.layers if row.quantized]

    def coverage(self) -> dict[str, Any]:
        """Layers, parameters and weight bytes per precision ('unquantized' = left as the model is)."""
        total_params = sum(r.params for r in self.layers)
        linear_params = sum(r.params for r in self.layers if r.kind == "linear")
        by: dict[str, dict[str, Any]] = {}
        for r in self.layers:
            key = "unquantized" if r.precision == Precision.SKIP else str(r.precision)
            row = by.setdefault(key, {"layers": 0, "params": 0, "linear_params": 0, "weight_bytes": 0})
            row["layers"] += 1
            row["params"] += r.params
            row["linear_params"] += r.params if r.kind == "linear" else 0
            row["weight_bytes"] += r.weight_bytes(self.model_dtype)
        for row in by.values():
            row["param_fraction"] = row["params"] / total_params if total_params else 0.0
            row["linear_param_fraction"] = row["linear_params"] / linear_params if linear_params else 0.0
        order = [p.value for p in Precision if p != Precision.SKIP] + ["unquantized"]
        return {
            "by_precision": {k: by[k] for k in order if k in by},
            "total_params": total_params,
            "weight_bytes_before": total_params * DTYPE_BYTES[self.model_dtype],
            "weight_bytes_after": sum(r["weight_bytes"] for r in by.values()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": {"name": self.recipe.name, "source": self.recipe.source, "sha256": self.recipe.sha256(),
                       "targets": list(self.recipe.targets)},
            "model_dtype": self.model_dtype,
            "layers": [r.to_dict() for r in self.layers],
            "coverage": self.coverage(),
            "protected": list(self.protections),
            "attention": list(self.attention),
            "shared_weights": list(self.shared_weights),
            "roles_not_inferred": self.roles_not_inferred(),
            "role_notes": list(self.role_notes),
            "unmatched_rules": list(self.unmatched_rules),
            "warnings": list(self.warnings),
        }


def _decide(recipe: Recipe, name: str, module: nn.Module, role: str | None = None
            ) -> tuple[Rule | None, int | None, list[int]]:
    """The winning rule (last match) and the indices of every rule that matched."""
    matched = [i for i, rule in enumerate(recipe.rules)
               if _types_match(rule, module) and rule.selects_role(role) and any(p.matches(name) for p in rule.patterns())]
    if not matched:
        return None, None, []
    return recipe.rules[matched[-1]], matched[-1], matched


def _fallback_reason(fmt_precision: Precision, kind: str, in_features: int | None) -> str | None:
    fmt = FORMATS[fmt_precision]
    if not fmt.quantized:
        return None
    if kind not in QUANTIZABLE_KINDS:
        return f"{fmt_precision} needs a layer ModelOpt can quantize (Linear/Conv), not an {kind}"
    if fmt.block_size:
        if kind != "linear":
            return f"{fmt_precision} applies to Linear layers only"
        if in_features is None or in_features % fmt.block_size:
            return f"{fmt_precision} needs in_features % {fmt.block_size} == 0, this layer has {in_features}"
    return None


def _layer_row(recipe: Recipe, name: str, module: nn.Module, kind: str, warnings: list[str],
               role: Any = None, forced: tuple[Rule | None, int | None] | None = None) -> LayerPlan:
    rule, index = forced if forced is not None else _decide(recipe, name, module, getattr(role, "role", None))[:2]
    type_name = type(module).__name__
    shape, params = _weight_shape(module), _param_count(module)
    if rule is None:
        precision, weights, acts, calibrator, fallback, algorithm = recipe.default, None, None, None, None, None
        rule_text = "default"
    else:
        precision, calibrator, fallback, algorithm = rule.precision, rule.calibrator, rule.fallback, rule.algorithm
        weights, acts = rule.weight_precision, rule.activation_precision
        rule_text = f"rules[{index}] ({rule.describe()})"
    note = None
    if FORMATS[precision].quantized:
        in_f = _in_features(module, kind)
        reasons = [r for r in (_fallback_reason(p, kind, in_f) for p in {weights, acts} if p) if r]
        if reasons:
            to = fallback or Precision.SKIP
            note = f"falls back to {to}: {reasons[0]}"
            warnings.append(f"{name}: {note} ({rule_text})")
            precision, calibrator = to, (calibrator if FORMATS[to].quantized else None)
            weights = acts = to
            algorithm = None  # an NVFP4 weight algorithm does not apply to the fallback format
    if not FORMATS[precision].quantized:
        weights = acts = None
    elif acts is not None and not FORMATS[acts].quantized:
        acts = None  # weight-only quantization: inputs stay in floating point
    return LayerPlan(name=name, type=type_name, kind=kind, shape=shape, params=params, precision=precision,
                     weights=weights, activations=acts, rule=rule_text, rule_index=index,
                     calibrator=calibrator, note=note, role=getattr(role, "role", None),
                     role_how=getattr(role, "how", ""), algorithm=algorithm if weights == Precision.NVFP4 else None)


def _shared_groups(model: nn.Module) -> list[list[str]]:
    """Planned layers that hold one and the same parameter (tied embeddings / lm_head), in model order."""
    owners: dict[int, list[str]] = {}
    for name, module, _ in iter_layers(model):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), [])
            if name not in owners[id(p)]:
                owners[id(p)].append(name)
    groups: list[list[str]] = []
    for names in owners.values():
        if len(names) < 2:
            continue
        hit = next((g for g in groups if set(g) & set(names)), None)
        if hit is None:
            groups.append(list(names))
        else:
            hit.extend(n for n in names if n not in hit)
    return groups


def _storage_dtype(row: LayerPlan, model_dtype: str) -> str:
    """The dtype the layer's parameters are stored in once the plan is applied (casts for fp16/bf16/fp32)."""
    fmt = FORMATS[row.precision]
    if row.precision == Precision.SKIP or fmt.quantized or fmt.torch_dtype is None:
        return model_dtype
    return str(row.precision)


def _resolve_shared(model: nn.Module, recipe: Recipe, rows: list[LayerPlan], model_dtype: str,
                    roles: Mapping[str, Any], warnings: list[str]) -> list[dict[str, Any]]:
    """One precision per group of layers sharing a weight: the last recipe rule that matches any of
    them decides (as everywhere in a recipe). Quantizers never change the stored tensor, but a cast
    does: a member that would cast the shared tensor while another member keeps it stays as it is."""
    by_name = {r.name: r for r in rows}
    modules = dict(model.named_modules())
    out = []
    for group in _shared_groups(model):
        members = [by_name[n] for n in group]
        winner = max(members, key=lambda r: -1 if r.rule_index is None else r.rule_index)
        differing = sorted({str(r.precision) for r in members})
        if len(differing) > 1:
            warnings.append(f"{', '.join(group)} share one weight but the recipe gives them {' / '.join(differing)} "
                            f"({'; '.join(f'{r.name}: {r.rule}' for r in members)}); {winner.rule} decides for all")
        rule = recipe.rules[winner.rule_index] if winner.rule_index is not None else None
        resolved = []
        for r in members:
            new = _layer_row(recipe, r.name, modules[r.name], r.kind, warnings, roles.get(r.name),
                             forced=(rule, winner.rule_index))
            resolved.append(new)
        dtypes = {_storage_dtype(r, model_dtype) for r in resolved}
        if len(dtypes) > 1:  # e.g. an FP16 cast for one, a quantized (model-dtype) weight for the other
            kept = []
            for i, r in enumerate(resolved):
                if _storage_dtype(r, model_dtype) != model_dtype:
                    r = dataclasses.replace(r, precision=Precision.SKIP, weights=None, activations=None,
                                            calibrator=None, note=f"stays {model_dtype}: a cast would change the "
                                            "weight it shares with " + ", ".join(n for n in group if n != r.name))
                    warnings.append(f"{r.name}: {r.note}")
                kept.append(r)
            resolved = kept
        for r in resolved:
            r.shares_weight_with = [n for n in group if n != r.name]
            rows[rows.index(by_name[r.name])] = r
            by_name[r.name] = r
        out.append({"layers": list(group), "precision": sorted({str(r.precision) for r in resolved}),
                    "decided_by": winner.rule, "decided_by_layer": winner.name})
    return out


def make_plan(model: nn.Module, recipe: Recipe, model_dtype: str = "fp32", strict: bool = False,
              example: Mapping[str, Any] | None = None) -> Plan:
    """Plan `model` under `recipe`. With strict, a rule that matches nothing raises PlanError.

    `example` (keyword inputs on the model's device) lets quantkit.roles run one probe forward to
    read the model's structure; without it, roles come from the module tree and names."""

    warnings: list[str] = []
    roles, role_notes = infer_roles(model, example)
    layers = [_layer_row(recipe, name, module, kind, warnings, roles.get(name))
              for name, module, kind in iter_layers(model)]
    if not layers:
        raise PlanError(f"{type(model).__name__}: no Linear, Conv or Embedding layers found; nothing to plan")
    shared = _resolve_shared(model, recipe, layers, model_dtype, roles, warnings)
    matched_any = set()
    winners = {r.rule_index for r in layers}
    for name, module, _ in iter_layers(model):
        matched_any.update(_decide(recipe, name, module, getattr(roles.get(name), "role", None))[2])
    unmatched = []
    source = recipe.source or recipe.name
    for i, rule in enumerate(recipe.rules):
        if i not in matched_any and not rule.optional:
            unmatched.append(f"rules[{i}] ({rule.describe()}) matched no layer")
        elif i in matched_any and i not in winners:
            warnings.append(f"rules[{i}] ({rule.describe()}) matched layers, but later rules override all of them")
    if unmatched and strict:
        raise PlanError(f"{source}: " + "; ".join(unmatched) + " (--strict); fix the patterns or drop the rules")
    warnings = [f"{u} — patterns that miss leave layers unquantized" for u in unmatched] + warnings
    warnings += recipe.native_warnings()
    algorithms = {r.calibrator for r in layers if r.calibrator in ("smoothquant", "awq")}
    if len(algorithms) > 1:
        raise PlanError(f"{source}: rules ask for calibrators {sorted(algorithms)}; ModelOpt runs one calibration "
                        "algorithm per model: pick one")
    if algorithms and recipe.calibration.algorithm not in algorithms:
        warnings.append(f"rules ask for {algorithms.pop()} but calibration.algorithm is "
                        f"{recipe.calibration.algorithm}; the rule's calibrator is used")
    return Plan(recipe=recipe, model_dtype=model_dtype, layers=layers, unmatched_rules=unmatched, warnings=warnings,
                shared_weights=shared, role_notes=role_notes)


def calibration_algorithm(plan: Plan) -> str:
    """The one ModelOpt algorithm this plan calibrates with (a rule's smoothquant/awq wins)."""
    for row in plan.layers:
        if row.calibrator in ("smoothquant", "awq"):
            return row.calibrator
    return plan.recipe.calibration.algorithm
