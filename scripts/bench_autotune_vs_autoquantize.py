#!/usr/bin/env python3
"""quantkit autotune against ModelOpt's mtq.auto_quantize at the same effective bits, side by side.

    python scripts/bench_autotune_vs_autoquantize.py --model minilm,llama-tiny --device cuda --dtype bf16
    python scripts/bench_autotune_vs_autoquantize.py --model minilm,llama-tiny --device cuda \
        --minilm-folder build/minilm-bf16 --json $OUT/autotune_vs_autoquantize_gpu.json

(`--minilm-folder`: MiniLM from a folder written by `bench_nvfp4_algorithms.py --write-minilm-bf16`,
for a machine that has no MiniLM weights.)

Per model, one calibration set and one held-out split (the recipe's): `autotune` starts from
`balanced` and stops at --target; its quantized linears' effective bits (weight bits per parameter,
NVFP4 = 4.5, FP8 = 8, 16-bit = 16) become `auto_quantize`'s `effective_bits` constraint, searching
NVFP4_DEFAULT_CFG / FP8_DEFAULT_CFG / no quantization over the same linears (gradient scores, loss =
MSE to the FP32 outputs of each calibration batch). Both are then measured the same way: held-out
cosine against FP32 (quantkit's metric, worst output), weight bytes of those linears, wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def layer_bytes(params: int, precision: str, dtype: str) -> float:
    from quantkit.plan import DTYPE_BYTES
    from quantkit.recipe import FORMATS, Precision

    p = Precision(precision)
    return params * (DTYPE_BYTES[dtype] if p == Precision.SKIP else FORMATS[p].bytes_per_weight)


def run_model(name: str, args) -> dict:
    import modelopt.torch.quantization as mtq

    from quantkit import autotune, ptq
    from quantkit.models import load_model as load_builtin
    from quantkit.recipe import load_recipe

    from bench_nvfp4_algorithms import load_minilm

    def load_model(spec):  # MiniLM from --minilm-folder when given
        return load_minilm(args.minilm_folder) if spec == "minilm" else load_builtin(spec)

    device = torch.device(args.device)
    recipe = load_recipe("balanced")
    loaded = load_model(name)
    calibration = ptq.open_calibration(loaded, None, False, args.max_samples)
    calib_part, heldout = ptq.split_calibration(calibration, recipe)
    bs = recipe.calibration.batch_size
    made = [loaded]

    t0 = time.perf_counter()
    tuned = autotune.autotune(lambda: made.pop() if made else load_model(name), recipe, calibration,
                              target_cosine=args.target, dtype=args.dtype, device=device)
    autotune_s = time.perf_counter() - t0
    units = {u.name: u for u in tuned.units if u.name != autotune.ATTENTION_UNIT}
    # ModelOpt's "weight" cost model counts every Linear, the ones it does not search at 16 bits:
    # autotune's result in that same accounting is the constraint auto_quantize gets.
    linear_params = {n: m.weight.numel() for n, m in load_model(name).model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    bits = sum(8 * layer_bytes(linear_params[n], str(u.precision), "bf16") for n, u in units.items())
    bits += sum(16 * p for n, p in linear_params.items() if n not in units)
    eff_bits = bits / sum(linear_params.values())
    row = {"model": name, "device": str(device), "dtype": args.dtype, "target": args.target,
           "calibration_samples": len(calib_part), "heldout_samples": len(heldout),
           "autotune": {"cosine": tuned.reached_cosine, "reached": tuned.reached,
                        "linear_bytes": tuned.linear_bytes, "effective_bits": eff_bits, "wall_s": autotune_s,
                        "changes": {k: str(v) for k, v in tuned.changes().items()},
                        "start_cosine": tuned.start_cosine, "start_linear_bytes": tuned.start_bytes}}
    print(json.dumps(row), flush=True)

    # auto_quantize on a fresh FP32-calibrated copy, over the same linears.
    fresh = load_model(name)
    fresh.model.to(device=device, dtype=torch.float32)
    reference = ptq.run_outputs(fresh, fresh.model, heldout, bs, device, "fp32", "reference")
    batches = []
    with torch.no_grad():
        for a, kw in calib_part.batches(bs, device=device, dtype=torch.float32):
            out = fresh.named_outputs(fresh.model(*a, **kw))
            batches.append({"args": a, "kwargs": kw, "ref": {k: v.detach().to(ptq._torch_dtype(args.dtype))
                                                             for k, v in out.items()}})
    ptq.move_model(fresh.model, device, ptq._torch_dtype(args.dtype))
    if device.type == "cpu":
        from quantkit import nvfp4_cpu

        nvfp4_cpu.install()  # auto_quantize calibrates NVFP4 candidates: ModelOpt's kernel needs CUDA
    linear_names = [n for n, m in fresh.model.named_modules() if isinstance(m, torch.nn.Linear)]
    disabled = [n for n in linear_names if n not in units]

    def forward_step(model, batch):
        return fresh.named_outputs(model(*batch["args"], **batch["kwargs"]))

    def loss_func(output, batch):
        return sum(torch.nn.functional.mse_loss(output[k].float(), batch["ref"][k].float()) for k in output)

    t0 = time.perf_counter()
    model, state = mtq.auto_quantize(
        fresh.model, constraints={"effective_bits": eff_bits},
        quantization_formats=[copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), copy.deepcopy(mtq.FP8_DEFAULT_CFG)],
        data_loader=batches, forward_step=forward_step, loss_func=loss_func,
        disabled_layers=disabled or None, num_calib_steps=len(batches), num_score_steps=len(batches))
    aq_s = time.perf_counter() - t0
    outputs = ptq.run_outputs(fresh, model, heldout, bs, device, args.dtype, "evaluate")
    cos = min(m.cosine for m in ptq.compare_runs(reference, outputs).values())
    modules = dict(model.named_modules())
    chosen, total = {}, 0.0
    for n, u in units.items():
        q = getattr(modules[n], "weight_quantizer", None)
        bits = getattr(q, "num_bits", None) if q is not None and q.is_enabled else None
        p = "nvfp4" if bits == (2, 1) else "fp8" if bits == (4, 3) else "skip"
        chosen[p] = chosen.get(p, 0) + 1
        total += layer_bytes(u.params, p, args.dtype)
    row["auto_quantize"] = {"cosine": cos, "linear_bytes": round(total), "wall_s": aq_s,
                            "effective_bits_constraint": eff_bits, "layers_by_format": chosen}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm,llama-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--minilm-folder", default=None, help="load MiniLM from this folder (bench_nvfp4_algorithms.py "
                                                          "--write-minilm-bf16)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from quantkit import console

    console.set_quiet(True)
    rows = []
    for name in args.model.split(","):
        try:
            rows.append(run_model(name, args))
        except Exception as e:  # one model failing does not lose the other's row
            import traceback

            traceback.print_exc()
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"argv": sys.argv, "rows": rows, "date": time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}, indent=1))
    print("| model | method | held-out cosine | quantized-linear bytes | effective bits | wall s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][:200]} | | | | |")
            continue
        a, q = r["autotune"], r.get("auto_quantize", {})
        print(f"| {r['model']} | quantkit autotune | {a['cosine']:.6f} | {a['linear_bytes']} | {a['effective_bits']:.3f} "
              f"| {a['wall_s']:.1f} |")
        if q:
            print(f"| {r['model']} | mtq.auto_quantize | {q['cosine']:.6f} | {q['linear_bytes']} | "
                  f"{q['effective_bits_constraint']:.3f} (constraint) | {q['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
