"""TorchScript-exporter symbolics that torch gets wrong for FP16/BF16 models, fixed for the export.

torch's own `scaled_dot_product_attention` symbolic (opset 14) builds its mask constants in FP32
and its explicit `scale` as a double, so an FP16 model exports with the whole attention (and
everything after it) silently promoted to FP32, and a BF16 model does not export at all
("ScalarType ComplexDouble is an unexpected tensor scalar type", torch 2.13). `patched_symbolics()`
registers a replacement for the duration of one export.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

_SDPA = "aten::scaled_dot_product_attention"
_OPSET = 14
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _helpers():
    from quantkit.compat.torch_onnx import symbolic_helpers

    return symbolic_helpers()


def _sdpa(g, *args):
    sym = _helpers()
    # The same argument parsing as torch's own symbolic: flags arrive as constant graph values.
    return sym.parse_args("v", "v", "v", "v", "f", "b", "v", "b")(_sdpa_impl)(g, *args)


def _sdpa_impl(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Q·Kᵀ·scale (+mask) -> softmax -> ·V, every constant in the query's dtype.

    For FP16/BF16 queries the mask add and the softmax run in FP32 (Cast in, Cast out), which is
    what PyTorch's fused CPU and CUDA kernels do internally; the exported graph then computes what
    the PyTorch model computed instead of an FP16 softmax that PyTorch never ran.
    """
    sym = _helpers()
    if enable_gqa:
        raise RuntimeError("scaled_dot_product_attention(enable_gqa=True) has no ONNX export here; "
                           "repeat the key/value heads before calling it")
    qtype = sym.JitScalarType.from_value(query)
    tdtype = qtype.dtype()
    onnx_type = qtype.onnx_type()
    low_precision = tdtype in (torch.float16, torch.bfloat16)

    scale_value = None if sym.is_none(scale) else sym.maybe_get_const(scale, "f")
    if scale_value is None or not isinstance(scale_value, float):
        if sym.is_none(scale):
            shape = g.op("Shape", query)
            last = g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([-1])),
                        g.op("Constant", value_t=torch.tensor([2**62])))
            size = g.op("Cast", last, to_i=_FLOAT)
            scale_t = g.op("Div", g.op("Constant", value_t=torch.tensor([1.0])), g.op("Sqrt", size))
        else:
            scale_t = g.op("Cast", scale, to_i=_FLOAT)
        sqrt_scale = g.op("Cast", g.op("Sqrt", scale_t), to_i=onnx_type)
    else:
        sqrt_scale = g.op("Constant", value_t=torch.tensor(math.sqrt(scale_value), dtype=tdtype))

    rank = sym.tensor_rank(key)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    key_t = g.op("Transpose", key, perm_i=perm)
    scores = g.op("MatMul", g.op("Mul", query, sqrt_scale), g.op("Mul", key_t, sqrt_scale))
    if low_precision:
        scores = g.op("Cast", scores, to_i=_FLOAT)
    if is_causal:
        attn_mask = sym.causal_attention_mask(g, query, key)  # FP32 additive mask
    guard_nan = False
    if not sym.is_none(attn_mask):
        mtype = sym.JitScalarType.from_value(attn_mask)
        if mtype == sym.JitScalarType.BOOL:
            zero = g.op("Constant", value_t=torch.tensor([0.0]))
            neg_inf = g.op("Constant", value_t=torch.tensor([-math.inf]))
            attn_mask = g.op("Where", attn_mask, zero, neg_inf)
            guard_nan = True
        elif mtype.dtype() != torch.float32:
            attn_mask = g.op("Cast", attn_mask, to_i=_FLOAT)
        if not low_precision:
            attn_mask = g.op("Cast", attn_mask, to_i=onnx_type) if tdtype != torch.float32 else attn_mask
        scores = g.op("Add", scores, attn_mask)
    probs = g.op("Softmax", scores, axis_i=-1)
    if guard_nan:
        # A fully masked row is 0/0 in ONNX's Softmax; PyTorch's kernels return zeros there.
        zero = g.op("Constant", value_t=torch.tensor([0.0]))
        probs = g.op("Where", g.op("IsNaN", probs), zero, probs)
    if low_precision:
        probs = g.op("Cast", probs, to_i=onnx_type)
    return g.op("MatMul", probs, value)


@contextlib.contextmanager
def patched_symbolics() -> Iterator[None]:
    """Use quantkit's attention symbolic for one export; torch's own is restored afterwards."""
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    register_custom_op_symbolic(_SDPA, _sdpa, _OPSET)
    try:
        yield
    finally:
        unregister_custom_op_symbolic(_SDPA, _OPSET)
