#!/usr/bin/env python3
"""FP8 runtime kernels against what they replace, on one GPU (CUDA + Triton), at the bench decoder's shapes.

    python scripts/bench_fp8_kernels.py --json benchmarks/fp8_kernels_gpu_DATE.json

- gated_act_quant (quantkit/runtime/fp8_kernels.py: act(gate) · up quantized to FP8 in one pass)
  against the same eager ops compiled by Inductor (one fused kernel too) and against the BF16 SiLU·mul
  that the BF16 model runs, at M = 2048 and 16384 tokens, FFN 16384 (the halves of a fused gate/up
  output): ms, GB/s, and the share of FP8 bytes equal to the eager ops' bytes.
- An FP8 flash-attention forward written in Triton here (Q·Kᵀ and P·V on the FP8 tensor cores, P
  quantized unnormalized with scale 1/448, FP32 softmax statistics; a tile-size sweep) against PyTorch's
  BF16 SDPA at 8 heads × 256, one KV head, causal, 2048 tokens, batch 8 and 1: ms, TFLOPS and the
  cosine against FP32 attention. It is an experiment, not part of the runtime: it did not beat
  the BF16 kernel on an H200 (BENCHMARKS.md), so the runtime leaves attention to SDPA.
Timings: CUDA events around 30 back-to-back calls, median of 3 repeats.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def bench_ms(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[1]


def gated_rows(ffn: int = 16384) -> list[dict]:
    from quantkit.runtime import fp8_kernels  # noqa: F401  (registers torch.ops.quantkit.gated_act_quant)
    from quantkit.runtime.torch_fp8 import quantize_e4m3

    def eager(pair, inv):
        gate, up = pair.split(ffn, dim=-1)
        return quantize_e4m3(F.silu(gate) * up, inv)

    def bf16(pair):
        gate, up = pair.split(ffn, dim=-1)
        return F.silu(gate) * up

    rows = []
    for m in (2048, 16384):
        pair = torch.randn(m, 2 * ffn, device="cuda", dtype=torch.bfloat16)
        inv = torch.tensor(448 / 6.0, device="cuda")
        gate, up = pair.split(ffn, dim=-1)
        inductor, inductor_bf16 = torch.compile(eager), torch.compile(bf16)
        want = eager(pair, inv).view(torch.uint8)
        kernel = lambda: torch.ops.quantkit.gated_act_quant(gate, up, inv, "silu")  # noqa: E731
        fp8_bytes, bf16_bytes = m * ffn * 2 * 2 + m * ffn, m * ffn * 2 * 2 + m * ffn * 2
        row = {"m": m, "ffn": ffn}
        for name, fn, nbytes in (("quantkit_kernel", kernel, fp8_bytes),
                                 ("inductor_fp8", lambda: inductor(pair, inv), fp8_bytes),
                                 ("inductor_bf16_silu_mul", lambda: inductor_bf16(pair), bf16_bytes)):
            ms = bench_ms(fn)
            row[name] = {"ms": round(ms, 4), "gb_s": round(nbytes / ms / 1e6, 1)}
            if name != "inductor_bf16_silu_mul":
                row[name]["bytes_equal_to_eager"] = round((fn().view(torch.uint8) == want).float().mean().item(), 6)
        row["kernel_over_inductor"] = round(row["inductor_fp8"]["ms"] / row["quantkit_kernel"]["ms"], 3)
        rows.append(row)
        print(row, flush=True)
        del pair, gate, up, want
    return rows


def attention_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_attention_fwd(Q, K, V, Out, qk_scale_ptr, out_scale_ptr, stride_qb, stride_qh, stride_qm,
                          stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_ob, stride_oh, stride_om, heads, group, q_len, kv_len,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # causal, queries aligned with the keys (q_len == kv_len)
        start_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        qk_scale, out_scale = tl.load(qk_scale_ptr), tl.load(out_scale_ptr)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=offs_m[:, None] < q_len, other=0.0)
        k_base = K + b.to(tl.int64) * stride_kb + (h // group) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + (h // group) * stride_vh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.minimum((start_m + 1) * BLOCK_M, kv_len)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < kv_len, other=0.0)
            s = tl.dot(q, kt) * qk_scale
            s = tl.where((cols[None, :] < kv_len) & (offs_m[:, None] >= cols[None, :]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=cols[:, None] < kv_len, other=0.0)
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
            m_i = m_new
        out = acc * (out_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
        tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)

    def run(q8, k8, v8, sq, sk, sv, block_m, block_n, warps, stages):
        batch, heads, n, d = q8.shape
        qk_scale = (sq * sk * (1.4426950408889634 / math.sqrt(d))).reshape(1)
        out_scale = (sv / 448.0).reshape(1)
        out = torch.empty(batch, heads, n, d, dtype=torch.bfloat16, device=q8.device)
        fp8_attention_fwd[(triton.cdiv(n, block_m), batch * heads)](
            q8, k8, v8, out, qk_scale, out_scale, *q8.stride()[:3], *k8.stride()[:3], *v8.stride(),
            *out.stride()[:3], heads, heads // k8.shape[1], n, n, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages)
        return out

    return run


def attention_rows() -> list[dict]:
    from quantkit.runtime.torch_fp8 import quantize_e4m3

    run = attention_kernel()
    rows = []
    for batch in (8, 1):
        heads, kv_heads, n, d = 8, 1, 2048, 256
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(batch, h, n, d, device="cuda", generator=g).to(torch.bfloat16)
                   for h in (heads, kv_heads, kv_heads))
        kr, vr = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        ref = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), is_causal=True)
        scales = [t.abs().amax().float() / 448 for t in (q, k, v)]
        q8, k8, v8 = (quantize_e4m3(t, 1 / s) for t, s in zip((q, k, v), scales))
        v8 = v8.transpose(-1, -2).contiguous().transpose(-1, -2)  # P·V's operand with the sequence contiguous
        flops = 2 * 2 * batch * heads * n * n * d / 2  # two matmuls, half the scores (causal)

        def cos(a):
            return round(F.cosine_similarity(a.float().flatten(), ref.flatten(), dim=0).item(), 6)

        sdpa = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731
        ms = bench_ms(sdpa)
        row = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "len": n, "head_dim": d,
               "sdpa_bf16": {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "cosine": cos(sdpa())},
               "triton_fp8": {}}
        for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
            if bm == 128 and warps == 4:
                continue
            fn = lambda: run(q8, k8, v8, *scales, bm, bn, warps, stages)  # noqa: E731
            ms = bench_ms(fn, iters=10)
            row["triton_fp8"][f"{bm}x{bn} w{warps} s{stages}"] = {"ms": round(ms, 4),
                                                                  "tflops": round(flops / ms / 1e9, 1),
                                                                  "cosine": cos(fn())}
        best = min(row["triton_fp8"].items(), key=lambda kv: kv[1]["ms"])
        row["best_triton_fp8"] = best[0]
        row["sdpa_over_best_triton_fp8"] = round(row["sdpa_bf16"]["ms"] / best[1]["ms"], 3)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "triton_fp8"}, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_kernels: needs a CUDA GPU (and Triton)", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "gated_act_quant": gated_rows(), "attention": attention_rows()}
    import triton

    report["triton"] = triton.__version__
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
