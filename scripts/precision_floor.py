#!/usr/bin/env python3
"""How far BF16 alone is from FP32 on bench_gpu's 2.1B decoder: the floor under any FP8 cosine.

    python scripts/precision_floor.py [--device cpu|cuda] [--tokens 256] [--smoke]

Builds the decoder of scripts/bench_gpu.py (same seed and initialization), runs one random sequence
in BF16 and again with the same weights in FP32, and prints the cosine of the logits; then adds
relative N(0, 2^-9) noise to every FP32 weight (about BF16's rounding) and prints that cosine too,
which says how strongly the random model amplifies a perturbation. Needs ~13 GB of memory at full size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_gpu  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="the bench's tiny decoder")
    args = p.parse_args()
    cfg = bench_gpu.sizes(args.smoke)["decoder"]
    model = bench_gpu.build_decoder(cfg, args.device).model
    ids = torch.randint(0, cfg["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(7))
    ids = ids.to(args.device)
    with torch.inference_mode():
        bf16 = model(input_ids=ids).logits.float()
        model.float()
        fp32 = model(input_ids=ids).logits.float()
        print(f"cosine(BF16, FP32) = {cosine(bf16, fp32):.6f}", flush=True)
        torch.manual_seed(1)
        for w in model.parameters():
            w.add_(w * torch.randn_like(w) * 2**-9)
        noisy = model(input_ids=ids).logits.float()
        print(f"cosine(FP32 with weights x (1 + N(0, 2^-9)), FP32) = {cosine(noisy, fp32):.6f}", flush=True)


if __name__ == "__main__":
    main()
