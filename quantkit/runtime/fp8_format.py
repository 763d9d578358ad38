"""FP8 E4M3 as ModelOpt's fake quant computes it, and what a ModelOpt quantizer says about it: shared by
the FP8 runtime's linears (torch_fp8), its attention (fp8_attention) and its gated MLPs."""

from __future__ import annotations

from typing import Any

import torch

from quantkit.compat.modelopt import uses_constant_amax

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; ModelOpt's maxbound for num_bits (4, 3)
_AMAX_EPS = 1.0 / (1 << 24)  # ModelOpt treats amax below this as 0 and uses scale 1 (tensor_quant._fp8_eager)


def quantize_e4m3(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x * (448 / amax) saturated to ±448, then cast: the same arithmetic as ModelOpt's FP8 fake quant.

    The clamp comes first because a cast of a value beyond ±448 to float8_e4m3fn is not saturating
    on every backend (NaN on CUDA); NaN inputs stay NaN."""
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def safe_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.detach().float().reshape(())
    return torch.where(amax <= _AMAX_EPS, torch.ones_like(amax), amax)


def fp8_per_tensor_reason(q: Any, role: str) -> str | None:
    """Why this TensorQuantizer is not a static per-tensor E4M3 quantizer (None when it is)."""
    if q is None:
        return f"no {role} quantizer"
    if not getattr(q, "is_enabled", False):
        return f"{role} quantizer disabled"
    if getattr(q, "num_bits", None) != (4, 3):
        return f"{role} quantizer is num_bits {getattr(q, 'num_bits', None)}, not FP8 E4M3 (4, 3)"
    if getattr(q, "block_sizes", None):
        return f"{role} quantizer is block-quantized"
    if getattr(q, "pre_quant_scale", None) is not None:
        return f"{role} quantizer has a pre_quant_scale (SmoothQuant/AWQ)"
    if getattr(q, "bias", None) is not None:
        return f"{role} quantizer is affine (has a bias)"
    if getattr(q, "rotate_is_enabled", False):
        return f"{role} quantizer rotates its input"
    if uses_constant_amax(q):
        return None
    amax = getattr(q, "amax", None)
    if amax is None:
        return f"{role} quantizer has no calibrated amax"
    if amax.numel() != 1:
        return f"{role} quantizer is per-channel ({amax.numel()} scales); the FP8 GEMM here is per-tensor"
    if not torch.isfinite(amax).all():
        return f"{role} quantizer amax is not finite"
    return None


def quantizer_amax(q: Any) -> torch.Tensor:
    if uses_constant_amax(q):
        return torch.tensor(FP8_MAX)
    return q.amax
