#!/usr/bin/env python3
"""FP8 runtime kernels against what they replace, on one GPU (CUDA + Triton), at the bench decoder's shapes.

    python scripts/bench_fp8_kernels.py --json benchmarks/fp8_kernels_gpu_DATE.json

- gated_act_quant (quantkit/runtime/fp8_kernels.py: act(gate) · up quantized to FP8 in one pass)
  against the same eager ops compiled by Inductor (one fused kernel too) and against the BF16 SiLU·mul
  that the BF16 model runs, at M = 2048 and 16384 tokens, FFN 16384 (the halves of a fused gate/up
  output): ms, GB/s, and the share of FP8 bytes equal to the eager ops' bytes.
- gated_gemm_quant (the runtime's gate/up GEMM with that kernel's arithmetic in its epilogue: TMA-fed,
  persistent, weight rows interleaved) against FP8Linear's cuBLAS GEMM followed by gated_act_quant, at
  M = 16 .. 16384, K 2048, FFN 16384, with a tile sweep: ms, TFLOPS, bytes equal to the two-kernel path.
- The runtime's FP8 flash-attention kernel (fp8_kernels.fp8_attention: Q·Kᵀ and P·V on the FP8 tensor
  cores, P quantized unnormalized with scale 1/448, FP32 softmax statistics) over a tile sweep, against
  PyTorch's BF16 SDPA at 8 heads × 256, one KV head, causal, 2048 tokens, batch 8 and 1: ms, TFLOPS and
  the cosine against FP32 attention.
Timings: CUDA events around 30 back-to-back calls, median of 3 repeats; the gated GEMM's also from 30
calls replayed from one CUDA graph ("gpu_ms": no host time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quantkit.runtime import fp8_kernels  # noqa: E402  (the kernels below call its Triton helpers)


def _median_ms(run, calls: int) -> float:
    """ms per call of `run` (which makes `calls` calls), CUDA events around it, median of 3 repeats."""
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[1]


def bench_ms(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return _median_ms(lambda: [fn() for _ in range(iters)], iters)


def bench_graph_ms(fn, iters: int = 30) -> float:
    """GPU time per call with no host time in it: `iters` calls captured in one CUDA graph, the graph
    replayed (median of 3). For kernels so short that back-to-back Python calls would time the host."""
    for _ in range(3):
        fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    return _median_ms(graph.replay, iters)


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


# the gated GEMM's tile sweep (BLOCK_N = 2 · GATED_GEMM_HALF): BLOCK_M, BLOCK_K, GROUP_M, warps, stages
GEMM_SWEEP = [(128, 128, 8, 8, 3), (128, 128, 16, 8, 3), (128, 128, 4, 8, 3), (128, 64, 8, 8, 4),
              (128, 64, 8, 8, 5), (128, 128, 8, 4, 3), (64, 128, 8, 4, 4), (128, 128, 8, 8, 2)]


def gated_gemm_rows(hidden: int = 2048, ffn: int = 16384) -> list[dict]:
    """The runtime's gated GEMM (fp8_kernels.gated_gemm_quant: the gate/up GEMM with gated_act_quant in
    its epilogue, interleaved weight) against what runs without it (FP8Linear's cuBLAS row-wise GEMM, then
    gated_act_quant), the same through the interleaved weight (cuBLAS, then gated_act_quant_blocks: the
    runtime's path below GEMM_EPILOGUE_MIN_ROWS), cuBLAS's GEMM alone and the BF16 GEMM + Inductor's
    SiLU·mul, at the bench decoder's gate/up shape; a tile sweep at 2048 and 16384 rows."""
    from quantkit.runtime.gated_mlp import GEMM_EPILOGUE_MIN_ROWS, interleave_gate_up_linear
    from quantkit.runtime.torch_fp8 import FP8Linear

    half = fp8_kernels.GATED_GEMM_HALF
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(2 * ffn, hidden, device="cuda", generator=g) * 0.02
    halves = [FP8Linear.from_amax(h, h.abs().amax(), torch.tensor(4.0, device="cuda")) for h in w.split(ffn)]
    gate_up = FP8Linear.concat(halves)
    interleaved = interleave_gate_up_linear(gate_up, 0, half)
    wi, si = interleaved.weight, interleaved.weight_scale
    w_bf16 = w.to(torch.bfloat16)
    silu_mul = torch.compile(lambda pair: F.silu(pair[:, :ffn]) * pair[:, ffn:])
    rows = []
    for m in (16, 64, 256, 512, 1024, 2048, 16384):
        x = torch.randn(m, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        x8 = gate_up.quantize_input(x)
        pair = gate_up.matmul_fp8(x8, torch.bfloat16)
        inv = 448 / (F.silu(pair[:, :ffn]) * pair[:, ffn:]).float().abs().amax()  # as calibrated: no saturation

        def unfused():
            gate, up = gate_up.matmul_fp8(x8, torch.bfloat16).split(ffn, dim=-1)
            return torch.ops.quantkit.gated_act_quant(gate, up, inv, "silu")

        def blocks():
            return torch.ops.quantkit.gated_act_quant_blocks(interleaved.matmul_fp8(x8, torch.bfloat16), inv, "silu", half)

        def fused(config=None):
            return fp8_kernels.launch_gated_gemm_quant(x8, wi, gate_up.input_scale, si, None, inv, "silu",
                                                       torch.bfloat16, half, config)

        want = unfused()
        got = fused()
        step = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2 ** -6))) - 3)
        flops = 2 * m * hidden * 2 * ffn
        row = {"m": m, "k": hidden, "ffn": ffn, "runtime_config": {**fp8_kernels.GATED_GEMM_CONFIG, "half": half},
               "runtime_uses_fused": m >= GEMM_EPILOGUE_MIN_ROWS,
               "bytes_equal_to_unfused": round((got.view(torch.uint8) == want.view(torch.uint8)).float().mean().item(), 6),
               "blocks_bytes_equal_to_unfused": round((blocks().view(torch.uint8) == want.view(torch.uint8))
                                                      .float().mean().item(), 6),
               "max_diff_fp8_steps": round(((got.float() - want.float()).abs() / step).max().item(), 3)}
        for name, fn in (("unfused_cublas_plus_kernel", unfused), ("fused_runtime_config", fused),
                         ("interleaved_cublas_plus_blocks_kernel", blocks),
                         ("cublas_gemm_alone", lambda: gate_up.matmul_fp8(x8, torch.bfloat16)),
                         ("bf16_gemm_plus_silu_mul", lambda: silu_mul(x @ w_bf16.t()))):
            ms, gpu_ms = bench_ms(fn), bench_graph_ms(fn)
            row[name] = {"ms": round(ms, 4), "gpu_ms": round(gpu_ms, 4), "tflops": round(flops / gpu_ms / 1e9, 1)}
        # "ms": back-to-back calls from Python (host time included at small M); "gpu_ms": replayed from a
        # CUDA graph, as the runtime runs under reduce-overhead
        row["fused_over_unfused"] = round(row["unfused_cublas_plus_kernel"]["ms"] / row["fused_runtime_config"]["ms"], 3)
        row["fused_over_unfused_gpu"] = round(row["unfused_cublas_plus_kernel"]["gpu_ms"]
                                              / row["fused_runtime_config"]["gpu_ms"], 3)
        row["sweep"] = []
        for bm, bk, gm, warps, stages in (GEMM_SWEEP if m in (2048, 16384) else []):
            config = dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
            try:
                ms = bench_graph_ms(lambda: fused(config))
                row["sweep"].append({**config, "gpu_ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
            except Exception as e:  # a configuration that does not fit (shared memory, registers)
                row["sweep"].append({**config, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        row["best"] = min((r for r in row["sweep"] if "gpu_ms" in r), key=lambda r: r["gpu_ms"], default=None)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        del x, x8, pair, want, got
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
