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


def quantizer_cfg(precision: Precision, role: str) -> dict[str, Any]:
    """ModelOpt quantizer attributes for a format; role is 'weight' or 'activation'."""
    fmt: Format = FORMATS[precision]
    if not fmt.quantized:
        raise ValueError(f"{precision} has no quantizer")
    cfg: dict[str, Any] = {"num_bits": fmt.num_bits}
    if fmt.block_size:
        cfg["block_sizes"] = {-1: fmt.block_size, "type": "dynamic", "scale_bits": fmt.scale_bits}
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
            entries.append({"quantizer_name": f"{base}.weight_quantizer", "cfg": quantizer_cfg(row.weights, "weight")})
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
