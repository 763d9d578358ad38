#!/usr/bin/env python3
"""How far BF16 alone is from FP32 on bench_gpu's 2.1B decoder: the floor under any FP8 cosine.

    python scripts/precision_floor.py [--device cpu|cuda] [--tokens 256] [--smoke]

Builds the decoder of scripts/bench_gpu.py (same seed and initialization), runs one random sequence
in BF16 and again with the same weights in FP32, and prints the cosine of the logits; then adds
relative N(0, 2^-9) noise to every FP32 weight (about BF16's rounding) and prints that cosine too,
which says how strongly the random model amplifies a perturbation. Needs ~13 GB of memory at full size.

With --fp8-budget it then says where FP8's error comes from: the FP32 model's linears are FP8 E4M3
fake-quantized (per-tensor, 448/amax, round to nearest; weights from their own amax, inputs from
static amax calibrated on two other random sequences), exact FP32 arithmetic otherwise (no fast
accumulation, no BF16), on subsets of the layers: all, weights only, inputs only, without k/v/o,
without down_proj, MLP only, attention only. ~4 minutes on 2 CPU cores at full size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_gpu  # noqa: E402
from bench_gpu import cosine  # noqa: E402
from quantkit.runtime.torch_fp8 import quantize_e4m3  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="the bench's tiny decoder")
    p.add_argument("--fp8-budget", action="store_true", help="also: FP8 fake quant on subsets of the linears")
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
    if args.fp8_budget:
        del model
        model = bench_gpu.build_decoder(cfg, args.device).model.float()
        fp8_budget(model, ids, cfg, fp32)


def _fp8(x: torch.Tensor, amax: float) -> torch.Tensor:
    """x fake-quantized to FP8 E4M3 with a per-tensor amax: the runtime's quantization, dequantized."""
    scale = 448.0 / amax
    return quantize_e4m3(x, torch.tensor(scale)).float() / scale


def fp8_budget(model: torch.nn.Module, ids: torch.Tensor, cfg: dict, reference: torch.Tensor) -> None:
    """Cosine against FP32 with FP8 E4M3 fake quant on subsets of the decoder's linears."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    amax: dict[str, float] = {}

    def record(name):
        def hook(module, args):
            amax[name] = max(amax.get(name, 0.0), args[0].abs().max().item())
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    calib = torch.randint(0, cfg["vocab_size"], (2, ids.shape[1]), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=calib.to(ids.device))
    for h in handles:
        h.remove()
    originals = {n: m.forward for n, m in linears.items()}

    def quantize(inputs, weights) -> None:
        for name, m in linears.items():
            qx, qw = inputs(name), weights(name)
            if not (qx or qw):
                m.forward = originals[name]
                continue

            def forward(x, m=m, name=name, qx=qx, qw=qw):
                w = _fp8(m.weight, m.weight.abs().max().item()) if qw else m.weight
                return torch.nn.functional.linear(_fp8(x, amax[name]) if qx else x, w, m.bias)
            m.forward = forward

    def has(*parts):
        return lambda n: any(p in n for p in parts)

    def lacks(*parts):
        return lambda n: not any(p in n for p in parts)

    def always(n):
        return True

    def never(n):
        return False

    subsets = {"all linears": (always, always), "weights only": (never, always), "inputs only": (always, never),
               "all but k/v/o_proj": (lacks("k_proj", "v_proj", "o_proj"),) * 2,
               "all but down_proj": (lacks("down_proj"),) * 2, "MLP only": (has("mlp"),) * 2,
               "attention projections only": (has("self_attn"),) * 2}
    with torch.inference_mode():
        for label, (inputs, weights) in subsets.items():
            quantize(inputs, weights)
            out = model(input_ids=ids).logits.float()
            print(f"FP8 E4M3 on {label:28s} cosine vs FP32 = {cosine(out, reference):.6f}", flush=True)
    quantize(never, never)


if __name__ == "__main__":
    main()
