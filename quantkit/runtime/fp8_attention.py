"""FP8 attention in the FP8 runtime: where the recipe quantized an attention's Q, K, V and P to FP8 (static
per-tensor scales), its two matmuls run on the FP8 tensor cores in one flash-attention kernel
(quantkit.runtime.fp8_kernels) instead of ModelOpt's fake quant around explicit matmuls.

`enable_fp8_attention(model)` gives each such attention module a kernel call (the instance attribute
quantkit.attention_math.ATTENTION_KERNEL), which quantkit's transformers attention path tries first;
the kernel call answers None, and the fake-quant path runs as before, wherever it does not apply: no
CUDA or no Triton, a mask other than plain causal (padding, sliding windows), dropout, logit
soft-capping, a head dim other than 32/64/128/256, or grouped heads that do not divide. Numerics:
Q, K and V are quantized as ModelOpt's quantizers do (their calibrated amax, saturated); P is quantized
unnormalized (see fp8_kernels), so the result is FP8 attention as deployment kernels compute it, close
to but not bit-equal with the fake-quant model's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.attention_math import ATTENTION_KERNEL, ROLES, bmm_quantizers
from quantkit.runtime.fp8_format import FP8_MAX, fp8_per_tensor_reason, quantize_e4m3, quantizer_amax, safe_amax

_HEAD_DIMS = (32, 64, 128, 256)  # FP8 tensor-core matmuls take K in multiples of 32


def fp8_attention_reason(module: nn.Module) -> str | None:
    """Why `module`'s attention cannot run as FP8 attention (None when it can)."""
    quantizers = bmm_quantizers(module)
    if not quantizers:
        return "no attention quantizers"
    for role in ROLES:
        reason = fp8_per_tensor_reason(quantizers.get(role), f"{role}_bmm")
        if reason:
            return reason
    return None


def _scale(quantizer: Any) -> torch.Tensor:
    return (safe_amax(quantizer_amax(quantizer)) / FP8_MAX).detach().clone()


class FP8AttentionCall:
    """The kernel call set on one attention module: (query, key, value, mask, kwargs) -> output or None."""

    def __init__(self, module: nn.Module):
        quantizers = bmm_quantizers(module)
        # the calibrated scales, read once: a call touches no ModelOpt object (nor does a compiled graph)
        self.scales = {role: _scale(quantizers[role]) for role in ("q", "k", "v")}
        # eager calls the kernel took (the rest fell back to fake quant); compiled calls are not counted:
        # dynamo guards on a Python int it reads, so counting there would recompile every call
        self.calls = 0

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, is_causal: bool, kwargs: dict[str, Any]) -> torch.Tensor | None:
        from quantkit.runtime import fp8_kernels

        if not (fp8_kernels.AVAILABLE and query.is_cuda) or attention_mask is not None or module.training:
            return None
        if kwargs.get("dropout") or kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
            return None
        batch, heads, q_len, head_dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        if (head_dim not in _HEAD_DIMS or heads % kv_heads or (is_causal and q_len != kv_len)
                or query.dtype not in (torch.bfloat16, torch.float16)):
            return None
        scales = {role: t.to(query.device) for role, t in self.scales.items()}
        q8 = quantize_e4m3(query, 1.0 / scales["q"]).contiguous()
        k8 = quantize_e4m3(key, 1.0 / scales["k"]).contiguous()
        # V with its length dimension contiguous: the layout the FP8 P·V matmul reads fastest
        v8 = quantize_e4m3(value.transpose(-1, -2), 1.0 / scales["v"]).contiguous().transpose(-1, -2)
        scaling = kwargs.get("scaling")
        sm_scale = float(head_dim ** -0.5 if scaling is None else scaling)
        if not torch.compiler.is_compiling():
            self.calls += 1
        return torch.ops.quantkit.fp8_attention(q8, k8, v8, scales["q"], scales["k"], scales["v"], bool(is_causal),
                                                sm_scale, query.dtype)


def enable_fp8_attention(model: nn.Module) -> list[str]:
    """Give every attention module whose Q, K, V and P quantizers are static per-tensor FP8 its kernel
    call; returns their names. The fake-quant path stays for any call the kernel does not take."""
    names = []
    for name, module in model.named_modules():
        if bmm_quantizers(module) and fp8_attention_reason(module) is None:
            setattr(module, ATTENTION_KERNEL, FP8AttentionCall(module))
            names.append(name)
    return names
