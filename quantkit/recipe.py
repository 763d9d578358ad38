"""The recipe: a declarative YAML file saying which layers run in which precision.

Owns the schema (pydantic), the one definition of what each precision means (`FORMATS`), YAML
loading with `extends:`, name matching (`NamePattern`), and errors that name the file, rule and
field. Nothing here knows torch or ModelOpt: everything downstream reads typed `Recipe` objects.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from enum import Enum
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantkit.errors import RecipeError
from quantkit.textlimits import shorten


class Precision(str, Enum):
    NVFP4 = "nvfp4"
    FP8 = "fp8"
    INT8 = "int8"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value


PRECISION_ALIASES = {"fp4": Precision.NVFP4, "e4m3": Precision.FP8, "float16": Precision.FP16,
                     "bfloat16": Precision.BF16, "float32": Precision.FP32, "none": Precision.SKIP}


@dataclass(frozen=True)
class Format:
    """What a precision means. The single source of truth: modelopt_config, plan and export read it."""

    precision: Precision
    quantized: bool  # has Q/DQ (a ModelOpt quantizer) rather than a plain dtype
    bits: int
    # ModelOpt's num_bits: an int for integer formats, (exponent, mantissa) for float formats.
    num_bits: int | tuple[int, int] | None = None
    block_size: int | None = None  # elements per scale block along the last axis
    scale_format: str = ""  # how scales are stored
    scale_bits: tuple[int, int] | None = None  # ModelOpt scale_bits for block scales
    weight_axis: int | None = None  # per-channel axis for weights; None = per-tensor
    # Bytes a weight element costs on disk, block scales included (NVFP4: 4 bits + one FP8 scale per 16).
    bytes_per_weight: float = 4.0
    torch_dtype: str | None = None  # for the plain-dtype formats
    native_on: frozenset[str] = frozenset()  # targets whose tensor cores run it


_ALL_TARGETS = frozenset({"blackwell", "thor", "hopper", "ada", "ampere", "orin", "cpu"})

FORMATS: dict[Precision, Format] = {
    Precision.NVFP4: Format(
        Precision.NVFP4, True, 4, num_bits=(2, 1), block_size=16,
        scale_format="FP8 E4M3 per 16-element block, FP32 per-tensor second level", scale_bits=(4, 3),
        bytes_per_weight=0.5 + 1 / 16, native_on=frozenset({"blackwell", "thor"})),
    Precision.FP8: Format(
        Precision.FP8, True, 8, num_bits=(4, 3), scale_format="FP32 per tensor",
        bytes_per_weight=1.0, native_on=frozenset({"blackwell", "thor", "hopper", "ada"})),
    Precision.INT8: Format(
        Precision.INT8, True, 8, num_bits=8, scale_format="FP32 per output channel (weights), per tensor (activations)",
        weight_axis=0, bytes_per_weight=1.0,
        native_on=frozenset({"blackwell", "thor", "hopper", "ada", "ampere", "orin"})),
    Precision.FP16: Format(Precision.FP16, False, 16, bytes_per_weight=2.0, torch_dtype="float16",
                           native_on=_ALL_TARGETS - {"cpu"}),
    Precision.BF16: Format(Precision.BF16, False, 16, bytes_per_weight=2.0, torch_dtype="bfloat16",
                           native_on=_ALL_TARGETS - {"cpu"}),
    Precision.FP32: Format(Precision.FP32, False, 32, bytes_per_weight=4.0, torch_dtype="float32",
                           native_on=_ALL_TARGETS),
    Precision.SKIP: Format(Precision.SKIP, False, 0, bytes_per_weight=0.0, native_on=_ALL_TARGETS),
}

TARGETS: dict[str, str] = {
    "blackwell": "B200/GB200 (SM100): NVFP4, FP8, INT8",
    "thor": "Jetson Thor (Blackwell): NVFP4, FP8, INT8",
    "hopper": "H100/H200 (SM90): FP8, INT8",
    "ada": "L4/L40/RTX 40 (SM89): FP8, INT8",
    "ampere": "A100/RTX 30 (SM80/86): INT8, FP16",
    "orin": "Jetson Orin (Ampere): INT8, FP16",
    "cpu": "CPU (simulation only)",
}

CALIBRATORS = ("max", "percentile", "entropy", "mse", "smoothquant", "awq")

# What a layer does, as quantkit.roles infers it from the model's structure; a rule's `roles:` picks by
# them. Defined here (the schema validates them); quantkit.roles reads them from here.
ROLES = ("attention_q", "attention_k", "attention_v", "attention_qkv", "attention_out",
         "mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down",
         "head", "embedding", "projector", "conditioning", "conv")
ROLE_GROUPS = {"attention": ("attention_q", "attention_k", "attention_v", "attention_qkv", "attention_out"),
               "mlp": ("mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down")}


def expand_roles(names: list[str]) -> frozenset[str]:
    """Role names with the groups (`attention`, `mlp`) spelled out."""
    out: set[str] = set()
    for n in names:
        out |= set(ROLE_GROUPS.get(n, (n,)))
    return frozenset(out)

# ModelOpt 0.47's NVFP4 weight algorithms a rule can name (`algorithm:`), and the weight precisions
# each fits: they choose NVFP4 block scales (four-over-six, the MSE / FP8 scale sweep, local
# Hessian) or rewrite weights against NVFP4 rounding (AWQ lite / clip / full, GPTQ).
# The NVFP4 weight algorithm `quantkit autotune` tries where a rule names none: the best of the
# algorithms measured on MiniLM's MLPs (BENCHMARKS.md, H200: gptq 0.9753 against 0.9614 without one);
# it costs one GPTQ pass per rung that uses it (about 40 s for MiniLM on two CPU cores).
DEFAULT_NVFP4_ALGORITHM = "gptq"
# Calibrators that rewrite the weights themselves: a rule cannot also name a weight `algorithm`.
WEIGHT_REWRITING_CALIBRATORS = ("smoothquant", "awq")
WEIGHT_ALGORITHMS: dict[str, frozenset[Precision]] = {
    name: frozenset({Precision.NVFP4})
    for name in ("four_over_six", "mse_fp8_sweep", "local_hessian", "awq_lite", "awq_clip", "awq_full", "gptq")
}
PROTECTABLE_OPS = ("softmax", "rmsnorm", "layernorm", "groupnorm", "batchnorm", "rope")


def parse_precision(value: Any) -> Precision:
    if isinstance(value, Precision):
        return value
    text = str(value).strip().lower()
    if text in PRECISION_ALIASES:
        return PRECISION_ALIASES[text]
    try:
        return Precision(text)
    except ValueError:
        valid = ", ".join(p.value for p in Precision)
        raise ValueError(f"{shorten(value)} is not one of {valid} (alias fp4 = nvfp4)") from None


@dataclass(frozen=True)
class NamePattern:
    """A pattern on dotted module names.

    Glob (default): fnmatch on the whole name, where `*` also crosses dots (as in ModelOpt), and a
    pattern that matches a module also matches everything inside it: `layers.1` covers
    `layers.1.mlp.up_proj` but never `layers.10` (the match must end at a dot). Regex (`re:` prefix):
    `re.fullmatch` against the name or any of its dotted prefixes, with the same subtree rule.
    """

    text: str

    @property
    def is_regex(self) -> bool:
        return self.text.startswith("re:")

    def compiled(self) -> re.Pattern[str]:
        if self.is_regex:
            return re.compile(self.text[3:])
        return re.compile(fnmatch.translate(self.text))

    def matches(self, name: str) -> bool:
        rx = self.compiled()
        parts = name.split(".")
        return any(rx.fullmatch(".".join(parts[:i])) for i in range(len(parts), 0, -1))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class Rule(_Strict):
    """One line of the recipe: which modules (by name and type) get which precision."""

    match: list[str] = Field(default_factory=lambda: ["*"], description="glob(s) on module names; 're:' for regex")
    types: list[str] | None = Field(None, description="module class names, e.g. Linear, Conv2d (base classes count)")
    roles: list[str] | None = Field(None, description="layer roles (quantkit.roles), e.g. mlp, attention, head")
    precision: Precision
    weights: Precision | None = Field(None, description="weight format if it differs from `precision`")
    activations: Precision | None = Field(None, description="input-activation format if it differs")
    calibrator: Literal["max", "percentile", "entropy", "mse", "smoothquant", "awq"] | None = None
    algorithm: str | None = Field(None, description="NVFP4 weight algorithm, one of WEIGHT_ALGORITHMS")
    fallback: Precision | None = Field(None, description="precision for layers whose shape the format cannot take")
    note: str | None = None
    # A rule of a generic recipe that may legitimately match nothing in a given model (heads,
    # convs): no "matched no layer" warning, and --strict does not fail on it.
    optional: bool = False

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("match")
    @classmethod
    def _valid_patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one pattern")
        for p in v:
            if not p:
                raise ValueError("an empty pattern matches nothing")
            try:
                NamePattern(p).compiled()
            except re.error as e:
                raise ValueError(f"bad regex {shorten(p[3:])}: {e}") from None
        return v

    @field_validator("roles", mode="before")
    @classmethod
    def _roles_one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one role (or leave `roles:` out)")
        for r in v:
            if r not in ROLES and r not in ROLE_GROUPS:
                raise ValueError(f"{r!r} is not a layer role; valid roles: {', '.join((*ROLE_GROUPS, *ROLES))}")
        return v

    @field_validator("precision", "weights", "activations", "fallback", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        return None if v is None else parse_precision(v)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str | None) -> str | None:
        if v is not None and v not in WEIGHT_ALGORITHMS:
            raise ValueError(f"{v!r} is not one of {', '.join(WEIGHT_ALGORITHMS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Rule":
        fmt = FORMATS[self.precision]
        if self.weights is not None and not FORMATS[self.weights].quantized and self.weights != self.precision:
            raise ValueError(f"weights: {self.weights} is not a quantized format; set precision: {self.weights} instead")
        if (self.weights or self.activations) and not fmt.quantized:
            raise ValueError(f"weights/activations overrides need a quantized precision, not {self.precision}")
        if self.calibrator and not fmt.quantized:
            raise ValueError(f"calibrator: {self.calibrator} has nothing to calibrate for precision {self.precision}")
        if self.algorithm and self.weight_precision not in WEIGHT_ALGORITHMS[self.algorithm]:
            fits = ", ".join(sorted(str(p) for p in WEIGHT_ALGORITHMS[self.algorithm]))
            raise ValueError(f"algorithm: {self.algorithm} is an algorithm for {fits} weights, and this rule's "
                             f"weights are {self.weight_precision}; drop it or set precision: nvfp4")
        if self.algorithm and self.calibrator in WEIGHT_REWRITING_CALIBRATORS:
            raise ValueError(f"algorithm: {self.algorithm} and calibrator: {self.calibrator} both rewrite the "
                             "weights; pick one")
        if self.fallback is not None and self.fallback == Precision.NVFP4:
            raise ValueError("fallback: nvfp4 cannot be a fallback (it is the format with shape limits)")
        return self

    @property
    def weight_precision(self) -> Precision:
        return self.weights or self.precision

    @property
    def activation_precision(self) -> Precision:
        return self.activations or self.precision

    def patterns(self) -> list[NamePattern]:
        return [NamePattern(p) for p in self.match]

    def selects_role(self, role: str | None) -> bool:
        """True when the rule has no `roles:` or `role` is one of them (groups spelled out)."""
        return self.roles is None or (role is not None and role in expand_roles(self.roles))

    def describe(self) -> str:
        what = ",".join(self.match)
        if self.roles:
            what = f"roles {','.join(self.roles)}" + ("" if self.match == ["*"] else f" & {what}")
        if self.types:
            what += f" [{','.join(self.types)}]"
        return what


class ProtectSpec(_Strict):
    """Which numerically sensitive ops are kept in FP32 (consumed by quantkit.protect)."""

    softmax: bool = True
    rmsnorm: bool = True
    layernorm: bool = True
    groupnorm: bool = True  # GroupNorm and InstanceNorm (VAE / UNet / diffusion-policy conv stacks)
    batchnorm: bool = True  # BatchNorm that TensorRT cannot fold into the conv before it
    rope: bool = True
    # Extra module classes to run in FP32: a class name ("MyNorm") or "package.module:Class".
    modules: list[str] = Field(default_factory=list)
    # Extra functions to run in FP32 (inputs upcast, outputs cast back): "package.module:function".
    functions: list[str] = Field(default_factory=list)

    @field_validator("functions")
    @classmethod
    def _qualified(cls, v: list[str]) -> list[str]:
        for f in v:
            if ":" not in f:
                raise ValueError(f"{shorten(f)} must be 'package.module:function'")
        return v

    def enabled_ops(self) -> list[str]:
        return [op for op in PROTECTABLE_OPS if getattr(self, op)]


class AttentionSpec(_Strict):
    """Precision of the matmuls inside attention (Q·Kᵀ and P·V) and of the softmax output P."""

    precision: Precision = Precision.SKIP  # skip: leave the attention matmuls unquantized
    quantize_softmax_output: bool = False
    match: list[str] = Field(default_factory=lambda: ["*"], description="which attention modules to convert")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        return parse_precision(v)

    @field_validator("precision")
    @classmethod
    def _quantized_or_skip(cls, v: Precision) -> Precision:
        if v not in (Precision.FP8, Precision.INT8, Precision.SKIP):
            raise ValueError(f"{v} is not supported for attention matmuls; use fp8, int8 or skip")
        return v

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CalibrationSpec(_Strict):
    algorithm: Literal["max", "smoothquant", "awq", "mse"] = "max"
    smoothquant_alpha: float = Field(0.5, ge=0.0, le=1.0)
    max_samples: int | None = Field(None, gt=0)
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    batch_size: int = Field(8, gt=0)


class ThresholdSpec(_Strict):
    cosine_min: float | None = Field(None, ge=-1.0, le=1.0, description="default by recipe precision")
    snr_min_db: float | None = None


class ShapeRange(_Strict):
    min: list[int]
    opt: list[int]
    max: list[int]

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError("min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (0 < lo <= mid <= hi):
                raise ValueError(f"need 0 < min <= opt <= max per dimension, got {self.min}/{self.opt}/{self.max}")
        return self


class ExportSpec(_Strict):
    opset: int | None = Field(None, ge=17, le=25, description="default: the lowest opset the formats need")
    io_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    weights_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    dynamic_axes: dict[str, dict[int, str]] = Field(default_factory=dict)


class BuildSpec(_Strict):
    # One optimization profile ({input: shapes}) or a list of them, all built into one engine.
    profiles: dict[str, ShapeRange] | list[dict[str, ShapeRange]] = Field(default_factory=dict)
    workspace_gib: float = Field(4.0, gt=0)
    optimization_level: int = Field(3, ge=0, le=5)
    cuda_graph: bool = False

    @model_validator(mode="after")
    def _same_inputs(self) -> "BuildSpec":
        if isinstance(self.profiles, list):
            if not self.profiles:
                raise ValueError("profiles: an empty list; give one {input: {min, opt, max}} per profile")
            names = [sorted(p) for p in self.profiles]
            for i, n in enumerate(names):
                if n != names[0]:
                    raise ValueError(f"profiles[{i}] names inputs {n}, profiles[0] names {names[0]}: "
                                     f"every profile gives shapes for the same inputs")
        return self

    def profile_list(self) -> list[dict[str, ShapeRange]]:
        """The build profiles as a list (one dict of input shapes per optimization profile)."""
        if isinstance(self.profiles, list):
            return list(self.profiles)
        return [self.profiles] if self.profiles else []

    def envelope(self) -> dict[str, ShapeRange]:
        """Per input, the smallest range that holds every profile (the dims the graph must leave dynamic)."""
        out: dict[str, ShapeRange] = {}
        for profile in self.profile_list():
            for name, r in profile.items():
                if name not in out:
                    out[name] = r
                else:
                    o = out[name]
                    out[name] = ShapeRange(min=[min(a, b) for a, b in zip(o.min, r.min)], opt=o.opt,
                                           max=[max(a, b) for a, b in zip(o.max, r.max)])
        return out


class Recipe(_Strict):
    """A validated recipe. Load with `load_recipe(name_or_path)`."""

    name: str
    description: str = ""
    extends: str | None = None
    targets: list[str] = Field(default_factory=list)
    default: Precision = Precision.SKIP
    rules: list[Rule] = Field(default_factory=list)
    protect: ProtectSpec = Field(default_factory=ProtectSpec)
    attention: AttentionSpec = Field(default_factory=AttentionSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    thresholds: ThresholdSpec = Field(default_factory=ThresholdSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    build: BuildSpec = Field(default_factory=BuildSpec)
    source: str | None = Field(None, exclude=True, description="file it was loaded from")

    @field_validator("default", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        return parse_precision(v)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in TARGETS:
                raise ValueError(f"{shorten(t)} is not a known target; use one of {', '.join(TARGETS)}")
        return v

    def precisions_used(self) -> set[Precision]:
        used = {self.default}
        for r in self.rules:
            used |= {r.weight_precision, r.activation_precision}
            if r.fallback:
                used.add(r.fallback)
        if self.attention.precision != Precision.SKIP:
            used.add(self.attention.precision)
        return used

    def native_warnings(self) -> list[str]:
        """One line per (rule, target) whose precision does not run natively on that target."""
        out = []
        for t in self.targets:
            for i, r in enumerate(self.rules):
                for p in {r.weight_precision, r.activation_precision}:
                    if p != Precision.SKIP and t not in FORMATS[p].native_on:
                        out.append(f"rules[{i}] ({r.describe()}): {p} does not run natively on {t} ({TARGETS[t]})")
            p = self.attention.precision
            if p != Precision.SKIP and t not in FORMATS[p].native_on:
                out.append(f"attention: {p} does not run natively on {t} ({TARGETS[t]})")
        return out

    def default_cosine_min(self) -> float:
        """Pass threshold when the recipe sets none: 0.999 without Q/DQ, 0.99 for FP8/INT8, 0.95 with NVFP4.

        NVFP4 quantizes activations to 4 bits too (W4A4). Held-out cosine of the shipped `balanced`
        recipe (NVFP4 MLPs, FP8 attention), measured per model (README / BENCHMARKS.md):
          MiniLM, real weights, CPU, 49 held-out sentences (`make demo`)        0.961
          llama-tiny, random weights, CPU, 49 held-out (`quantize --recipe balanced`)  0.988
          2.1B Llama-shaped decoder, random weights, H200, NVFP4 simulated      0.980
          SigLIP-so400m vision tower, random weights, H200, NVFP4 simulated    0.982
        and for MiniLM's MLP linears alone in NVFP4 (mean-pooled embeddings, 128 held-out sentences,
        CPU) 0.957 with max calibration, 0.961 with `algorithm: four_over_six`. The gate sits below
        the worst of these (0.961) so that `balanced` passes on every model it was measured on;
        a recipe that needs more says so in `thresholds.cosine_min`, and `quantkit autotune` finds
        the layers to move to GPTQ weights, FP8 activations (W4A8) or FP8 to reach it (MiniLM:
        0.961 -> 0.990 with every MLP linear's weights still NVFP4).
        """
        if self.thresholds.cosine_min is not None:
            return self.thresholds.cosine_min
        used = self.precisions_used()
        if Precision.NVFP4 in used:
            return 0.95
        if used & {Precision.FP8, Precision.INT8}:
            return 0.99
        return 0.999

    def resolved(self) -> "Recipe":
        """This recipe with its accuracy gate written out (`default_cosine_min` when it sets none):
        what a run folder's recipe.yaml holds, so a later quantkit with other defaults keeps its verdict."""
        if self.thresholds.cosine_min is not None:
            return self
        return self.model_copy(update={"thresholds": self.thresholds.model_copy(
            update={"cosine_min": self.default_cosine_min()})})

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"source"}, exclude_none=True)
        data.pop("extends", None)  # resolved: parents are merged in
        return yaml.safe_dump(data, sort_keys=False)

    def sha256(self) -> str:
        """The recipe's hash: sha256 of the resolved recipe's YAML, i.e. of recipe.yaml's bytes as a run
        writes them. report.json, plan.json and engine.json (which hashes the file) all carry this one."""
        return hashlib.sha256(self.resolved().to_yaml().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def shipped_recipes_dir() -> Path:
    """recipes/ of a checkout (editable install) or the quantkit.recipes data package of a wheel."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    # A wheel installs recipes/ as the namespace package quantkit.recipes (no __init__.py), whose
    # resources.files() is a MultiplexedPath: take its real folder from the import spec.
    spec = importlib.util.find_spec("quantkit.recipes")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the shipped recipes are missing from this installation; reinstall quantkit")
    return Path(list(spec.submodule_search_locations)[0])


def shipped_recipe_names() -> list[str]:
    return sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml"))


def _resolve_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    p = Path(name_or_path)
    candidates = []
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        candidates += [p] if p.is_absolute() else ([relative_to / p] if relative_to else []) + [p]
    candidates.append(shipped_recipes_dir() / f"{name_or_path}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise RecipeError(
        f"{name_or_path}: no such recipe file or shipped recipe; shipped recipes are: "
        f"{', '.join(shipped_recipe_names())}"
    )


MAX_RECIPE_BYTES = 1 << 20  # shipped recipes are about 2 KiB
_MERGED_SECTIONS = ("protect", "attention", "calibration", "thresholds", "export", "build")


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`extends` semantics: see README "Recipes". Sections merge key by key; rules append."""
    out = dict(parent)
    for key, value in child.items():
        if key == "rules":
            out["rules"] = list(value) if child.get("replace_rules") else list(parent.get("rules", [])) + list(value)
        elif key in _MERGED_SECTIONS and isinstance(value, dict) and isinstance(parent.get(key), dict):
            out[key] = {**parent[key], **value}
        elif key != "replace_rules":
            out[key] = value
    out.pop("replace_rules", None)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    from quantkit.errors import InputError
    from quantkit.textlimits import check_depth, read_text_limited

    try:
        text = read_text_limited(path, "recipe", max_bytes=MAX_RECIPE_BYTES)
    except InputError as e:
        raise RecipeError(str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{where}: malformed YAML: {shorten(problem)}") from None
    except RecursionError:
        raise RecipeError(f"{path}: the recipe is nested too deeply to read") from None
    try:
        check_depth(data, path, "recipe")
    except InputError as e:
        raise RecipeError(str(e)) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with at least `name:` and `rules:`")
    return data


def _check_own_rules(path: Path, data: dict[str, Any]) -> None:
    """Validate a file's own rules before merging, so errors carry that file's rule indices."""
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise RecipeError(f"{path}: rules: must be a list of rules, got {type(rules).__name__}")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise RecipeError(f"{path}: rules[{i}]: a rule is a mapping with match/types/precision, got {shorten(rule)}")
        try:
            Rule.model_validate(rule)
        except ValidationError as e:
            # A rule-level check (no field of its own) reads "rules[i].<its message>".
            msg = _format_validation_error(path, e).replace(f"{path}: (top level): ", f"{path}: ")
            raise RecipeError(msg.replace(f"{path}: ", f"{path}: rules[{i}].")) from None


def _load_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise RecipeError(f"{path}: extends cycle: {cycle}")
    data = _read_yaml(path)
    _check_own_rules(path, data)
    parent_name = data.get("extends")
    if parent_name is None:
        return data
    if not isinstance(parent_name, str):
        raise RecipeError(f"{path}: extends: must be a recipe name or path, got {shorten(parent_name)}")
    try:
        parent_path = _resolve_path(parent_name, relative_to=path.parent)
    except RecipeError:
        raise RecipeError(
            f"{path}: extends: {shorten(parent_name)} is neither a file next to it nor a shipped recipe "
            f"({', '.join(shipped_recipe_names())})"
        ) from None
    parent = _load_raw(parent_path, (*chain, path))
    recipe_from_dict({"name": parent_path.stem, **parent, "extends": None}, source=str(parent_path))
    return _merge(parent, data)


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README 'Recipe reference')"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{shorten(e.get('input'))}: {msg}"
        lines.append(f"{path}: {loc or '(top level)'}: {msg[:300]}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    try:
        return Recipe.model_validate({**data, "source": source})
    except ValidationError as e:
        raise RecipeError(_format_validation_error(Path(source), e)) from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load a shipped recipe by name (`balanced`) or a YAML file, resolving `extends`."""
    path = _resolve_path(str(name_or_path))
    data = _load_raw(path, ())
    if "name" not in data:
        data["name"] = path.stem
    return recipe_from_dict(data, source=str(path))
