"""Triton kernels of the FP8 runtime, registered as torch custom ops so that torch.compile keeps them.

`torch.ops.quantkit.fp8_attention(q8, k8, v8, q_scale, k_scale, v_scale, causal, sm_scale)`: flash
attention whose two matmuls run on the FP8 tensor cores (Q, K, V already quantized with their static
scales; FP32 softmax statistics; P quantized to FP8 before P·V). P is quantized *unnormalized*: each
row's running maximum maps to 1, so its range is exactly [0, 1] and its scale is fixed at 1/448 (the
calibrated amax of the normalized P is not needed), and the division by the row sum comes after, in
FP32, as fused FP8 attention kernels do.

`torch.ops.quantkit.gated_act_quant(gate, up, inv_scale, act)`: act(gate) · up quantized to
float8_e4m3fn in one pass: the input of a gated MLP's FP8 down projection (SwiGLU: act "silu";
GeGLU: "gelu_tanh" as Gemma's, or "gelu"). Inductor fuses the same ops into one kernel too, but its
flat-indexed kernel ran at 3.5 TB/s on an H200 against 4.1 for this row-tiled one
(`scripts/bench_fp8_kernels.py`), and it keeps act(gate) and the product in FP32 where the eager
module rounds each to the model's dtype; this kernel rounds as the eager module does, so its FP8
bytes are the eager FP8 model's (tests/gpu/test_torch_fp8.py).

`torch.ops.quantkit.gated_gemm_quant(x8, weight, x_scale, w_scale, bias, inv_scale, act, out_dtype, half)`:
the gate/up GEMM with that arithmetic in its epilogue, so the BF16 gate/up output never reaches memory:
a persistent Triton GEMM fed by TMA (Hopper's bulk tensor copies), whose weight rows come interleaved
in blocks of `half` (gate rows, then the up rows of the same FFN columns: quantkit.runtime.gated_mlp's
`interleave_gate_up`), so each (BLOCK_M, 2·half) tile holds a gate and its up and stores (BLOCK_M,
half) FP8. Its epilogue rounds as FP8Linear's GEMM and the gated kernel do, so its bytes are theirs.
Tuned and tested on Hopper (SM 9.x) only; on an H200 it is level with cuBLAS + the gated kernel at 16
rows and faster from 64 to 16384 (BENCHMARKS.md); the runtime keeps the two kernels below 16 rows.

The kernels need Triton (it ships with CUDA builds of torch); without it this module defines nothing
and says so in AVAILABLE, and quantkit.runtime.gated_mlp runs the same arithmetic in torch instead.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch come without Triton
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors (Triton >= 3.4)
except ImportError:
    TensorDescriptor = None

AVAILABLE = triton is not None
GATED_GEMM_AVAILABLE = AVAILABLE and TensorDescriptor is not None

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the kernel's ACT: an index into this
_BLOCK = 2048  # columns per program: one row-tile of 2 KiB of FP8 out (best of 512..4096 on the H200)
# the attention kernel's tiles: the best of 16 configurations at head dim 256 on an H200
ATTENTION_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
# the gated GEMM's tiles (BLOCK_N = 2 · half): the best of 14 (and then of 8 around it) on an H200 at K 2048,
# FFN 16384, M 2048 and 16384; 3 stages of 128 x 128 + 256 x 128 FP8 operands and the FP8 out tile take
# 160 KiB of shared memory; bands of 16 row tiles: 2-4 % faster than 8 at 16384 rows, within the noise
# at 2048 (scripts/bench_fp8_kernels.py, BENCHMARKS.md)
GATED_GEMM_HALF = 128
GATED_GEMM_CONFIG = dict(BLOCK_M=128, BLOCK_K=128, GROUP_M=16, num_warps=8, num_stages=3)
_SM_COUNT: dict[int, int] = {}


if AVAILABLE:
    @triton.jit
    def gated_act(g, u, ACT: tl.constexpr, dtype: tl.constexpr):
        """act(g) · u of FP32 g and u, with the eager module's roundings: act(g), then the product, each
        rounded to the model's `dtype`. FP32 out."""
        if ACT == 1:
            a = 0.5 * g * (1.0 + libdevice.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        elif ACT == 2:
            a = 0.5 * g * (1.0 + libdevice.erf(g * 0.7071067811865476))
        else:
            a = g / (1.0 + tl.exp(-g))
        a = a.to(dtype).to(tl.float32)
        return (a * u).to(dtype).to(tl.float32)

    @triton.jit
    def _gated_act_quant_kernel(gate_ptr, up_ptr, out_ptr, inv_scale_ptr, n_cols, stride_gate, stride_up,
                                ACT: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n_cols
        if HALF > 0:  # gate and up interleaved in blocks of HALF columns (up_ptr: the first up block)
            src = (cols // HALF) * (2 * HALF) + cols % HALF
        else:
            src = cols
        g = tl.load(gate_ptr + row * stride_gate + src, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_up + src, mask=keep, other=0.0).to(tl.float32)
        h = gated_act(g, u, ACT, gate_ptr.dtype.element_ty)
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
            BLOCK=_BLOCK, HALF=0, num_warps=4)
        return out

    @torch.library.triton_op("quantkit::gated_act_quant_blocks", mutates_args=())
    def gated_act_quant_blocks(pair: torch.Tensor, inv_scale: torch.Tensor, act: str, half: int) -> torch.Tensor:
        """gated_act_quant of a gate/up GEMM output whose columns alternate in blocks of `half` (gate, up,
        gate, ...: what the interleaved weight of gated_gemm_quant gives through a plain GEMM): (M, F)."""
        pair = pair if pair.stride(-1) == 1 else pair.contiguous()
        rows, cols = pair.shape[0], pair.shape[1] // 2
        out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=pair.device)
        if out.numel() == 0:
            return out
        grid = (rows, triton.cdiv(cols, _BLOCK))
        torch.library.wrap_triton(_gated_act_quant_kernel)[grid](
            pair, pair[:, half:], out, inv_scale, cols, pair.stride(0), pair.stride(0), ACT=ACTIVATIONS.index(act),
            BLOCK=_BLOCK, HALF=half, num_warps=4)
        return out

    @triton.jit
    def _gated_gemm_quant_kernel(x_desc, w_desc, out_desc, x_scale_ptr, w_scale_ptr, bias_ptr, inv_scale_ptr,
                                 M, N, K, programs, ACT: tl.constexpr, W_SCALE_ROWS: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, OUT_FP16: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Persistent: each program walks tiles start, start + programs, ... in GROUP_M-row bands (the
        # band's weight columns stay in L2). N = 2F; columns [j·BLOCK_N, j·BLOCK_N + BLOCK_N/2) are gate
        # rows, the next BLOCK_N/2 the up rows of the same FFN columns.
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        band = GROUP_M * num_n
        x_scale = tl.load(x_scale_ptr)
        inv_scale = tl.load(inv_scale_ptr)
        dtype = tl.float16 if OUT_FP16 else tl.bfloat16
        for tile in tl.range(start, num_m * num_n, programs, flatten=True):
            first_m = (tile // band) * GROUP_M
            rows_here = tl.minimum(num_m - first_m, GROUP_M)
            off_m = (first_m + (tile % band) % rows_here) * BLOCK_M
            off_n = ((tile % band) // rows_here) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in tl.range(k_tiles):  # TMA zero-fills rows and K past the tensor's end
                acc = tl.dot(x_desc.load([off_m, k * BLOCK_K]), w_desc.load([off_n, k * BLOCK_K]).T, acc)
            # FP8Linear's GEMM: both scales, the bias, one rounding to the model's dtype; then gated_act
            cols = off_n + tl.arange(0, BLOCK_N)
            if W_SCALE_ROWS:
                y = acc * x_scale * tl.load(w_scale_ptr + cols)[None, :]
            else:
                y = acc * x_scale * tl.load(w_scale_ptr)
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
            y = y.to(dtype).to(tl.float32)
            g, u = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            h = gated_act(g, u, ACT, dtype)
            q = tl.clamp(h * inv_scale, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
            out_desc.store([off_m, off_n // 2], q.to(tl.float8e4nv))

    def _sm_count(device: torch.device) -> int:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _SM_COUNT[index]

    def launch_gated_gemm_quant(x8, weight, x_scale, w_scale, bias, inv_scale, act, out_dtype, half, config=None):
        """The gated GEMM on (M, K) float8 x8 and the interleaved (2F, K) float8 weight: (M, F) float8.
        `config` overrides GATED_GEMM_CONFIG (benchmarks)."""
        c = dict(GATED_GEMM_CONFIG if config is None else config)
        rows, k = x8.shape
        n = weight.shape[0]
        out = torch.empty((rows, n // 2), dtype=torch.float8_e4m3fn, device=x8.device)
        if out.numel() == 0:
            return out
        block_m, block_k = c.pop("BLOCK_M"), c.pop("BLOCK_K")
        x_desc = TensorDescriptor.from_tensor(x8, [block_m, block_k])
        w_desc = TensorDescriptor.from_tensor(weight, [2 * half, block_k])
        out_desc = TensorDescriptor.from_tensor(out, [block_m, half])
        tiles = triton.cdiv(rows, block_m) * (n // (2 * half))
        programs = min(_sm_count(x8.device), tiles) if x8.is_cuda else tiles  # (CPU: Triton's interpreter)
        _gated_gemm_quant_kernel[(programs,)](
            x_desc, w_desc, out_desc, x_scale, w_scale, w_scale if bias is None else bias, inv_scale,
            rows, n, k, programs, ACT=ACTIVATIONS.index(act), W_SCALE_ROWS=w_scale.numel() > 1,
            HAS_BIAS=bias is not None, OUT_FP16=out_dtype == torch.float16, BLOCK_M=block_m, BLOCK_N=2 * half,
            BLOCK_K=block_k, **c)
        return out

    # An opaque op (not a triton_op): the TMA descriptors are built on the host at each call, which
    # Inductor does not trace; the fake below gives compiled graphs the output's shape.
    @torch.library.custom_op("quantkit::gated_gemm_quant", mutates_args=())
    def gated_gemm_quant(x8: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor], inv_scale: torch.Tensor, act: str, out_dtype: torch.dtype,
                         half: int) -> torch.Tensor:
        """float8_e4m3fn(clamp(act(gate) · up · inv_scale, ±448)) where [gate | up] = x8 · weightᵀ ·
        x_scale · w_scale + bias rounded to out_dtype, weight's rows interleaved in blocks of `half`
        (interleave_gate_up). x8 (M, K) and weight (2F, K) contiguous float8_e4m3fn, K % 16 == 0,
        F % half == 0; x_scale a scalar, w_scale a scalar or one per weight row, bias None or (2F,)."""
        if x8.dim() != 2 or weight.dim() != 2 or x8.shape[1] != weight.shape[1]:
            raise ValueError(f"gated_gemm_quant: x8 {tuple(x8.shape)} and weight {tuple(weight.shape)} do not multiply")
        if x8.shape[1] % 16 or weight.shape[0] % (2 * half):
            raise ValueError(f"gated_gemm_quant: needs K % 16 == 0 and 2F % {2 * half} == 0, got weight "
                             f"{tuple(weight.shape)}")
        return launch_gated_gemm_quant(x8.contiguous(), weight.contiguous(), x_scale, w_scale, bias, inv_scale,
                                       act, out_dtype, half)

    @gated_gemm_quant.register_fake
    def _gated_gemm_quant_fake(x8, weight, x_scale, w_scale, bias, inv_scale, act, out_dtype, half):
        return x8.new_empty((x8.shape[0], weight.shape[0] // 2), dtype=torch.float8_e4m3fn)

    @triton.jit
    def _fp8_attention_kernel(Q, K, V, Out, qk_scale_ptr, out_scale_ptr,
                              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om,
                              heads, group, q_len, kv_len,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = bh % heads
        qk_scale = tl.load(qk_scale_ptr)  # q_scale · k_scale · sm_scale · log2(e): scores in the exp2 domain
        out_scale = tl.load(out_scale_ptr)  # v_scale / 448: P's and V's dequantization
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < q_len, other=0.0)
        k_base = K + b * stride_kb + (h // group) * stride_kh
        v_base = V + b * stride_vb + (h // group) * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.minimum((start_m + 1) * BLOCK_M, kv_len) if CAUSAL else kv_len  # causal: q_len == kv_len
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < kv_len,
                         other=0.0)
            s = tl.dot(q, kt) * qk_scale
            valid = cols[None, :] < kv_len
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= cols[None, :])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays 0, not NaN
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=cols[:, None] < kv_len, other=0.0)
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
            m_i = m_new
        out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)

    def launch_fp8_attention(q8, k8, v8, q_scale, k_scale, v_scale, causal, sm_scale, out_dtype, config=None):
        """The attention kernel on (batch, heads, len, head_dim) operands whose last dimension (V: its
        len dimension) is contiguous; `config` overrides ATTENTION_CONFIG (benchmarks)."""
        c = dict(ATTENTION_CONFIG if config is None else config)
        batch, heads, q_len, head_dim = q8.shape
        kv_heads, kv_len = k8.shape[1], k8.shape[2]
        qk_scale = (q_scale.float() * k_scale.float() * (sm_scale * 1.4426950408889634)).reshape(1)
        out_scale = (v_scale.float() / 448.0).reshape(1)
        out = torch.empty((batch, heads, q_len, head_dim), dtype=out_dtype, device=q8.device)
        if out.numel() == 0:
            return out
        grid = (triton.cdiv(q_len, c["BLOCK_M"]), batch * heads)
        torch.library.wrap_triton(_fp8_attention_kernel)[grid](
            q8, k8, v8, out, qk_scale, out_scale, q8.stride(0), q8.stride(1), q8.stride(2),
            k8.stride(0), k8.stride(1), k8.stride(2), v8.stride(0), v8.stride(1), v8.stride(2), v8.stride(3),
            out.stride(0), out.stride(1), out.stride(2), heads, heads // kv_heads, q_len, kv_len,
            HEAD_DIM=head_dim, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], CAUSAL=causal,
            num_warps=c["num_warps"], num_stages=c["num_stages"])
        return out

    @torch.library.triton_op("quantkit::fp8_attention", mutates_args=())
    def fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_scale: torch.Tensor,
                      k_scale: torch.Tensor, v_scale: torch.Tensor, causal: bool, sm_scale: float,
                      out_dtype: torch.dtype) -> torch.Tensor:
        """softmax(q kᵀ · sm_scale) v of float8_e4m3fn (batch, heads, len, head_dim) q8 and (batch,
        kv_heads, kv_len, head_dim) k8, v8 (kv_heads dividing heads), their dequantization scales FP32
        scalars (amax / 448); v8 best made with its len dimension contiguous (else it is copied so).
        Causal needs len == kv_len. Returns (batch, heads, len, head_dim) in out_dtype."""
        if v8.stride(-2) != 1:  # P·V's FP8 operand must be K-major: V with its length dimension contiguous
            v8 = v8.transpose(-1, -2).contiguous().transpose(-1, -2)
        q8 = q8 if q8.stride(-1) == 1 else q8.contiguous()
        k8 = k8 if k8.stride(-1) == 1 else k8.contiguous()
        return launch_fp8_attention(q8, k8, v8, q_scale, k_scale, v_scale, causal, sm_scale, out_dtype)
