#!/usr/bin/env python3
"""Where a forward's wall time goes beyond its kernels: the bench decoder (scripts/bench_gpu.py's) in BF16
and in FP8, both fused and compiled with per-layer CUDA graphs as bench_gpu's "compiled + CUDA graphs,
fused" rows, on one CUDA GPU.

    python scripts/bench_fp8_forward_gap.py --json benchmarks/fp8_forward_gap_gpu_DATE.json

For each model and shape: the wall time per forward as bench_gpu times it (CUDA events, one forward at a
time, interleaved rounds); then, from a profile of the same loop, per forward the sum of kernel times,
the time the GPU ran at least one kernel (the union of the kernels' intervals), and the idle time inside
the forward (its first kernel's start to its last kernel's end, less the busy time); and the SM clock and
power that nvidia-smi reports while each model runs forwards back to back. A wall time above the busy
time with little idle time inside says the kernels themselves ran slower in the loop than in a one-forward
profile (clocks); idle time says the GPU waited (launches, host syncs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bench_gpu  # noqa: E402  (the decoder, its calibration and the timing loop)


def busy_intervals(prof) -> list[tuple[float, float]]:
    """(start, end) in µs of every GPU kernel and copy the profile recorded, sorted."""
    out = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.end > ev.time_range.start:
            out.append((float(ev.time_range.start), float(ev.time_range.end)))
    return sorted(out)


def split_forwards(intervals: list[tuple[float, float]], min_gap_us: float) -> list[list[tuple[float, float]]]:
    """The intervals cut into forwards at idle gaps longer than min_gap_us (the host sync between two)."""
    groups: list[list[tuple[float, float]]] = []
    end = None
    for start, stop in intervals:
        if end is None or start - end > min_gap_us:
            groups.append([])
        groups[-1].append((start, stop))
        end = stop if end is None else max(end, stop)
    return groups


def forward_stats(group: list[tuple[float, float]]) -> dict[str, float]:
    """ms of one forward's kernels: their sum, their union (busy), its span and the idle time inside."""
    busy, cur_start, cur_end = 0.0, None, None
    for start, stop in group:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, stop
        else:
            cur_end = max(cur_end, stop)
    busy += cur_end - cur_start
    span = max(stop for _, stop in group) - group[0][0]
    return {"kernel_sum_ms": sum(b - a for a, b in group) / 1e3, "busy_ms": busy / 1e3, "span_ms": span / 1e3,
            "idle_inside_ms": (span - busy) / 1e3, "kernels": len(group)}


def sampled_clocks(fn, seconds: float) -> dict[str, float]:
    """Median / min SM clock (MHz) and median power (W) nvidia-smi reports while fn runs back to back."""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    torch.cuda.synchronize()
    smi.terminate()
    rows = [line.split(",") for line in smi.communicate()[0].splitlines() if line.count(",") == 1]
    clocks, power = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    return {"samples": len(rows), "calls": calls, "sm_mhz_median": statistics.median(clocks) if clocks else None,
            "sm_mhz_min": min(clocks) if clocks else None, "power_w_median": statistics.median(power) if power else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--forwards", type=int, default=10, help="forwards profiled per model and shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_forward_gap: needs a CUDA GPU with FP8 tensor cores", file=sys.stderr)
        return 2
    from quantkit import ptq
    from quantkit.runtime.fusion import fuse_bf16_linears
    from quantkit.runtime.torch_fp8 import TorchFP8Runner, compile_model
    from torch.profiler import ProfilerActivity, profile

    bench_gpu.skip_modelopt_jit()
    s = bench_gpu.sizes(False)
    device = "cuda"
    base, quant = bench_gpu.build_decoder(s["decoder"], device), bench_gpu.build_decoder(s["decoder"], device)
    recipe = bench_gpu.runtime_recipe()
    calib, _ = ptq.split_calibration(bench_gpu.calibration_set("decoder", s), recipe)
    ptq.quantize_model(quant, recipe, calib, dtype="bf16", device=torch.device(device), batch_size=s["batch_size"])
    g = torch.Generator().manual_seed(7)
    inputs = {shape: {"input_ids": torch.randint(0, s["decoder"]["vocab_size"], shape, generator=g).to(device)}
              for shape in s["shapes"]}
    first = inputs[s["shapes"][0]]
    bf16 = copy.deepcopy(base.model)
    fuse_bf16_linears(bf16, lambda: bf16(**first))
    compile_model(bf16, mode="reduce-overhead")
    runner = TorchFP8Runner(quant, compile=False, fuse=True, device=device, dtype=torch.bfloat16)
    runner.fuse(first)
    runner.compile(mode="reduce-overhead")
    del base

    def call(model):
        def fn(x):
            with torch.inference_mode():
                torch.compiler.cudagraph_mark_step_begin()
                return model(**x).logits
        return fn

    models = {"bf16 fused graphs": call(bf16), "fp8 fused graphs": call(runner.model)}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for shape in s["shapes"]:
        x = inputs[shape]
        key = "x".join(map(str, shape))
        t = bench_gpu.time_interleaved({n: (lambda fn=fn: fn(x)) for n, fn in models.items()}, iters=s["iters"],
                                       rounds=s["rounds"])
        row = {}
        for name, fn in models.items():
            for _ in range(3):
                fn(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.forwards):  # one at a time, as time_interleaved runs them
                    fn(x)
                    torch.cuda.synchronize()
                    time.sleep(0.002)  # a host gap that marks where one forward ends
            groups = [grp for grp in split_forwards(busy_intervals(prof), 1500.0) if len(grp) > 10]
            stats = [forward_stats(grp) for grp in groups]
            if not stats:
                row[name] = {"wall_ms": t[name]["median_ms"], "error": "no forward found in the profile"}
                continue
            row[name] = {"wall_ms": t[name]["median_ms"], "profiled_forwards": len(stats),
                         **{k: round(statistics.median(st[k] for st in stats), 3) for k in stats[0]},
                         "clocks": sampled_clocks(lambda: fn(x), 6.0)}
            print(key, name, row[name], flush=True)
        row["wall_ratio"] = round(row["bf16 fused graphs"]["wall_ms"] / row["fp8 fused graphs"]["wall_ms"], 3)
        if all("busy_ms" in row[n] for n in models):
            row["busy_ratio"] = round(row["bf16 fused graphs"]["busy_ms"] / row["fp8 fused graphs"]["busy_ms"], 3)
        report["shapes"][key] = row
        print(key, "wall ratio", row["wall_ratio"], "busy ratio", row.get("busy_ratio"), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
