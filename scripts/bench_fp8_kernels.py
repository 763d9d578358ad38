#!/usr/bin/env python3
"""FP8 runtime kernels against what they replace, on one GPU (CUDA + Triton), at the bench decoder's shapes.

    python scripts/bench_fp8_kernels.py --json benchmarks/fp8_kernels_gpu_DATE.json

- gated_act_quant (quantkit/runtime/fp8_kernels.py: act(gate) · up quantized to FP8 in one pass)
  against the same eager ops compiled by Inductor (one fused kernel too) and against the BF16 SiLU·mul
  that the BF16 model runs, at M = 2048 and 16384 tokens, FFN 16384 (the halves of a fused gate/up
  output): ms, GB/s, and the share of FP8 bytes equal to the eager ops' bytes.
- An experiment, not part of the runtime: the gate/up GEMM with that kernel's arithmetic in its epilogue,
  written in Triton here, against FP8Linear's cuBLAS GEMM followed by gated_act_quant, at M = 256, 2048
  and 16384, K 2048, FFN 16384, with a tile sweep: ms, TFLOPS, bytes equal to the two-kernel path.
  On an H200 Triton's GEMM ran at ~980 TFLOPS against cuBLAS's ~1340, so the two kernels win (BENCHMARKS.md).
- The runtime's FP8 flash-attention kernel (fp8_kernels.fp8_attention: Q·Kᵀ and P·V on the FP8 tensor
  cores, P quantized unnormalized with scale 1/448, FP32 softmax statistics) over a tile sweep, against
  PyTorch's BF16 SDPA at 8 heads × 256, one KV head, causal, 2048 tokens, batch 8 and 1: ms, TFLOPS and
  the cosine against FP32 attention.
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

from quantkit.runtime import fp8_kernels  # noqa: E402  (the kernels below call its Triton helpers)


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


def gated_gemm_kernel():
    """An experiment, not part of the runtime: the gate/up GEMM with gated_act_quant's arithmetic in its
    epilogue, in Triton (two accumulators per tile, the gate's and the up's columns). Returns its launcher
    (x8, w8, x_scale, w_scale, bias, inv_scale, act, gate_index, out_dtype, config)."""
    import triton
    import triton.language as tl

    ACTIVATIONS = fp8_kernels.ACTIVATIONS

    @triton.jit
    def _gated_gemm_quant_kernel(X, W, Out, x_scale_ptr, w_scale_ptr, bias_ptr, inv_scale_ptr,
                                 M, F, K, stride_xm, stride_wn, gate_row, up_row,
                                 ACT: tl.constexpr, W_SCALE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 OUT_FP16: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # One (BLOCK_M, BLOCK_N) tile of act(gate) * up: two accumulators, x times the gate rows and
        # times the up rows of W at the same columns, so both halves of the tile are in registers.
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
        group = GROUP_M * num_n  # tiles of GROUP_M row-blocks run together: their W columns stay in L2
        first_m = (pid // group) * GROUP_M
        rows_here = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % rows_here
        pid_n = (pid % group) // rows_here
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows_x = (offs_m % M).to(tl.int64)  # out-of-range rows and columns read valid memory, are not stored
        cols_w = offs_n % F
        x_ptrs = X + rows_x[:, None] * stride_xm + offs_k[None, :]
        g_ptrs = W + (gate_row + cols_w).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        u_ptrs = W + (up_row + cols_w).to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(x_ptrs)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                k_left = K - k * BLOCK_K
                x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                g = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
                u = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        # The epilogue: what FP8Linear's GEMM gives (acc times both scales, plus the bias, rounded to the
        # model's dtype), then gated_act_quant's arithmetic on it, roundings included.
        x_scale = tl.load(x_scale_ptr)
        if W_SCALE_ROWS:
            g = acc_g * x_scale * tl.load(w_scale_ptr + gate_row + cols_w)[None, :]
            u = acc_u * x_scale * tl.load(w_scale_ptr + up_row + cols_w)[None, :]
        else:
            g = acc_g * x_scale * tl.load(w_scale_ptr)
            u = acc_u * x_scale * tl.load(w_scale_ptr)
        if HAS_BIAS:
            g += tl.load(bias_ptr + gate_row + cols_w).to(tl.float32)[None, :]
            u += tl.load(bias_ptr + up_row + cols_w).to(tl.float32)[None, :]
        dtype = tl.float16 if OUT_FP16 else tl.bfloat16
        h = fp8_kernels.gated_act(g.to(dtype).to(tl.float32), u.to(dtype).to(tl.float32), ACT, dtype)
        y = tl.clamp(h * tl.load(inv_scale_ptr), -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        out_ptrs = Out + offs_m.to(tl.int64)[:, None] * F + offs_n[None, :]
        tl.store(out_ptrs, y.to(tl.float8e4nv), mask=(offs_m[:, None] < M) & (offs_n[None, :] < F))

    def launch_gated_gemm_quant(x8, w8, x_scale, w_scale, bias, inv_scale, act, gate_index, out_dtype, config):
        """act(gate) · up quantized, of x8 (M, K) times the joined (2F, K) weight w8 (half gate_index the
        gate's): (M, F) float8_e4m3fn."""
        rows, k = x8.shape
        f = w8.shape[0] // 2
        out = torch.empty((rows, f), dtype=torch.float8_e4m3fn, device=x8.device)
        if out.numel() == 0:
            return out
        c = dict(config)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        grid = (triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(f, c["BLOCK_N"]),)
        _gated_gemm_quant_kernel[grid](
            x8, w8, out, x_scale, w_scale, w_scale if bias is None else bias, inv_scale, rows, f, k,
            x8.stride(0), w8.stride(0), gate_index * f, (1 - gate_index) * f, ACT=ACTIVATIONS.index(act),
            W_SCALE_ROWS=w_scale.numel() > 1, HAS_BIAS=bias is not None, OUT_FP16=out_dtype == torch.float16,
            EVEN_K=k % c["BLOCK_K"] == 0, num_warps=warps, num_stages=stages, **c)
        return out

    return launch_gated_gemm_quant


# the fused gate/up kernel's tile sweep: BLOCK_M, BLOCK_N (per half), BLOCK_K, GROUP_M, warps, stages
GEMM_SWEEP = [(128, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 64, 8, 8, 4), (128, 64, 128, 8, 4, 4),
              (128, 64, 128, 8, 8, 4), (64, 128, 128, 8, 4, 4), (256, 64, 128, 8, 8, 3), (128, 128, 128, 8, 4, 3),
              (128, 128, 128, 16, 8, 3), (64, 64, 128, 8, 4, 5)]


def gated_gemm_rows(hidden: int = 2048, ffn: int = 16384) -> list[dict]:
    """The gate/up GEMM and gated_act_quant in one kernel (gated_gemm_quant) against the two kernels the
    runtime runs otherwise (FP8Linear's cuBLAS row-wise GEMM, then gated_act_quant) and the BF16 GEMM +
    Inductor's SiLU·mul, at the bench decoder's gate/up shape; with a tile sweep of the fused kernel."""
    from quantkit.runtime.torch_fp8 import FP8Linear

    launch = gated_gemm_kernel()
    default = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(2 * ffn, hidden, device="cuda", generator=g) * 0.02
    halves = [FP8Linear.from_amax(h, h.abs().amax(), torch.tensor(4.0, device="cuda")) for h in w.split(ffn)]
    gate_up = FP8Linear.concat(halves)
    w_bf16 = w.to(torch.bfloat16)
    inv = torch.tensor(448 / 0.02, device="cuda")
    silu_mul = torch.compile(lambda pair: F.silu(pair[:, :ffn]) * pair[:, ffn:])
    rows = []
    for m in (256, 2048, 16384):
        x = torch.randn(m, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        x8 = gate_up.quantize_input(x)

        def unfused():
            gate, up = gate_up.matmul_fp8(x8, torch.bfloat16).split(ffn, dim=-1)
            return torch.ops.quantkit.gated_act_quant(gate, up, inv, "silu")

        def fused(config=default):
            return launch(x8, gate_up.weight, gate_up.input_scale, gate_up.weight_scale, None, inv, "silu", 0,
                          torch.bfloat16, config)

        want = unfused()
        got = fused().float()
        step = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2 ** -6))) - 3)
        flops = 2 * m * hidden * 2 * ffn
        row = {"m": m, "k": hidden, "ffn": ffn, "default_config": default,
               "bytes_equal_to_unfused": round((got.to(torch.float8_e4m3fn).view(torch.uint8)
                                               == want.view(torch.uint8)).float().mean().item(), 6),
               "max_diff_fp8_steps": round(((got - want.float()).abs() / step).max().item(), 3)}
        for name, fn in (("unfused_cublas_plus_kernel", unfused), ("fused_default", fused),
                         ("bf16_gemm_plus_silu_mul", lambda: silu_mul(x @ w_bf16.t()))):
            ms = bench_ms(fn)
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        row["sweep"] = []
        for bm, bn, bk, gm, warps, stages in GEMM_SWEEP:
            config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
            try:
                ms = bench_ms(lambda: fused(config))
                row["sweep"].append({**config, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
            except Exception as e:  # a configuration that does not fit (shared memory, registers)
                row["sweep"].append({**config, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        row["best"] = min((r for r in row["sweep"] if "ms" in r), key=lambda r: r["ms"], default=None)
        row["fused_over_unfused"] = round(row["unfused_cublas_plus_kernel"]["ms"] / row["fused_default"]["ms"], 3)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        del x, x8, want, got
    return rows


def attention_rows() -> list[dict]:
    from quantkit.runtime.torch_fp8 import quantize_e4m3

    def run(q8, k8, v8, sq, sk, sv, block_m, block_n, warps, stages):
        config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return fp8_kernels.launch_fp8_attention(q8, k8, v8, sq, sk, sv, True, q8.shape[-1] ** -0.5, torch.bfloat16,
                                                config)

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
        c = fp8_kernels.ATTENTION_CONFIG
        row["runtime_config"] = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
        row["best_triton_fp8"] = best[0]
        row["sdpa_over_best_triton_fp8"] = round(row["sdpa_bf16"]["ms"] / best[1]["ms"], 3)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "triton_fp8"}, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", choices=["gated", "gemm", "attention"], nargs="+",
                        default=["gated", "gemm", "attention"], help="which kernels")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_kernels: needs a CUDA GPU (and Triton)", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__}
    for key, name, rows in (("gated", "gated_act_quant", gated_rows), ("gemm", "gated_gemm_quant", gated_gemm_rows),
                            ("attention", "attention", attention_rows)):
        if key in args.only:
            report[name] = rows()
    import triton

    report["triton"] = triton.__version__
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
