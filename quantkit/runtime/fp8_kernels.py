"""Triton kernels of the FP8 runtime, registered as torch custom ops so that torch.compile keeps them.

`torch.ops.quantkit.gated_act_quant(gate, up, inv_scale, act)`: act(gate) · up quantized to
float8_e4m3fn in one pass: the input of a gated MLP's FP8 down projection (SwiGLU: act "silu";
GeGLU: "gelu_tanh" as Gemma's, or "gelu"). Inductor fuses the same ops into one kernel too, but its
flat-indexed kernel ran at 3.5 TB/s on an H200 against 4.1 for this row-tiled one
(`scripts/bench_fp8_kernels.py`), and it keeps act(gate) and the product in FP32 where the eager
module rounds each to the model's dtype; this kernel rounds as the eager module does, so its FP8
bytes are the eager FP8 model's (tests/gpu/test_torch_fp8.py).

The kernels need Triton (it ships with CUDA builds of torch); without it this module defines nothing
and says so in AVAILABLE, and quantkit.runtime.gated_mlp runs the same arithmetic in torch instead.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch come without Triton
    triton = None

AVAILABLE = triton is not None

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the kernel's ACT: an index into this
_BLOCK = 2048  # columns per program: one row-tile of 2 KiB of FP8 out (best of 512..4096 on the H200)


if AVAILABLE:
    @triton.jit
    def _gated_act_quant_kernel(gate_ptr, up_ptr, out_ptr, inv_scale_ptr, n_cols, stride_gate, stride_up,
                                ACT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        g = tl.load(gate_ptr + row * stride_gate + cols, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + cols, mask=keep, other=0.0).to(tl.float32)
        if ACT == 1:
            a = 0.5 * g * (1.0 + libdevice.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        elif ACT == 2:
            a = 0.5 * g * (1.0 + libdevice.erf(g * 0.7071067811865476))
        else:
            a = g / (1.0 + tl.exp(-g))
        # the eager module's roundings: act(gate), then the product, each rounded to the model's dtype
        dtype = gate_ptr.dtype.element_ty
        a = a.to(dtype).to(tl.float32)
        h = (a * u).to(dtype).to(tl.float32)
        inv_scale = tl.load(inv_scale_ptr)
        # saturate (a cast beyond ±448 gives NaN); NaN stays NaN, as in quantize_e4m3
        y = tl.clamp(h * inv_scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + row * n_cols + cols, y.to(tl.float8e4nv), mask=keep)

    @torch.library.triton_op("quantkit::gated_act_quant", mutates_args=())
    def gated_act_quant(gate: torch.Tensor, up: torch.Tensor, inv_scale: torch.Tensor, act: str) -> torch.Tensor:
        """float8_e4m3fn(clamp(act(gate) · up · inv_scale, ±448)) of 2-D `gate` and `up` (one shape, last
        dimension contiguous: the two halves of a fused gate/up GEMM's output qualify as they are)."""
        gate = gate if gate.stride(-1) == 1 else gate.contiguous()
        up = up if up.stride(-1) == 1 else up.contiguous()
        rows, cols = gate.shape
        out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=gate.device)
        if out.numel() == 0:
            return out
        grid = (rows, triton.cdiv(cols, _BLOCK))
        torch.library.wrap_triton(_gated_act_quant_kernel)[grid](
            gate, up, out, inv_scale, cols, gate.stride(0), up.stride(0), ACT=ACTIVATIONS.index(act),
            BLOCK=_BLOCK, num_warps=4)
        return out
