#!/usr/bin/env python3
"""Calibration scaling: calibrate 512 samples of the bench decoder on 1 GPU and data-parallel on N GPUs.

    python scripts/bench_calibration_scaling.py                    # 1 vs every visible GPU (needs >= 2)
    python scripts/bench_calibration_scaling.py --gpus 2 --json benchmarks/calibration_scaling.json
    python scripts/bench_calibration_scaling.py --smoke --device cpu  # tiny decoder, 2 gloo ranks on the CPU

The model, sizes and calibration set are scripts/bench_gpu.py's (the 2B-scale Llama decoder in BF16,
512 random-token samples of 256 tokens, batches of 8). Each run has processes of its own: the 1-GPU
run calibrates through quantkit's ordinary path; the N-GPU run starts N ranks that each calibrate
their shard and reduce the statistics over NCCL (quantkit.distributed). Timed: the calibration
forward pass of mtq.quantize, for N ranks from a barrier to the end of the reduction on the slowest
rank. Not timed: building the model, one warm-up batch, the FP32 reference, evaluation. The amax
values of the N-GPU run are compared with the 1-GPU run's bit for bit (exit 1 if they differ).
Prints a Markdown table (for BENCHMARKS.md) and writes JSON (default
benchmarks/calibration_scaling_<date>.json). With fewer than 2 GPUs it refuses (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import bench_gpu  # noqa: E402  (build_decoder, sizes, calibration_set, CalibrationTimer: shared, not copied)

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    """One process of a run: build, calibrate (its shard when world > 1), leave timings and amax in cfg['dir']."""
    from quantkit import console, ptq
    from quantkit.distributed import DataParallel
    from quantkit.recipe import load_recipe

    console.set_quiet(True)
    # As quantkit.launch does: for pure data parallelism ModelOpt's default parallel state is the right one.
    warnings.filterwarnings("ignore", message="Distributed training is initialized but no parallel_state")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(cfg["port"]))
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        bench_gpu.skip_modelopt_jit()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg["threads"])  # the same in every run: CPU matmuls may round by thread count
    s = bench_gpu.sizes(cfg["smoke"])
    t0 = time.perf_counter()
    loaded = bench_gpu.build_decoder(s["decoder"], str(device))
    bench_gpu.sync()
    build_s = time.perf_counter() - t0
    recipe = load_recipe(cfg["recipe"])
    calib_part, _ = ptq.split_calibration(bench_gpu.calibration_set("decoder", s), recipe)
    # One untimed batch first: cuBLAS/SDPA set-up would otherwise land in the first timed pass.
    args, kwargs = next(iter(calib_part.batches(s["batch_size"], device=device)))
    with torch.no_grad():
        loaded.model(*args, **kwargs)
    bench_gpu.sync()
    result: dict[str, Any] = {"rank": rank, "device": str(device), "build_s": round(build_s, 2),
                              "params": bench_gpu.params(loaded.model), "calib_samples": len(calib_part)}
    passes: list[float] = []
    dp = None
    if world > 1:
        dp = DataParallel(rank=rank, world_size=world, local_rank=rank)
        dp.init(device)
        plain_loop = dp.forward_loop

        def timed_loop(*args, **kwargs):
            loop = plain_loop(*args, **kwargs)

            def run(model):
                import torch.distributed as dist

                dist.barrier()  # every rank starts together: the wall time is the slowest rank's
                bench_gpu.sync()
                t = time.perf_counter()
                loop(model)
                bench_gpu.sync()
                passes.append(time.perf_counter() - t)

            return run

        dp.forward_loop = timed_loop
    timer = bench_gpu.CalibrationTimer()
    t0 = time.perf_counter()
    with timer.installed() if dp is None else contextlib.nullcontext():
        ptq.quantize_model(loaded, recipe, calib_part, dtype=cfg["dtype"], device=device,
                           batch_size=s["batch_size"], data_parallel=dp)
    bench_gpu.sync()
    result["quantize_model_s"] = round(time.perf_counter() - t0, 3)
    if dp is None:
        passes = [p["seconds"] for p in timer.passes]
    result["calibration_passes_s"] = [round(p, 3) for p in passes]
    if dp is not None:
        result["data_parallel"] = dp.describe(calib_part, s["batch_size"])
        dp.close()
    if torch.cuda.is_available() and device.type == "cuda":
        result["peak_gpu_gib"] = bench_gpu.gib(torch.cuda.max_memory_allocated(device))
    out = Path(cfg["dir"])
    if rank == 0:
        amax = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items() if k.endswith("_amax")}
        torch.save(amax, out / f"amax-{world}.pt")
    (out / f"result-{world}-{rank}.json").write_text(json.dumps(result, default=str))


def run(world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Calibrate on `world` processes; the run's summary (wall time = slowest rank's calibration pass)."""
    import torch.multiprocessing as mp

    cfg = dict(cfg, port=_free_port())
    mp.spawn(_worker, args=(world, cfg), nprocs=world, join=True)
    ranks = [json.loads((Path(cfg["dir"]) / f"result-{world}-{r}.json").read_text()) for r in range(world)]
    wall = max(sum(r["calibration_passes_s"]) for r in ranks)
    samples = ranks[0]["calib_samples"]
    row: dict[str, Any] = {"processes": world, "samples": samples, "calibration_wall_s": round(wall, 3),
                           "samples_per_s": round(samples / wall, 1) if wall else None, "ranks": ranks}
    dp = ranks[0].get("data_parallel")
    if dp:
        last = dp["passes"][-1]
        row["per_rank_forward_s"] = [r["forward_s"] for r in last["ranks"]]
        row["per_rank_samples"] = [r["samples"] for r in last["ranks"]]
        row["reduce_s"] = last["reduce_s"]
        row["backend"] = dp["backend"]
    return row


def compare_amax(folder: Path, world: int) -> dict[str, Any]:
    one = torch.load(folder / "amax-1.pt")
    many = torch.load(folder / f"amax-{world}.pt")
    differ = sorted(k for k in one if k not in many or not torch.equal(one[k], many[k]))
    return {"tensors": len(one), "values": sum(t.numel() for t in one.values()), "differ": len(differ),
            "differing": differ[:10], "same_names": sorted(one) == sorted(many), "bitwise_equal": not differ
            and sorted(one) == sorted(many)}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown(report: dict[str, Any]) -> str:
    env, unit = report["environment"], "GPU" if report["device"] == "cuda" else "CPU rank"
    lines = [f"Calibration of {report['samples']} samples, {report['model']} ({_count(report['params'])} params, "
             f"{report['dtype']}, recipe {report['recipe']}, batch {report['batch_size']}) on {env.get('device')}:",
             "",
             f"| {unit}s | calibration wall s | samples/s | speed-up | per-rank forward s | reduce s | amax vs 1 |",
             "| ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    base = report["runs"][0]["calibration_wall_s"]
    for r in report["runs"]:
        speed = f"{base / r['calibration_wall_s']:.2f}x" if r["calibration_wall_s"] else "-"
        fwd = ", ".join(f"{x:.2f}" for x in r.get("per_rank_forward_s", [])) or f"{r['calibration_wall_s']:.2f}"
        same = "reference" if r["processes"] == 1 else (
            f"bit-equal ({report['amax']['tensors']} tensors)" if report["amax"]["bitwise_equal"]
            else f"DIFFER in {report['amax']['differ']} of {report['amax']['tensors']}")
        lines.append(f"| {r['processes']} | {r['calibration_wall_s']:.2f} | {r['samples_per_s']} | {speed} | {fwd} | "
                     f"{r.get('reduce_s', '-')} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=None, help="N for the data-parallel run (default: every visible GPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (NCCL, the benchmark) or cpu (gloo; only with --smoke, to check the logic)")
    p.add_argument("--smoke", action="store_true", help="bench_gpu's tiny decoder and 64 samples")
    p.add_argument("--recipe", default="fp8", help="recipe to calibrate (default fp8; max calibration)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype (default bf16, as bench_gpu)")
    p.add_argument("--json", default=None, help="JSON output (default benchmarks/calibration_scaling_<date>.json; "
                                                "with --smoke runs/calibration_scaling_smoke_<date>.json)")
    args = p.parse_args(argv)

    if args.device == "cuda":
        count = torch.cuda.device_count()
        world = args.gpus or count
        if count < 2 or world < 2 or world > count:
            print(f"bench_calibration_scaling: compares 1 GPU with N >= 2 GPUs, but {count} CUDA GPU(s) are visible"
                  + (f" and --gpus {args.gpus} was asked" if args.gpus else "")
                  + "; run it on a machine with 2 or more GPUs (or check the logic with --smoke --device cpu)",
                  file=sys.stderr)
            return 2
    else:
        if not args.smoke:
            print("bench_calibration_scaling: --device cpu only checks the logic: add --smoke (the 2B decoder "
                  "on CPU ranks would take hours and mean nothing)", file=sys.stderr)
            return 2
        world = args.gpus or 2
        if world < 2:
            print(f"bench_calibration_scaling: --gpus {world}: the data-parallel run needs >= 2 ranks", file=sys.stderr)
            return 2
    s = bench_gpu.sizes(args.smoke)
    threads = max(1, (os.cpu_count() or 1) // world)
    date = datetime.date.today().isoformat()
    # A smoke run checks the logic and measures nothing: its JSON goes to runs/ (not kept), not benchmarks/.
    json_path = Path(args.json) if args.json else (
        ROOT / "runs" / f"calibration_scaling_smoke_{date}.json" if args.smoke
        else ROOT / "benchmarks" / f"calibration_scaling_{date}.json")
    env_args = argparse.Namespace(smoke=args.smoke, modelopt_ext="skip")
    report: dict[str, Any] = {"schema": "quantkit.bench_calibration_scaling/1",
                              "environment": bench_gpu.environment(env_args), "device": args.device,
                              "model": "bench_gpu decoder" + (" (smoke sizes)" if args.smoke else ""),
                              "decoder": s["decoder"], "recipe": args.recipe, "dtype": args.dtype,
                              "batch_size": s["batch_size"], "calib_seq": s["calib_seq"], "runs": []}
    with tempfile.TemporaryDirectory(prefix="calib-scaling-") as tmp:
        cfg = {"device": args.device, "smoke": args.smoke, "recipe": args.recipe, "dtype": args.dtype,
               "threads": threads, "dir": tmp}
        for n in (1, world):
            print(f"[bench] calibrating on {n} {'GPU' if args.device == 'cuda' else 'CPU process'}(s)", flush=True)
            report["runs"].append(run(n, cfg))
        report["amax"] = compare_amax(Path(tmp), world)
    report["samples"] = report["runs"][0]["samples"]
    report["params"] = report["runs"][0]["ranks"][0]["params"]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(report))
    print(f"[bench] wrote {json_path}")
    return 0 if report["amax"]["bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
