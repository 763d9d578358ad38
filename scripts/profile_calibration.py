#!/usr/bin/env python3
"""Where calibration time goes: the bench decoder's forward, plain vs prepared vs under mtq calibration.

    python scripts/profile_calibration.py [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bench_gpu  # noqa: E402


def timed(fn, n=3):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    from quantkit import console, ptq
    from quantkit.recipe import load_recipe

    console.set_quiet(True)
    bench_gpu.skip_modelopt_jit()
    s = bench_gpu.sizes(args.smoke)
    s["calib_samples"] = 32
    calib = bench_gpu.calibration_set("decoder", s)
    loaded = bench_gpu.build_decoder(s["decoder"], "cuda")
    batch = {k: torch.cat([calib[i].kwargs[k] for i in range(8)]).cuda() for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        print(f"plain bf16 forward 8x{s['calib_seq']}: {timed(lambda: loaded.model(**batch)) * 1e3:.1f} ms", flush=True)
    recipe = load_recipe("fp8")
    ptq.prepare(loaded, recipe, "bf16", torch.device("cuda"))
    with torch.no_grad():
        print(f"prepared (protect+attention) forward: {timed(lambda: loaded.model(**batch)) * 1e3:.1f} ms", flush=True)
    calib_part = calib.subset(range(16))
    from torch.profiler import ProfilerActivity, profile

    orig = type(calib_part).forward_loop

    def fl(cs, *a, **k):
        loop = orig(cs, *a, **k)

        def prof_loop(model):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                loop(model)
                torch.cuda.synchronize()
                print(f"calibration loop, {len(cs)} samples: {time.perf_counter() - t0:.2f} s", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
        return prof_loop

    type(calib_part).forward_loop = fl
    loaded2 = bench_gpu.build_decoder(s["decoder"], "cuda")
    del loaded
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    ptq.quantize_model(loaded2, recipe, calib_part, dtype="bf16", device=torch.device("cuda"), batch_size=8)
    print(f"quantize_model total {time.perf_counter() - t0:.2f} s")
    with torch.no_grad():
        print(f"fake-quant forward: {timed(lambda: loaded2.model(**batch)) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
