"""Time quantkit's CPU NVFP4 fake quantization on a 4096x4096 weight: median of a few runs, in ms.

    python scripts/bench_nvfp4_cpu.py [--size 4096] [--repeats 7] [--threads N] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quantkit.nvfp4_cpu import nvfp4_fake_quantize

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    w = (torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02).to(DTYPES[args.dtype])
    amax = w.abs().amax().float()
    nvfp4_fake_quantize(w, amax)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        nvfp4_fake_quantize(w, amax)
        times.append((time.perf_counter() - t0) * 1e3)
    print(
        f"nvfp4_fake_quantize {args.size}x{args.size} {args.dtype}, {torch.get_num_threads()} thread(s): "
        f"median {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f}, {args.repeats} runs, "
        f"{args.size * args.size / statistics.median(times) / 1e3:.0f} Melem/s)"
    )


if __name__ == "__main__":
    main()
