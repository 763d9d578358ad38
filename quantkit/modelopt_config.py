"""Plan -> ModelOpt `mtq.quantize` config. The only module that speaks ModelOpt's config dialect.

ModelOpt 0.47 takes `{"quant_cfg": [entries...], "algorithm": ...}` where each entry is
`{"quantizer_name": glob, "cfg": {...}}` or `{"quantizer_name": glob, "enable": False}` and the
last matching entry wins. We start from deny-all and add one entry per quantizer of the plan, by
exact (glob-escaped) name, so no pattern can reach a layer the plan did not choose. A fresh config
is built on every call (ModelOpt's presets are shared mutable dicts).
"""

from __future__ import annotations

import re
from typing import Any

from quantkit.plan import Plan, calibration_algorithm
from quantkit.recipe import FORMATS, Format, Precision


def _escape(name: str) -> str:
    # fnmatch treats [ ] ? * specially; module names rarely contain them, but exact is exact.
    return re.sub(r"([\[\]?*])", r"[\1]", name)


# A rule's NVFP4 weight algorithm (recipe.WEIGHT_ALGORITHMS) as ModelOpt 0.47 runs it: whether the
# weight quantizer must be static (per-block amax stored, which the scale searches and GPTQ need),
# extra block_sizes keys, and the calibration algorithm config. The values are those of ModelOpt's
# presets NVFP4_FOUR_OVER_SIX_CFG, NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG,
# NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG, NVFP4_AWQ_LITE/CLIP/FULL_CFG and GPTQCalibConfig's defaults.
WEIGHT_ALGORITHM_CFG: dict[str, tuple[bool, dict[str, Any], dict[str, Any]]] = {
    "four_over_six": (True, {"four_over_six": True},
                      {"method": "mse", "fp8_scale_sweep": False, "start_multiplier": 1.0, "stop_multiplier": 1.5,
                       "step_size": 0.5}),
    "mse_fp8_sweep": (True, {}, {"method": "mse", "fp8_scale_sweep": True}),
    "local_hessian": (True, {}, {"method": "local_hessian", "fp8_scale_sweep": True}),
    "awq_lite": (False, {}, {"method": "awq_lite"}),
    "awq_clip": (False, {}, {"method": "awq_clip"}),
    "awq_full": (False, {}, {"method": "awq_full", "alpha_step": 0.1}),
    "gptq": (True, {}, {"method": "gptq"}),
}


def quantizer_cfg(precision: Precision, role: str, algorithm: str | None = None) -> dict[str, Any]:
    """ModelOpt quantizer attributes for a format; role is 'weight' or 'activation'.

    `algorithm` (a weight's NVFP4 algorithm) makes the block scales static where it needs them.
    """
    fmt: Format = FORMATS[precision]
    if not fmt.quantized:
        raise ValueError(f"{precision} has no quantizer")
    cfg: dict[str, Any] = {"num_bits": fmt.num_bits}
    if fmt.block_size:
        cfg["block_sizes"] = {-1: fmt.block_size, "type": "dynamic", "scale_bits": fmt.scale_bits}
        if algorithm and role == "weight":
            static, extra, _ = WEIGHT_ALGORITHM_CFG[algorithm]
            cfg["block_sizes"].update({"type": "static" if static else "dynamic", **extra})
    else:
        cfg["axis"] = fmt.weight_axis if role == "weight" else None
    return cfg


# Per-rule calibrators that ModelOpt implements with its histogram calibrator; the amax is then
# computed with that method after the statistics pass (see ptq.finish_histogram_calibration).
HISTOGRAM_METHODS = {"percentile", "entropy", "mse"}


def _activation_cfg(precision: Precision, calibrator: str | None) -> dict[str, Any]:
    cfg = quantizer_cfg(precision, "activation")
    if calibrator in HISTOGRAM_METHODS and not FORMATS[precision].block_size:
        cfg["calibrator"] = "histogram"
    return cfg


def algorithm_cfg(plan: Plan) -> Any:
    algo = calibration_algorithm(plan)
    if algo == "smoothquant":
        return {"method": "smoothquant", "alpha": plan.recipe.calibration.smoothquant_alpha}
    if algo == "awq":
        return {"method": "awq_lite"}
    return {"method": algo}


def build_quant_config(plan: Plan) -> dict[str, Any]:
    """The `mtq.quantize` config for a plan (attention quantizers included if plan.attention has them)."""
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for row in plan.quantized_layers():
        base = _escape(row.name)
        if row.weights is not None:
            entries.append({"quantizer_name": f"{base}.weight_quantizer",
                            "cfg": quantizer_cfg(row.weights, "weight", row.algorithm)})
        if row.activations is not None:
            entries.append({"quantizer_name": f"{base}.input_quantizer",
                            "cfg": _activation_cfg(row.activations, row.calibrator)})
    attn_precision = plan.recipe.attention.precision
    if attn_precision != Precision.SKIP:
        for conv in plan.attention:
            if not conv.get("converted"):
                continue
            for qname in conv.get("quantizers", {}).values():
                entries.append({"quantizer_name": _escape(qname), "cfg": quantizer_cfg(attn_precision, "activation")})
    return {"quant_cfg": entries, "algorithm": algorithm_cfg(plan)}


def histogram_calibrated_quantizers(plan: Plan) -> dict[str, str]:
    """input-quantizer name -> histogram method, for rules that asked for percentile/entropy/mse."""
    return {f"{row.name}.input_quantizer": row.calibrator for row in plan.quantized_layers()
            if row.activations is not None and row.calibrator in HISTOGRAM_METHODS
            and not FORMATS[row.activations].block_size}


def weight_algorithm_passes(plan: Plan) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(algorithm, ModelOpt algorithm config, layer names) per rule algorithm in the plan, in plan order.

    ModelOpt runs one calibration algorithm per call over every enabled quantizer, so each of these
    runs as its own `mtq.calibrate` pass with only its layers' quantizers enabled (ptq does that).
    """
    groups: dict[str, list[str]] = {}
    for row in plan.quantized_layers():
        if row.algorithm:
            groups.setdefault(row.algorithm, []).append(row.name)
    return [(name, dict(WEIGHT_ALGORITHM_CFG[name][2]), layers) for name, layers in groups.items()]
