"""The arithmetic of one quantized attention call: Q·Kᵀ and P·V through the module's bmm quantizers
(q/k/v/p, ModelOpt's names), the softmax in FP32 when the module is protected.

Both quantkit.attention (routing whole attention modules here) and quantkit.multihead (the forward of
an exposed nn.MultiheadAttention) call it; it imports nothing of quantkit. The torch functions it
uses are the originals, taken at import, before any routing patches them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ROLES = ("q", "k", "v", "p")
SOFTMAX_FLAG = "_quantkit_softmax_fp32"  # instance attribute: compute this attention's softmax in FP32
ROUTED_FLAG = "_quantkit_routed"  # class attribute of the classes quantkit swaps in: "sdpa" | "eager" | "mha"
# instance attribute a runtime may set: (module, q, k, v, mask, is_causal, kwargs) -> output or None (not taken)
ATTENTION_KERNEL = "_quantkit_attention_kernel"

# The originals, taken before anything patches them.
torch_matmul = torch.matmul
torch_bmm = torch.bmm
tensor_matmul = torch.Tensor.__matmul__
torch_softmax = torch.softmax
torch_sdpa = F.scaled_dot_product_attention


def fp32_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(x) computed as Cast(FLOAT) -> Softmax -> Cast(back): an explicit `.float()`, because
    `softmax(x, dtype=torch.float32)` exports as a half-precision Softmax followed by a Cast."""
    if dim is None:  # torch's legacy implicit dim
        dim = 0 if input.dim() in (0, 1, 3) else 1
    out_dtype = dtype if dtype is not None else input.dtype
    return torch_softmax(input.float(), dim).to(out_dtype)


def tensor_fp32_softmax(self: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return fp32_softmax(self, dim, dtype=dtype)


def bmm_quantizers(module: nn.Module) -> dict[str, Any]:
    return {r: q for r in ROLES if (q := getattr(module, f"{r}_bmm_quantizer", None)) is not None}


def any_active(quantizers: dict[str, Any]) -> bool:
    return any(getattr(q, "is_enabled", True) for q in quantizers.values())


class MatmulRouter:
    """Puts the quantizers on the two matmuls of one attention call: Q·Kᵀ first, then P·V."""

    def __init__(self, module: nn.Module, quantizers: dict[str, Any]):
        self.where = type(module).__name__
        self.q = quantizers
        self.calls = 0

    def _quant(self, role: str, x: torch.Tensor) -> torch.Tensor:
        q = self.q.get(role)
        return x if q is None else q(x)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, op: Callable = torch_matmul) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            a = self._quant("q", a)
            k = self.q.get("k")
            if k is not None and getattr(k, "is_enabled", True):
                # Quantize K in its own (…, seq, head_dim) layout, as ModelOpt does, so axis settings mean the same.
                b = k(b.transpose(-1, -2)).transpose(-1, -2)
        elif self.calls == 2:
            a = self._quant("p", a)
            b = self._quant("v", b)
        else:
            raise RuntimeError(f"quantkit attention: {self.where} ran more than two matmuls inside one attention "
                               "call; its quantizers would land on the wrong tensors")
        return op(a, b)

    def check(self) -> None:
        if self.calls != 2:
            raise RuntimeError(f"quantkit attention: {self.where} ran {self.calls} matmul(s) inside one attention "
                               "call, expected 2 (Q·Kᵀ and P·V); its quantizers did not see Q, K, V, P")


def needs_explicit(module: nn.Module, *tensors: torch.Tensor) -> bool:
    """Explicit (quantkit) arithmetic is needed when quantizers are on, or to upcast a half-precision softmax.

    Otherwise the original kernel runs, so FP32 outputs stay bit-identical to the unprotected model."""
    if any_active(bmm_quantizers(module)):
        return True
    return bool(getattr(module, SOFTMAX_FLAG, False)) and any(
        t is not None and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def explicit_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention with the matmuls written out, quantized, and the softmax in FP32."""
    if not needs_explicit(module, query):
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                     scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    return explicit_attention(module, query, key, value, attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale)[0]


def explicit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, *, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(Q·Kᵀ·scale + mask)·V, the probabilities), written out: `module`'s bmm quantizers on the
    matmuls, the softmax in FP32 when the module is protected. Masks as in SDPA (bool: True attends)."""
    router = MatmulRouter(module, bmm_quantizers(module))
    L, S = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = router(query, key.transpose(-2, -1)) * scale
    if getattr(module, SOFTMAX_FLAG, False):
        scores = scores.float()
    # A finite "minus infinity": a fully masked row gives a uniform row instead of NaN.
    neg = torch.finfo(scores.dtype).min
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, neg)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, neg)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    probs = torch_softmax(scores, -1).to(value.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = router(probs, value)
    router.check()
    return out, probs
