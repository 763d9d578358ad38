#!/usr/bin/env python3
"""ModelOpt 0.47's NVFP4 weight algorithms, one recipe rule each, on the MLP linears of a model.

    python scripts/bench_nvfp4_algorithms.py --model minilm --device cpu --json benchmarks/nvfp4_algorithms_cpu.json
    python scripts/bench_nvfp4_algorithms.py --write-minilm-bf16 build/minilm-bf16     # here, once
    python scripts/bench_nvfp4_algorithms.py --model minilm,bench-decoder --device cuda --dtype bf16 \
        --minilm-folder build/minilm-bf16 --precompile --deadline-s 300 --json $OUT/nvfp4_algorithms_gpu.json

A machine without MiniLM's weights (a GPU machine with only the tokenizer) gets them as a folder:
`--write-minilm-bf16 DIR` writes MiniLM's config, tokenizer and its weights rounded to BF16 (45 MB,
small enough to carry), and `--minilm-folder DIR` loads that folder as the `minilm` row's model.
`--precompile` builds ModelOpt's FP8 CUDA extension (the static path's block-scale rounding, a ~60 s
JIT build) before the first row, timed apart; `--deadline-s` starts no row after that many seconds
from the start, so a time-limited run still writes its JSON (rewritten after every row).

Every row quantizes a fresh copy of the model with one recipe: the MLP / FFN linears in NVFP4 (W4A4)
with the rule's `algorithm:` (none = ModelOpt's default max calibration, NVFP4_DEFAULT_CFG's
arithmetic), everything else left in the model's dtype; same calibration and held-out samples for
every row. Metrics against the FP32 model on the held-out samples: the minimum over samples of the
cosine of the mean-pooled output (MiniLM: the sentence embedding) and quantkit's held-out cosine
(worst output tensor). `bench-decoder` is scripts/bench_gpu.py's 2.1B Llama-shaped decoder (random
weights); it needs a GPU. On a GPU without FP4 tensor cores NVFP4 is simulated (fake quant).
"""

from __future__ import annotations

import argparse
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

MLP_MATCH = ["*mlp*", "*.intermediate.dense", "*.output.dense"]
T0 = time.perf_counter()
ALGORITHMS = ("none", "four_over_six", "mse_fp8_sweep", "local_hessian", "awq_lite", "awq_clip", "awq_full", "gptq")


def mlp_recipe(algorithm: str, heldout_fraction: float):
    from quantkit.recipe import recipe_from_dict

    rule = {"match": MLP_MATCH, "types": ["Linear"], "precision": "nvfp4", "note": "MLP linears"}
    if algorithm != "none":
        rule["algorithm"] = algorithm
    # BERT's attention.output.dense matches *.output.dense: keep the attention block out.
    keep = {"match": ["*attention*", "*attn*"], "types": ["Linear"], "precision": "skip"}
    return recipe_from_dict({"name": f"mlp-nvfp4-{algorithm}", "default": "skip", "rules": [rule, keep],
                             "attention": {"precision": "skip"},
                             "calibration": {"heldout_fraction": heldout_fraction, "batch_size": 8}})


def write_minilm_bf16(out: Path) -> Path:
    """MiniLM's folder with its weights rounded to BF16: config, tokenizer, model.safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantkit.models import _minilm_folder

    src = _minilm_folder()
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_minilm(folder: str | None):
    """The built-in MiniLM, or the same model from a folder (`--minilm-folder`)."""
    from quantkit.models import hf_folder, load_model

    if not folder:
        return load_model("minilm")
    loaded = hf_folder(folder, spec="minilm")
    loaded.family, loaded.default_calibration = "bert", "text-en"
    return loaded


def model_and_data(name: str, device: str, heldout: int, calib: int, smoke: bool = False,
                   minilm_folder: str | None = None):
    """(make_loaded, calibration set, held-out fraction) for a model name."""
    from quantkit.models import load_model
    from quantkit import calib as calib_mod

    if name == "minilm":
        loaded = load_minilm(minilm_folder)
        cs = calib_mod.builtin_set(loaded, loaded.default_calibration)
        if calib:
            cs = cs.subset(range(min(len(cs), calib + heldout)))
        return (lambda: load_minilm(minilm_folder)), cs, heldout / len(cs)

    if name == "bench-decoder":
        import bench_gpu

        s = bench_gpu.sizes(smoke=smoke)
        s["calib_samples"] = calib
        cs = bench_gpu.calibration_set("decoder", {**s, "calib_samples": calib + heldout, "calib_seq": 256})
        cs = cs.subset(range(calib + heldout))
        return (lambda: bench_gpu.build_decoder(s["decoder"], device)), cs, heldout / (calib + heldout)
    loaded = load_model(name)
    cs = calib_mod.builtin_set(loaded, loaded.default_calibration)
    if calib:
        cs = cs.subset(range(min(len(cs), calib + heldout)))
    return (lambda: load_model(name)), cs, heldout / len(cs)


def pooled_min_cosine(reference, candidate, heldout, batch_size) -> float:
    """Min over samples of cos(mean-pooled reference output, mean-pooled candidate output)."""
    worst = 1.0
    batches = list(heldout.batches(batch_size))
    for (args, kwargs), ref, cand in zip(batches, reference, candidate):
        mask = kwargs.get("attention_mask")
        for name in ref:
            r, c = ref[name].double(), cand[name].double()
            if r.dim() < 3:
                r, c = r.reshape(r.shape[0], 1, -1), c.reshape(c.shape[0], 1, -1)
            if mask is not None and mask.shape[:2] == r.shape[:2]:
                m = mask.to(r.dtype).unsqueeze(-1)
                r, c = (r * m).sum(1) / m.sum(1), (c * m).sum(1) / m.sum(1)
            else:
                r, c = r.mean(1), c.mean(1)
            worst = min(worst, float(torch.nn.functional.cosine_similarity(r, c, dim=-1).min()))
    return worst


def run_model(name: str, args) -> list[dict]:
    from quantkit import console, ptq

    device = torch.device(args.device)
    calib_n, heldout_n = ((args.decoder_calib, args.decoder_heldout) if name == "bench-decoder"
                          else (args.calib, args.heldout))
    make_loaded, cs, fraction = model_and_data(name, args.device, heldout_n, calib_n, args.smoke, args.minilm_folder)
    recipe0 = mlp_recipe("none", fraction)
    calib_part, heldout = ptq.split_calibration(cs, recipe0)
    bs = recipe0.calibration.batch_size
    loaded = make_loaded()
    ptq.move_model(loaded.model, device, torch.float32)
    reference = ptq.run_outputs(loaded, loaded.model, heldout, bs, device, "fp32", "reference")
    del loaded
    rows = []
    t_start = time.perf_counter()
    for algorithm in args.algorithms:
        if time.perf_counter() - t_start > args.budget_s or time.perf_counter() - T0 > args.deadline_s:
            rows.append({"model": name, "algorithm": algorithm, "skipped": "budget"})
            continue
        recipe = mlp_recipe(algorithm, fraction)
        loaded = make_loaded()
        row = {"model": name, "algorithm": algorithm, "device": str(device), "dtype": args.dtype,
               "calibration_samples": len(calib_part), "heldout_samples": len(heldout)}
        try:
            ptq.move_model(loaded.model, device, torch.float32)
            t0 = time.perf_counter()
            plan = ptq.quantize_model(loaded, recipe, calib_part, dtype=args.dtype, device=device, batch_size=bs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["quantize_s"] = round(time.perf_counter() - t0, 2)
            outputs = ptq.run_outputs(loaded, loaded.model, heldout, bs, device, args.dtype, "evaluate")
            metrics = ptq.compare_runs(reference, outputs)
            row["nvfp4_layers"] = sum(1 for r in plan.layers if r.weights is not None and str(r.weights) == "nvfp4")
            row["heldout_cosine"] = min(m.cosine for m in metrics.values())
            row["pooled_min_cosine"] = pooled_min_cosine(reference, outputs, heldout, bs)
        except Exception as e:  # a row that fails says why; the others still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        row["wall_s"] = round(time.perf_counter() - T0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.on_row:
            args.on_row(rows)
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | algorithm | min pooled cosine | held-out cosine | quantize s |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "pooled_min_cosine" in r:
            lines.append(f"| {r['model']} | {r['algorithm']} | {r['pooled_min_cosine']:.4f} | {r['heldout_cosine']:.4f} "
                         f"| {r['quantize_s']} |")
        else:
            lines.append(f"| {r['model']} | {r['algorithm']} | {r.get('error') or r.get('skipped')} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", help="comma-separated: minilm, llama-tiny, bench-decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--heldout", type=int, default=128, help="held-out samples")
    p.add_argument("--calib", type=int, default=0, help="calibration samples (0: the rest of the built-in set)")
    p.add_argument("--budget-s", type=float, default=1e9, help="per model: start no algorithm after this")
    p.add_argument("--deadline-s", type=float, default=1e9, help="in all: start no row this many seconds after the start")
    p.add_argument("--decoder-calib", type=int, default=64, help="bench-decoder: calibration samples")
    p.add_argument("--decoder-heldout", type=int, default=16, help="bench-decoder: held-out samples")
    p.add_argument("--minilm-folder", default=None, help="load MiniLM from this folder (see --write-minilm-bf16)")
    p.add_argument("--write-minilm-bf16", default=None, metavar="DIR", help="write MiniLM with BF16 weights to DIR, exit")
    p.add_argument("--precompile", action="store_true", help="build ModelOpt's FP8 CUDA extension first (timed)")
    p.add_argument("--smoke", action="store_true", help="bench-decoder at bench_gpu's smoke size (checks the code on CPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.write_minilm_bf16:
        print(f"wrote {write_minilm_bf16(Path(args.write_minilm_bf16))}")
        return 0
    args.algorithms = args.algorithms.split(",")
    from quantkit import console

    console.set_quiet(True)
    meta = {"argv": sys.argv, "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.precompile:
        from modelopt.torch.quantization.extensions import get_cuda_ext_fp8

        t0 = time.perf_counter()
        ok = get_cuda_ext_fp8(raise_if_failed=False) is not None
        meta["cuda_ext_fp8"] = {"built": ok, "s": round(time.perf_counter() - t0, 1)}
        print(json.dumps({"precompile": meta["cuda_ext_fp8"]}), flush=True)
    done: list[dict] = []

    def save(model_rows):
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**meta, "rows": done + model_rows,
                                                   "wall_s": round(time.perf_counter() - T0, 1)}, indent=1))

    args.on_row = save
    for name in args.model.split(","):
        done += run_model(name, args)
        save([])
    rows = done
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
