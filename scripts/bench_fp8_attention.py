#!/usr/bin/env python3
"""The bench decoder under FP8 linears *and* FP8 attention (Q, K, V, P quantized, as the `fp8` recipe
does): BF16 against quantkit's FP8 runtime with the attention in ModelOpt's fake quant and in the FP8
attention kernel, side by side in one loop, compiled the same way.

    python3 scripts/bench_fp8_attention.py --json benchmarks/fp8_attention_gpu_DATE.json

The decoder, its calibration and the timing are scripts/bench_gpu.py's (interleaved CUDA-event timings,
median; every decoder layer torch.compile'd, fused q/k/v + gate/up on both sides). Cosines: each FP8
variant against BF16, and the FP8-attention variant against the fake-quant-attention one. Needs a CUDA
GPU with FP8 (SM 8.9+), Triton and ModelOpt.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_gpu as bench  # noqa: E402


def fp8_with_attention_recipe():
    """bench_gpu's runtime recipe (FP8 linears, BF16 head) with the attention matmuls and P in FP8."""
    from quantkit.recipe import AttentionSpec

    base = bench.runtime_recipe()
    return base.model_copy(update={"name": "fp8-linears-attention",
                                   "attention": AttentionSpec(precision="fp8", quantize_softmax_output=True)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 1], help="batch sizes (of 2048 tokens)")
    parser.add_argument("--smoke", action="store_true", help="bench_gpu's tiny decoder, 256 tokens: the code paths only")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("bench_fp8_attention: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    from quantkit import console, ptq
    from quantkit.runtime.fusion import fuse_bf16_linears
    from quantkit.runtime.torch_fp8 import TorchFP8Runner, compile_model

    console.set_quiet(True)
    torch._dynamo.config.recompile_limit = 64
    bench.skip_modelopt_jit()
    s = bench.sizes(args.smoke)
    cfg, length = s["decoder"], 256 if args.smoke else 2048
    base, quant = bench.build_decoder(cfg, device), bench.build_decoder(cfg, device)
    recipe = fp8_with_attention_recipe()
    part, _ = ptq.split_calibration(bench.calibration_set("decoder", s), recipe)
    ptq.quantize_model(quant, recipe, part, dtype="bf16", device=torch.device(device), batch_size=s["batch_size"])
    g = torch.Generator().manual_seed(7)
    inputs = {b: {"input_ids": torch.randint(0, cfg["vocab_size"], (b, length), generator=g).to(device)}
              for b in args.batch}
    first = inputs[args.batch[0]]

    def runner(fp8_attention: bool):
        r = TorchFP8Runner(dataclasses.replace(quant, model=copy.deepcopy(quant.model)), compile=False,
                           device=device, dtype=torch.bfloat16, fp8_attention=fp8_attention)
        r.fuse(first)
        compile_model(r.model)
        return r

    bf16 = copy.deepcopy(base.model)
    fuse_bf16_linears(bf16, lambda: bf16(**first))
    compile_model(bf16)
    fake, kernel = runner(False), runner(True)
    models = {"bf16": bf16, "fp8, fake-quant attention": fake.model, "fp8, FP8 attention kernel": kernel.model}
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "recipe": recipe.name,
                    "fp8_attention_modules": len(kernel.fp8_attention), "gated_mlps": len(kernel.gated_mlps),
                    "rows": []}
    for b, x in inputs.items():
        fns = {}
        for name, model in models.items():
            def fn(model=model, x=x):
                with torch.inference_mode():
                    return model(**x).logits
            fns[name] = fn
        outputs = {name: fn().float().clone() for name, fn in fns.items()}  # also the compile
        t = bench.time_interleaved(fns, iters=5, rounds=3)
        row = {"shape": [b, length], "ms": {name: t[name]["median_ms"] for name in fns}}
        row["speedup_vs_bf16"] = {name: round(t["bf16"]["median_ms"] / t[name]["median_ms"], 3) for name in fns}
        row["cosine_vs_bf16"] = {name: round(bench.cosine(outputs[name], outputs["bf16"]), 6) for name in fns}
        row["kernel_vs_fake_quant_attention_cosine"] = round(
            bench.cosine(outputs["fp8, FP8 attention kernel"], outputs["fp8, fake-quant attention"]), 6)
        row["finite"] = {name: bool(torch.isfinite(o).all()) for name, o in outputs.items()}
        if device == "cuda":  # GPU kernel time of one forward, by kind: what the wall time is made of
            row["kernel_ms"] = {name: {k: v for k, v in bench.kernel_breakdown(fn).items() if k != "top"}
                                for name, fn in fns.items()}
        report["rows"].append(row)
        print(row, flush=True)
        del outputs
    # what ran in the compiled FP8-attention model's forward: its attention kernel launches, by name
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            kernel.model(**inputs[args.batch[-1]])
        report["attention_kernel_launches_per_forward"] = {e.key[:90]: e.count for e in prof.key_averages()
                                                           if "attention" in e.key.lower()}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
