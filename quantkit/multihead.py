"""torch.nn.MultiheadAttention as an attention quantkit can plan, quantize and export.

`expose_projections(model)` swaps each MultiheadAttention instance's class (its name, type checks and
arguments stay) and moves the packed `in_proj_weight` (or `q/k/v_proj_weight`) into `q_proj`,
`k_proj`, `v_proj` Linear children beside `out_proj`: recipes, roles and ModelOpt then see four
linears as in any HF attention, and every projection is *called*, so per-layer dtypes cast at its
boundaries. Its forward computes Q·Kᵀ, softmax and P·V through quantkit.attention_math (bmm quantizers,
FP32 softmax). With `in_proj_bias` gone, nn.TransformerEncoder(Layer) never takes its fused kernel,
which reads the raw weights past every quantizer and has no ONNX export.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit import attention_math
from quantkit.attention_math import ROUTED_FLAG

ROUTED_KIND = "mha"  # attention_math.ROUTED_FLAG value of the swapped class
PROJECTIONS = ("q_proj", "k_proj", "v_proj")

_CLASSES: dict[type, type] = {}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # Built on the meta device, then given the existing tensors: no random init, no RNG consumed.
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return lin


def _to_batch_first(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """torch's MHA masks (bool: True = may NOT attend; float: added) as a float mask to add."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _forward(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
             attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
             is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention.forward (same arguments and results), with the projections called as
    modules and the attention through quantkit.attention_math. `is_causal` is a hint in torch: the mask says it."""
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal needs attn_mask (as in torch)")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    else:
        query, key, value = (_to_batch_first(t, self.batch_first) for t in (query, key, value))
    n, length, embed = query.shape
    heads, head_dim = self.num_heads, self.head_dim
    q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
    if self.bias_k is not None:
        k = torch.cat([k, self.bias_k.to(k.dtype).expand(n, 1, embed)], dim=1)
        v = torch.cat([v, self.bias_v.to(v.dtype).expand(n, 1, embed)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.view(n, length, heads, head_dim).transpose(1, 2)
    k = k.view(n, k.shape[1], heads, head_dim).transpose(1, 2)
    v = v.view(n, v.shape[1], heads, head_dim).transpose(1, 2)
    if self.add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(n, heads, 1, head_dim)], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    source = k.shape[2]
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:  # (N * heads, L, S)
        mask = mask.view(n, heads, length, source)
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    dropout = self.dropout if self.training else 0.0
    if need_weights:
        out, probs = attention_math.explicit_attention(self, q, k, v, mask, dropout_p=dropout,
                                                       scale=1.0 / math.sqrt(head_dim))
    else:
        out = attention_math.explicit_sdpa(self, q, k, v, attn_mask=mask, dropout_p=dropout)
        probs = None
    out = self.out_proj(out.transpose(1, 2).reshape(n, length, embed))
    if probs is not None and average_attn_weights:
        probs = probs.mean(dim=1)
    if not batched:
        return out.squeeze(0), None if probs is None else probs.squeeze(0)
    return _to_batch_first(out, self.batch_first), probs


def _exposed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": _forward, ROUTED_FLAG: ROUTED_KIND, "_quantkit_original": cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


def is_exposed(module: nn.Module) -> bool:
    return getattr(type(module), ROUTED_FLAG, None) == ROUTED_KIND


def expose(module: nn.MultiheadAttention) -> bool:
    """Split one MultiheadAttention's packed projection into q/k/v Linear children (idempotent)."""
    if is_exposed(module):
        return False
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3, dim=0)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases: Any = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
    for name, w, b in zip(PROJECTIONS, weights, biases):
        module.add_module(name, _linear(w, b))
    for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        if name in module._parameters:
            module.register_parameter(name, None)
    # Read by torch's fast-path checks: with no in_proj_bias an encoder layer takes the slow path, which
    # calls self_attn(...) (this forward) instead of torch._transformer_encoder_layer_fwd.
    module._qkv_same_embed_dim = False
    module.__class__ = _exposed_class(type(module))
    return True


def expose_projections(model: nn.Module) -> list[str]:
    """Expose every nn.MultiheadAttention in `model` (see the module docstring); their names."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and expose(module):
            done.append(name)
    return done
