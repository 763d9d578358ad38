#!/usr/bin/env python3
"""GPU benchmark: how fast quantkit quantizes, and what FP8 gains when it really runs in FP8.

    python scripts/bench_gpu.py                      # full run (H100: about 8 minutes), JSON + tables
    python scripts/bench_gpu.py --smoke              # tiny models, same code paths, a minute or two
    python scripts/bench_gpu.py --json PATH --budget-s 540 --skip decoder-onnx
    python scripts/bench_gpu.py --only runtime --budget-s 240   # FP8 runtime vs BF16 (and torchao) alone

Models, random weights in BF16 (nothing is downloaded):
  decoder  Llama architecture at Gemma-2B dimensions: 18 layers, d 2048, FFN 16384, 8 heads x 256, one KV
           head, vocab 32000, untied head: 2.1B parameters. Weights N(0, 0.02) as transformers initializes
           them, except embeddings N(0, 1) (the scale Gemma's sqrt(d) embedding normalizer gives) and the
           residual output projections (o_proj, down_proj) scaled by 1/sqrt(2 x layers) (GPT-2/Megatron):
           with plain N(0, 0.02) everywhere an 18-layer random decoder amplifies any perturbation (FP8 or
           not) and its outputs say nothing about quantization.
  vision   SigLIP-so400m/14 vision tower at 224 px: 27 layers, d 1152, FFN 4304, 256 patches (400M).
Per model and recipe (fp8, balanced, int8-smoothquant): calibration throughput on 512 samples, PTQ
time (FP32 reference, calibrate+quantize, evaluation on the held-out split), ONNX export time and size,
weight bytes before/after, peak GPU memory per stage. For the decoder: the FP8 linears run for real
(quantkit.runtime.torch_fp8: torch._scaled_mm) against BF16, both eager and both torch.compile'd the
same way, at 1x2048 and 8x2048 tokens (median of CUDA-event timings after warm-up, interleaved), with
the cosine of the outputs; plus the FP8/BF16 GEMM ratio at the model's own shapes and a kernel-time
breakdown, which say what keeps the model from the GEMM-only speed-up. Where torchao imports (and
without --no-torchao), torchao's float8 inference runs in the same eager and compiled loops (not the
CUDA-graph one), compiled the same way: quantize_ with Float8DynamicActivationFloat8WeightConfig at
PerRow and at PerTensor granularity (dynamic activation scales, every linear but lm_head, as quantkit
converts them), each row with its speed against BF16, against quantkit's unfused FP8
(vs_quantkit_fp8 > 1: torchao faster), its cosine and finiteness. Without torchao the stage records
"torchao": "not installed"; a torchao variant whose quantize_, compile or run fails is recorded with
its error under torchao_variants and left out, the rest run on.

Stages run in priority order within --budget-s; a stage that would not fit is recorded as skipped.
ModelOpt's CUDA extensions are not JIT-built by default (--modelopt-ext skip: about 60 s each on a
fresh machine); FP8 and INT8 fake quant then use ModelOpt's PyTorch paths, NVFP4 its Triton kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RECIPES = ("fp8", "balanced", "int8-smoothquant")
STAGES = ("calibration", "sensitivity", "runtime", "gemm", "decoder-ptq", "vision-ptq", "vision-onnx", "decoder-onnx")
CALIB_SAMPLES = 512


# ---------------------------------------------------------------------------------------------
# sizes


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(
            decoder=dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=128),
            vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                        image_size=56, patch_size=14),
            calib_seq=32, calib_samples=64, batch_size=8, shapes=[(1, 256), (2, 256)], iters=10, rounds=2,
            gemm_tokens=[256], calib_batches=[8, 16], sensitivity_samples=32)
    return dict(
        decoder=dict(vocab_size=32000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=256),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=224, patch_size=14),
        calib_seq=256, calib_samples=CALIB_SAMPLES, batch_size=8, shapes=[(1, 2048), (8, 2048)], iters=10, rounds=3,
        gemm_tokens=[2048, 16384], calib_batches=[8, 64], sensitivity_samples=64)


# ---------------------------------------------------------------------------------------------
# models and calibration sets


def build_decoder(cfg: dict[str, Any], device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.models import LoadedModel

    config = LlamaConfig(**cfg, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         initializer_range=0.02, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    model.to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(1))
    # attention_mask as the tokenizer gives it: without one, transformers derives packed-sequence
    # boundaries from the positions with aten::diff, which has no ONNX export.
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return LoadedModel(spec="bench:decoder", model=model, input_names=["input_ids", "attention_mask"],
                       output_names=["logits"], example_inputs=example, family="llama")


def build_vision(cfg: dict[str, Any], device: str):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from quantkit.models import LoadedModel

    config = SiglipVisionConfig(**cfg, vision_use_head=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = SiglipVisionModel(config)
    model.to(torch.bfloat16).eval()
    size = cfg["image_size"]
    example = {"pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}
    return LoadedModel(spec="bench:vision", model=model, input_names=["pixel_values"],
                       output_names=["last_hidden_state"], example_inputs=example, family="siglip")


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def calibration_set(kind: str, s: dict[str, Any]):
    """Random inputs: CALIB_SAMPLES for calibration plus the 10% held-out split the recipes keep."""
    from quantkit.calib import CalibrationSet

    n = round(s["calib_samples"] / 0.9)
    g = torch.Generator().manual_seed(0)
    if kind == "decoder":
        vocab = s["decoder"]["vocab_size"]
        samples = [{"input_ids": torch.randint(0, vocab, (1, s["calib_seq"]), generator=g),
                    "attention_mask": torch.ones(1, s["calib_seq"], dtype=torch.long)} for _ in range(n)]
        what = f"random token ids, {s['calib_seq']} tokens"
    else:
        size = s["vision"]["image_size"]
        samples = [{"pixel_values": torch.randn(1, 3, size, size, generator=g)} for _ in range(n)]
        what = f"N(0,1) images {size}x{size}"
    # batching "examples": each sample is one example, concatenated into batches of batch_size
    # (the in-memory default, "calls", would replay them one by one: 8x the forwards).
    meta = {"source": {"kind": "synthetic", "description": f"bench_gpu: {what}"}, "synthetic": True,
            "batching": "examples"}
    return CalibrationSet.from_samples(samples, meta)


# ---------------------------------------------------------------------------------------------
# measurement helpers


class Budget:
    def __init__(self, seconds: float):
        self.start = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(n: int | float) -> float:
    return round(n / 2**30, 3)


@contextlib.contextmanager
def stage_memory(record: dict[str, Any], key: str):
    """Peak GPU memory allocated by torch while the block runs, in GiB, into record[key]."""
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            sync()
            record[key] = gib(torch.cuda.max_memory_allocated())


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in the main thread after `seconds` (SIGALRM; where there is none, no limit)."""
    import signal

    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise StageTimeout(f"stopped after {seconds:.0f} s (time limit)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class CalibrationTimer:
    """Times every forward loop mtq.quantize runs (SmoothQuant runs more than one)."""

    def __init__(self):
        self.passes: list[dict[str, float]] = []

    @contextlib.contextmanager
    def installed(self):
        from quantkit.calib import CalibrationSet

        original = CalibrationSet.forward_loop
        timer = self

        def forward_loop(cs, *args, **kwargs):
            loop = original(cs, *args, **kwargs)

            def timed(model):
                sync()
                t0 = time.perf_counter()
                loop(model)
                sync()
                timer.passes.append({"samples": len(cs), "seconds": round(time.perf_counter() - t0, 3)})

            return timed

        CalibrationSet.forward_loop = forward_loop
        try:
            yield self
        finally:
            CalibrationSet.forward_loop = original


def cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """Cosine of two same-shaped tensors in float64, in chunks (logits of 8x2048x32000 are 0.5G values)."""
    a, b = a.reshape(-1), b.reshape(-1)
    dot = na = nb = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")


def time_interleaved(fns: dict[str, Callable[[], Any]], iters: int, rounds: int, warmup: int = 3) -> dict[str, Any]:
    """Median (and p10/p90) ms per call of each fn, measured with CUDA events, rounds interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(iters):
                if torch.cuda.is_available():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts = sorted(ts)
        out[name] = {"median_ms": round(statistics.median(ts), 3), "p10_ms": round(ts[len(ts) // 10], 3),
                     "p90_ms": round(ts[(len(ts) * 9) // 10 - 1], 3), "runs": len(ts)}
    return out


def skip_modelopt_jit() -> None:
    """Make ModelOpt use its PyTorch FP8/INT8 fake quant instead of JIT-building CUDA extensions."""
    from modelopt.torch.quantization import extensions

    extensions.get_cuda_ext.extension = None
    extensions.get_cuda_ext_fp8.extension = None


# ---------------------------------------------------------------------------------------------
# PTQ per recipe (+ ONNX export)


def ptq_stage(kind: str, build: Callable[[], Any], calibration, recipe_name: str, s: dict[str, Any], device: str,
              export_dir: Path | None, export_limit: Callable[[], float] = lambda: 0.0) -> dict[str, Any]:
    from quantkit import ptq
    from quantkit.recipe import load_recipe

    row: dict[str, Any] = {"model": kind, "recipe": recipe_name}
    t0 = time.perf_counter()
    loaded = build()
    sync()
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["params"] = params(loaded.model)
    recipe = load_recipe(recipe_name)
    timer = CalibrationTimer()
    with stage_memory(row, "peak_gpu_gib_ptq"), timer.installed():
        t0 = time.perf_counter()
        result = ptq.quantize(loaded, recipe, calibration, dtype="bf16", device=device, batch_size=s["batch_size"],
                              per_layer=False)
        sync()
        row["ptq_total_s"] = round(time.perf_counter() - t0, 2)
    rep = result.report
    row["timings"] = {k: round(v, 2) for k, v in rep["timings"].items()}
    row["calibrate_quantize_s"] = row["timings"].get("quantize_s")
    row["calibration_passes"] = timer.passes
    if timer.passes:
        first = timer.passes[0]
        row["calib_samples"] = first["samples"]
        row["calib_samples_per_s"] = round(first["samples"] / first["seconds"], 1) if first["seconds"] else None
    cov = rep["coverage"]
    row["weight_bytes_before"] = cov["weight_bytes_before"]
    row["weight_bytes_after"] = cov["weight_bytes_after"]
    row["by_precision"] = {k: {"layers": v["layers"], "params": v["params"]} for k, v in cov["by_precision"].items()}
    out_name = loaded.output_names[0]
    m = rep["metrics"]["fake-quant"][out_name]
    row["fake_quant_vs_fp32"] = {k: m.get(k) for k in ("cosine", "snr_db", "rel_l2", "finite")}
    row["passed"] = rep["passed"]
    row["quantizers"] = rep["quantizers"]
    row["warnings"] = len(rep["warnings"])
    del result
    if export_dir is not None:
        limit = export_limit()
        row["onnx"] = (export_stage(loaded, recipe, export_dir / f"{kind}-{recipe_name}", limit) if limit >= 20
                       else {"skipped": "budget"})
    del loaded
    cleanup()
    return row


def export_stage(loaded, recipe, out_dir: Path, limit_s: float) -> dict[str, Any]:
    import shutil

    from quantkit.export.onnx_export import default_dynamic_axes, default_opset, export_model
    from quantkit.plan import make_plan

    info: dict[str, Any] = {"time_limit_s": round(limit_s)}
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(loaded.model.parameters()).device
    example = {k: v.to(device) for k, v in loaded.example_inputs.items()}
    plan = make_plan(loaded.model, recipe, model_dtype="bf16")
    opset = default_opset(plan.to_dict()["layers"], str(recipe.attention.precision))
    axes = default_dynamic_axes(loaded.input_names, loaded.output_names, example,
                                sequence_model="input_ids" in loaded.input_names)
    path = out_dir / "model.onnx"
    try:
        t0 = time.perf_counter()
        with stage_memory(info, "peak_gpu_gib"), time_limit(limit_s):
            _, surgery, external = export_model(
                loaded.model, example, path, input_names=loaded.input_names, output_names=loaded.output_names,
                read_outputs=loaded.named_outputs, model_dtype="bf16", io_dtype=recipe.export.io_dtype,
                weights_dtype=recipe.export.weights_dtype, opset=opset, dynamic_axes=axes)
            info["export_s"] = round(time.perf_counter() - t0, 2)
        files = [p for p in out_dir.iterdir() if p.is_file()]
        info.update(opset=opset, external_data=external, size_bytes=sum(p.stat().st_size for p in files),
                    files={p.name: p.stat().st_size for p in files})
    except Exception as e:  # recorded, the benchmark goes on
        info["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        info["failed_after_s"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return info


# ---------------------------------------------------------------------------------------------
# FP8 runtime against BF16


def runtime_recipe():
    """The fp8 recipe for this runtime: FP8 linears; attention and its softmax left to the SDPA kernel,
    which runs them in BF16 with FP32 softmax statistics (PyTorch has no FP8 attention kernel)."""
    from quantkit.recipe import AttentionSpec, ProtectSpec, load_recipe

    base = load_recipe("fp8")
    # The output head stays in the model's own BF16 (the recipe's FP16 head would add a cast of the
    # logits that the BF16 baseline does not pay: 1.6 ms at 8x2048).
    rules = [r.model_copy(update={"precision": "bf16"}) if str(r.precision) == "fp16" else r for r in base.rules]
    return base.model_copy(update={"name": "fp8-linears", "attention": AttentionSpec(precision="skip"),
                                   "protect": ProtectSpec(softmax=False), "rules": rules})


def gemm_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    d, ffn, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (d, q), "k_proj/v_proj": (d, kv), "o_proj": (q, d), "gate/up_proj": (d, ffn),
            "down_proj": (ffn, d)}


def gemm_bench(cfg: dict[str, Any], tokens: list[int], iters: int) -> list[dict[str, Any]]:
    """BF16 mm against FP8 torch._scaled_mm (per-tensor scales, fast accumulation) at the model's shapes."""
    rows = []
    one = torch.ones((), device="cuda")
    for m in tokens:
        for name, (k, n) in gemm_shapes(cfg).items():
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            t = time_interleaved({
                "bf16": lambda: torch.mm(a, w.t()),
                "fp8": lambda: torch._scaled_mm(a8, w8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
            }, iters=iters * 2, rounds=2)
            flops = 2 * m * k * n
            rows.append({"m": m, "k": k, "n": n, "layer": name, "bf16_ms": t["bf16"]["median_ms"],
                         "fp8_ms": t["fp8"]["median_ms"], "ratio": round(t["bf16"]["median_ms"] / t["fp8"]["median_ms"], 3),
                         "bf16_tflops": round(flops / t["bf16"]["median_ms"] / 1e9, 1),
                         "fp8_tflops": round(flops / t["fp8"]["median_ms"] / 1e9, 1)})
            del a, w, a8, w8
    return rows


def kernel_breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """GPU kernel time of one call by kind (ms): gemm, attention, fused elementwise (triton), other."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    totals = {"gemm": 0.0, "attention": 0.0, "triton_fused": 0.0, "other": 0.0}
    top: dict[str, list[tuple[float, str, int]]] = {k: [] for k in totals}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        name = ev.key.lower()
        if not us or name.startswith(("cudaevent", "memcpy", "memset")) or "profiler" in name:
            continue
        if "flash" in name or "fmha" in name or "attention" in name:
            kind = "attention"
        elif name.startswith("triton"):
            kind = "triton_fused"
        elif any(t in name for t in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "scaled_mm")):
            kind = "gemm"
        else:
            kind = "other"
        totals[kind] += us / 1e3
        top[kind].append((us / 1e3, ev.key[:90], ev.count))
    out: dict[str, Any] = {k: round(v, 3) for k, v in totals.items()}
    # the largest kernels of each kind: what the time is spent on, by name (ms, calls)
    out["top"] = {k: [[name, round(ms, 3), n] for ms, name, n in sorted(v, reverse=True)[:4]] for k, v in top.items()}
    return out


TORCHAO_GRANULARITIES = ("PerRow", "PerTensor")


class VariantFailed(Exception):
    """A third-party (torchao) variant raised: which one, and what it raised."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(f"{name}: {type(error).__name__}: {error}")
        self.name, self.error = name, error


def guarded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, its exceptions tagged with the variant's name (so the stage can drop just that variant)."""
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise VariantFailed(name, e) from e
    return call


def error_text(error: BaseException, limit: int = 400) -> str:
    return f"{type(error).__name__}: {str(error)[:limit]}"


def torchao_float8(copy_model: Callable[[], Any],
                   granularities=TORCHAO_GRANULARITIES) -> tuple[dict[str, Any], dict[str, Any]]:
    """torchao's float8 inference (dynamic activation and weight scales, torch._scaled_mm) on copies of
    the BF16 decoder, one per granularity: ({"torchao PerRow": model, ...}, what to record).

    Every nn.Linear but lm_head is converted, as quantkit's FP8 runtime converts them. torchao is
    imported here, not at the top: without it the stage records "not installed" and goes on; a
    granularity whose quantize_ raises is recorded with its error and left out."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "torchao":
            return {}, {"torchao": "not installed"}
        # installed but broken: built for another torch, or a module it needs is missing
        return {}, {"torchao": f"import failed: {error_text(e)}"}
    import importlib.util

    kinds = {"PerRow": PerRow, "PerTensor": PerTensor}
    info: dict[str, Any] = {"torchao": getattr(torchao, "__version__", "unknown"),
                            # with mslk installed, torchao's AUTO kernel choice runs PerRow on its CUTLASS GEMM
                            "torchao_mslk": importlib.util.find_spec("mslk") is not None,
                            "torchao_variants": {}}
    models: dict[str, Any] = {}
    for g in granularities:
        name = f"torchao {g}"
        # set_inductor_config=False: left on, torchao switches inductor's coordinate-descent tuning on
        # for the whole process, and the other variants would no longer be compiled the same way.
        row: dict[str, Any] = {"config": f"Float8DynamicActivationFloat8WeightConfig(granularity={g}(), "
                                         f"set_inductor_config=False)", "linears": "all but lm_head"}
        info["torchao_variants"][name] = row
        model = None
        try:
            model = copy_model()
            t0 = time.perf_counter()
            config = Float8DynamicActivationFloat8WeightConfig(granularity=kinds[g](), set_inductor_config=False)
            with torch.no_grad():
                quantize_(model, config,
                          filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.split(".")[-1] != "lm_head")
            sync()
            row["quantize_s"] = round(time.perf_counter() - t0, 2)
            row["float8_linears"] = sum(1 for m in model.modules()
                                        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata"))
            row["weight_bytes"] = subclass_weight_bytes(model)
            models[name] = model
        except Exception as e:
            row["error"] = f"quantize_: {error_text(e)}"
            del model
            cleanup()
    return models, info


def subclass_weight_bytes(model) -> int:
    """Parameter bytes, a quantized tensor subclass counted by its data and scales (qdata, scale)."""
    total = 0
    for p in model.parameters():
        parts = [getattr(p, "qdata", None), getattr(p, "scale", None)] if hasattr(p, "qdata") else [p]
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


def pair_row(mode: str, shape, t: dict[str, Any], bf16: str, fp8: str, outputs: dict[str, torch.Tensor] | None = None,
             versus: str | None = None, reference: str = "bf16") -> dict[str, Any]:
    """One row of the runtime table: variant `fp8` against `bf16`, from time_interleaved's timings `t`;
    with `outputs`, fp8's cosine against outputs[reference] (the plain BF16 model's, for every row)
    and whether it is finite; with `versus`, the speed of `fp8` against that quantkit variant
    (vs_quantkit_<versus> > 1: `fp8` is the faster)."""
    b, f = t[bf16], t[fp8]
    row: dict[str, Any] = {"mode": mode, "shape": list(shape), "tokens": shape[0] * shape[1],
                           "bf16_ms": b["median_ms"], "fp8_ms": f["median_ms"],
                           "bf16_p10_p90": [b["p10_ms"], b["p90_ms"]], "fp8_p10_p90": [f["p10_ms"], f["p90_ms"]],
                           "runs": f["runs"], "speedup": round(b["median_ms"] / f["median_ms"], 3)}
    if fp8.startswith("torchao"):
        row["fp8_runtime"] = fp8
    if versus is not None:
        row["vs_quantkit_" + versus.replace(" ", "_")] = round(t[versus]["median_ms"] / f["median_ms"], 3)
    if outputs is not None:
        row["cosine_vs_bf16"] = round(cosine(outputs[fp8], outputs[reference]), 6)
        row["finite"] = bool(torch.isfinite(outputs[fp8]).all())
    return row


def runtime_stage(s: dict[str, Any], device: str, calibration, budget: Budget, torchao: bool = True) -> dict[str, Any]:
    """FP8 (torch._scaled_mm) against BF16 on the decoder, side by side in one interleaved loop: the
    layers as the model defines them, and q/k/v and gate/up each joined into one GEMM (the same
    fusion on both sides, quantkit.runtime.fusion), all compiled the same way. With `torchao` and
    torchao importable, torchao's float8 (PerRow and PerTensor, see torchao_float8) runs in the same
    eager and compiled loops, compiled the same way; a torchao variant that fails is recorded with its
    error and dropped, the rest go on."""
    import copy
    import dataclasses

    import torch._dynamo

    from quantkit import ptq
    from quantkit.runtime.fusion import fuse_bf16_linears

    # Six models (eight with torchao's) share one decoder-layer code object, each compiled for two
    # shapes: past dynamo's default limit of 8 the rest would silently run eager. Raise it, and fail
    # loudly if it is hit.
    for name, value in (("recompile_limit", 64), ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    from quantkit.runtime.cuda_graph import CUDAGraphForward
    from quantkit.runtime.torch_fp8 import TorchFP8Runner, compile_model, fp8_weight_bytes

    out: dict[str, Any] = {"recipe": "fp8 linears (attention and softmax in the SDPA kernel, BF16)",
                           "shapes": [list(x) for x in s["shapes"]]}
    cfg = s["decoder"]
    base = build_decoder(cfg, device)
    quant = build_decoder(cfg, device)
    out["params"] = params(base.model)
    out["bf16_weight_bytes"] = sum(p.numel() * p.element_size() for p in base.model.parameters())
    recipe = runtime_recipe()
    calib_part, _ = ptq.split_calibration(calibration, recipe)
    with stage_memory(out, "peak_gpu_gib_quantize"):
        t0 = time.perf_counter()
        ptq.quantize_model(quant, recipe, calib_part, dtype="bf16", device=torch.device(device),
                           batch_size=s["batch_size"])
        sync()
        out["calibrate_quantize_s"] = round(time.perf_counter() - t0, 2)

    g = torch.Generator().manual_seed(7)
    inputs = {shape: {"input_ids": torch.randint(0, cfg["vocab_size"], shape, generator=g).to(device)}
              for shape in s["shapes"]}
    first = s["shapes"][0]
    with torch.inference_mode():
        fake_quant_first = quant.model(**inputs[first]).logits.float()
        # what the FP8 rows' cosine against BF16 is held to: the fake-quant model's own (issue 20: within 0.0002)
        out["fake_quant_vs_bf16_cosine"] = round(cosine(fake_quant_first, base.model(**inputs[first]).logits.float()), 6)

    def fused_fp8_runner(gemm_epilogue: bool = True):
        r = TorchFP8Runner(dataclasses.replace(quant, model=copy.deepcopy(quant.model)), compile=False, fuse=True,
                           device=device, dtype=torch.bfloat16, gemm_epilogue=gemm_epilogue)
        r.fuse(inputs[first])
        return r

    def fused_bf16():
        model = copy.deepcopy(base.model)
        fuse_bf16_linears(model, lambda: model(**inputs[first]))
        return model

    fused_runner, graph_runner = fused_fp8_runner(), fused_fp8_runner()
    # the same, each gated MLP's act · up · quantize in its own kernel after cuBLAS (no GEMM epilogue)
    fused_two, graph_two = fused_fp8_runner(gemm_epilogue=False), fused_fp8_runner(gemm_epilogue=False)
    base_fused, base_graph = fused_bf16(), fused_bf16()
    # the whole forward as one CUDA graph (quantkit.runtime.cuda_graph), the layers compiled without graphs
    whole_runner, base_whole = fused_fp8_runner(), fused_bf16()
    # torchao's copies are made from the BF16 model before it is compiled
    if torchao:
        tao, tao_info = torchao_float8(lambda: copy.deepcopy(base.model))
    else:
        tao, tao_info = {}, {"torchao": "off (--no-torchao)"}
    out.update(tao_info)
    runner = TorchFP8Runner(quant, compile=False, fuse=False, device=device, dtype=torch.bfloat16)
    out["fp8_linears"] = runner.converted
    out["not_converted"] = [f"{n}: {r}" for n, r in runner.skipped]
    out["fp8_model_bytes"] = fp8_weight_bytes(runner.model)
    out["fused_groups"] = {"fp8": len(fused_runner.fused), "first": fused_runner.fused[:2]}
    # gated MLPs run as act(gate) * up + FP8 quantization in one kernel (quantkit/runtime/gated_mlp.py)
    out["fp8_gated_mlps"] = {"fused": len(fused_runner.gated_mlps), "graphs": len(graph_runner.gated_mlps),
                             "first": str(fused_runner.gated_mlps[:1]),
                             "in_gemm_epilogue": sum(getattr(m, "interleave", 0) > 0 for m in fused_runner.model.modules())}

    def call(model, graphs: bool = False):
        def fn(x, **kw):
            with torch.inference_mode():
                if graphs:  # a new inference step for CUDA-graph trees
                    torch.compiler.cudagraph_mark_step_begin()
                return model(**x, **kw).logits
        return fn

    def one_graph(model):
        graphed = CUDAGraphForward(model)
        return lambda x, **kw: graphed(**x, **kw).logits

    variants = {"bf16": call(base.model), "fp8": call(runner.model),
                "bf16 fused": call(base_fused), "fp8 fused": call(fused_runner.model),
                "bf16 fused graphs": call(base_graph, True), "fp8 fused graphs": call(graph_runner.model, True),
                "fp8 fused two kernels": call(fused_two.model),
                "fp8 fused graphs two kernels": call(graph_two.model, True)}
    if torch.cuda.is_available():  # CUDA graphs need CUDA (the CPU smoke run leaves these rows out)
        variants.update({"bf16 fused one graph": one_graph(base_whole), "fp8 fused one graph": one_graph(whole_runner.model)})
    # torchao's variants join the compiled loop (not the CUDA-graph one: each graph pool holds its own
    # activation memory) and the eager one; they run the layers as the model defines them, so their
    # rows compare against the unfused quantkit FP8 ("vs_quantkit_fp8").
    variants.update({name: guarded(name, call(model)) for name, model in tao.items()})
    pairs = (("compiled", "bf16", "fp8"), ("compiled, fused q/k/v + gate/up", "bf16 fused", "fp8 fused"),
             ("compiled + CUDA graphs, fused", "bf16 fused graphs", "fp8 fused graphs"),
             ("compiled + one CUDA graph per forward, fused", "bf16 fused one graph", "fp8 fused one graph"))
    pairs = tuple(p for p in pairs if p[1] in variants)

    def drop(name: str, when: str, error: BaseException) -> None:
        """A torchao variant that raised: its error recorded, the variant left out of what follows."""
        out["torchao_variants"][name]["error"] = f"{when}: {error_text(error)}"
        variants.pop(name, None)
        tao.pop(name, None)
        cleanup()

    def attempt(when: str, fn: Callable[[], Any]) -> Any:
        """fn(), done again without any torchao variant that raised in it: a failing third-party
        variant must not cost the quantkit rows. fn reads `variants` afresh on each try."""
        while True:
            try:
                return fn()
            except VariantFailed as e:
                drop(e.name, when, e.error)

    def for_each(when: str, fn: Callable[[str], Any], names=None) -> dict[str, Any]:
        """{name: fn(name)} over the variants (or `names`), a torchao one that raises dropped (see drop)."""
        got: dict[str, Any] = {}
        for name in list(variants if names is None else names):
            while name in variants:
                try:
                    got[name] = fn(name)
                    break
                except VariantFailed as e:
                    drop(e.name, when, e.error)
        return got

    def first_call_s(name: str, x) -> float:
        t0 = time.perf_counter()
        variants[name](x)
        sync()
        return round(time.perf_counter() - t0, 1)

    def rows_for(mode_suffix: str, shape, t, outputs) -> list[dict[str, Any]]:
        rows = [pair_row(mode + mode_suffix, shape, t, b, f, outputs) for mode, b, f in pairs]
        rows[1]["fused_over_separate"] = {"bf16": round(t["bf16"]["median_ms"] / t["bf16 fused"]["median_ms"], 3),
                                         "fp8": round(t["fp8"]["median_ms"] / t["fp8 fused"]["median_ms"], 3)}
        # the gated GEMM's share: the same fused models with the gated MLP in two kernels (cuBLAS + gated)
        rows += [pair_row(mode + mode_suffix, shape, t, b, f, outputs, versus=v) for mode, b, f, v in (
            ("compiled, fused, gated MLP in two kernels", "bf16 fused", "fp8 fused two kernels", "fp8 fused"),
            ("compiled + CUDA graphs, fused, gated MLP in two kernels", "bf16 fused graphs",
             "fp8 fused graphs two kernels", "fp8 fused graphs"))]
        rows += [pair_row(f"compiled, {name}{mode_suffix}", shape, t, "bf16", name, outputs, versus="fp8")
                 for name in tao if name in t]
        return rows

    results: list[dict[str, Any]] = []
    with stage_memory(out, "peak_gpu_gib_runtime"):
        # eager, the layers as the model defines them
        for shape in s["shapes"]:
            x = inputs[shape]
            shape_s = "x".join(map(str, shape))
            for_each(f"eager {shape_s}", lambda name: first_call_s(name, x), names=list(tao))
            t = attempt(f"eager {shape_s}", lambda: time_interleaved(
                {name: (lambda fn=variants[name]: fn(x)) for name in ("bf16", "fp8", *tao)},
                iters=max(3, s["iters"] // 2), rounds=1))
            results.append(pair_row("eager", shape, t, "bf16", "fp8"))
            results += [pair_row(f"eager, {name}", shape, t, "bf16", name, versus="fp8") for name in tao if name in t]
        fp8_first = variants["fp8"](inputs[first]).float()
        out["fp8_eager_vs_fake_quant_cosine"] = round(cosine(fp8_first, fake_quant_first), 6)
        out["fused_vs_separate_fp8_eager_cosine"] = round(cosine(variants["fp8 fused"](inputs[first]).float(), fp8_first), 6)
        del fake_quant_first, fp8_first
        # compiled the same way: each decoder layer torch.compile'd (static shapes), the rest eager
        compile_model(base.model)
        compile_model(base_fused)
        compile_model(base_graph, mode="reduce-overhead")
        runner.compile()
        fused_runner.compile()
        graph_runner.compile(mode="reduce-overhead")
        fused_two.compile()
        graph_two.compile(mode="reduce-overhead")
        compile_model(base_whole)  # recorded whole by one_graph
        whole_runner.compile()
        for model in tao.values():
            compile_model(model)
        for shape in s["shapes"]:
            if budget.left() < 60:
                results.append({"mode": "compiled", "shape": list(shape), "skipped": "budget"})
                continue
            x = inputs[shape]
            shape_s = "x".join(map(str, shape))
            compile_s = for_each(f"compile {shape_s}", lambda name: first_call_s(name, x))
            out.setdefault("compile_s", {}).update({f"{name} {shape_s}": v for name, v in compile_s.items()})
            t = attempt(f"compiled {shape_s}", lambda: time_interleaved(
                {name: (lambda fn=fn: fn(x)) for name, fn in variants.items()}, iters=s["iters"], rounds=s["rounds"]))
            outputs = for_each(f"compiled {shape_s}", lambda name: variants[name](x).clone())
            results.extend(rows_for("", shape, t, outputs))
            del outputs
        # prefill as generate() runs it: logits of the last position only
        last = s["shapes"][-1]
        if budget.left() > 45:
            x = inputs[last]
            when = "compiled last-token " + "x".join(map(str, last))
            t = attempt(when, lambda: time_interleaved(
                {name: (lambda fn=fn: fn(x, logits_to_keep=1)) for name, fn in variants.items()},
                iters=s["iters"], rounds=s["rounds"]))
            outputs = for_each(when, lambda name: variants[name](x, logits_to_keep=1).clone())
            results.extend(rows_for(", last-token logits", last, t, outputs))
            del outputs
        for shape in s["shapes"]:
            if torch.cuda.is_available() and budget.left() > 40:
                x = inputs[shape]
                shape_s = "x".join(map(str, shape))
                out["kernel_ms_" + shape_s] = for_each(
                    f"profile {shape_s}", lambda name: kernel_breakdown(lambda: variants[name](x)),
                    names=[n for n in variants if "graph" not in n])
    out["results"] = results
    if budget.left() > 30:
        # The floor: how far BF16 itself is from FP32 on this model and input (FP8 cannot beat it).
        ref = build_decoder(cfg, device)
        with torch.inference_mode():
            bf16_logits = ref.model(**inputs[first]).logits.float()
            ref.model.float()
            fp32_logits = ref.model(**inputs[first]).logits.float()
        out["bf16_vs_fp32_cosine"] = round(cosine(bf16_logits, fp32_logits), 6)
        del ref, bf16_logits, fp32_logits
    tao.clear()
    del runner, fused_runner, graph_runner, fused_two, graph_two, whole_runner, base, base_fused, base_graph, base_whole
    del quant, inputs, variants, tao
    cleanup()
    return out


# ---------------------------------------------------------------------------------------------
# Calibration speed against the compiled BF16 forward, and sensitivity


def quantizer_amaxes(model) -> dict[str, torch.Tensor]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m._amax.detach().clone() for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and "_amax" in m._buffers}


def timed_passes(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def calibration_stage(s: dict[str, Any], device: str, calibration) -> dict[str, Any]:
    """fp8 calibration of the decoder on the 512 calibration samples, with the statistics on the device
    (quantkit's default) and with ModelOpt's own collect, at each batch size of s["calib_batches"]:
    forward-loop tokens/s, calibrate+quantize seconds, and whether every quantizer's amax is bitwise
    ModelOpt's; beside it the BF16 model's forward over the same batches, eager and compiled
    (quantkit.runtime.torch_fp8.compile_model, as the runtime stage compiles it)."""
    from quantkit import ptq
    from quantkit.recipe import load_recipe
    from quantkit.runtime.torch_fp8 import compile_model

    recipe = load_recipe("fp8")
    calib_part, _ = ptq.split_calibration(calibration, recipe)
    tokens = len(calib_part) * s["calib_seq"]
    out: dict[str, Any] = {"recipe": "fp8", "samples": len(calib_part), "seq": s["calib_seq"], "tokens": tokens,
                           "calibration": [], "bf16_forward": [], "amax_bitwise": []}
    for bs in s["calib_batches"]:
        amax = {}
        for stats in ("device", "modelopt"):
            loaded = build_decoder(s["decoder"], device)
            timer = CalibrationTimer()
            with timer.installed():
                t0 = time.perf_counter()
                ptq.quantize_model(loaded, recipe, calib_part, dtype="bf16", device=torch.device(device), batch_size=bs,
                                   device_stats=stats == "device")
                sync()
                total = time.perf_counter() - t0
            loop_s = timer.passes[0]["seconds"]
            out["calibration"].append({"batch": bs, "stats": stats, "forward_loop_s": loop_s,
                                       "tokens_per_s": round(tokens / loop_s), "calibrate_quantize_s": round(total, 2)})
            print(f"[bench] calibration batch {bs} {stats}: {tokens / loop_s:,.0f} tokens/s, "
                  f"loop {loop_s:.2f} s, calibrate+quantize {total:.2f} s", flush=True)
            amax[stats] = quantizer_amaxes(loaded.model)
            del loaded
            cleanup()
        mine, theirs = amax["device"], amax["modelopt"]
        equal = [n for n in theirs if n in mine and mine[n].dtype == theirs[n].dtype and torch.equal(mine[n], theirs[n])]
        out["amax_bitwise"].append({"batch": bs, "quantizers": len(theirs), "same_names": set(mine) == set(theirs),
                                    "bitwise_equal": len(equal),
                                    "differ": [n for n in theirs if n not in equal][:5]})
        del amax, mine, theirs
    base = build_decoder(s["decoder"], device)
    batches = {bs: [kw for _, kw in calib_part.batches(bs, device=device, dtype=torch.bfloat16)]
               for bs in s["calib_batches"]}

    def forward_all(bs: int) -> None:
        with torch.inference_mode():
            for kw in batches[bs]:
                base.model(**kw)

    for mode in ("eager", "compiled"):
        if mode == "compiled":
            compile_model(base.model)
        for bs in s["calib_batches"]:
            t0 = time.perf_counter()
            forward_all(bs)  # warm-up (and compile)
            sync()
            warm = time.perf_counter() - t0
            times = timed_passes(lambda: forward_all(bs), 3)
            med = statistics.median(times)
            out["bf16_forward"].append({"mode": mode, "batch": bs, "pass_s": round(med, 3),
                                        "tokens_per_s": round(tokens / med), "warmup_s": round(warm, 1),
                                        "passes_s": [round(t, 3) for t in times]})
            print(f"[bench] BF16 {mode} batch {bs}: {tokens / med:,.0f} tokens/s", flush=True)
    best = max(r["tokens_per_s"] for r in out["bf16_forward"] if r["mode"] == "compiled")
    for r in out["calibration"]:
        r["vs_best_compiled_bf16"] = round(r["tokens_per_s"] / best, 3)
        same = next(b for b in out["bf16_forward"] if b["mode"] == "compiled" and b["batch"] == r["batch"])
        r["vs_compiled_bf16_same_batch"] = round(r["tokens_per_s"] / same["tokens_per_s"], 3)
    del base, batches
    cleanup()
    return out


def sensitivity_stage(s: dict[str, Any], device: str, calibration, limit_s: float) -> dict[str, Any]:
    """`quantkit sensitivity --recipe balanced` on the decoder as the CLI runs it (its default 64 samples,
    target 0.99, granularity auto, the suggestion verified by a fresh quantize), timed."""
    from quantkit import sensitivity
    from quantkit.recipe import load_recipe

    n = s["sensitivity_samples"]
    subset = calibration.subset(range(min(n, len(calibration))))
    out: dict[str, Any] = {"recipe": "balanced", "samples": len(subset), "target": 0.99, "time_limit_s": round(limit_s)}
    t0 = time.perf_counter()
    try:
        with stage_memory(out, "peak_gpu_gib"), time_limit(limit_s):
            result = sensitivity.analyse(lambda: build_decoder(s["decoder"], device), load_recipe("balanced"), subset,
                                         target_cosine=0.99, granularity="auto", dtype="bf16", device=device,
                                         batch_size=s["batch_size"])
            sync()
        out["seconds"] = round(time.perf_counter() - t0, 1)
        d = result.to_dict()
        out.update({k: d.get(k) for k in ("granularity", "full_cosine", "reached_cosine", "reached", "keep",
                                          "keep_attention", "heldout_samples", "steps")})
        out["units"] = len(d["ranking"])
        # the full recipe, each unit alone, then each greedy/pruning step (the verify step quantizes afresh)
        out["evaluations"] = 1 + out["units"] + len(d["steps"]) - 1
    except StageTimeout as e:
        out["stopped"] = str(e)
        out["seconds"] = round(time.perf_counter() - t0, 1)
    cleanup()
    return out


# ---------------------------------------------------------------------------------------------
# report


def environment(args) -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                           "python": platform.python_version(), "smoke": args.smoke,
                           "modelopt_cuda_extensions": args.modelopt_ext}
    for dist in ("torch", "nvidia-modelopt", "transformers", "onnx", "onnxruntime", "triton", "torchao"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=gib(p.total_memory), sms=p.multi_processor_count, cuda=torch.version.cuda)
    else:
        env["device"] = "cpu"
    return env


def mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def onnx_cell(info: dict[str, Any] | None) -> str:
    if not info:
        return "-"
    if "export_s" in info:
        return str(info["export_s"])
    return (info.get("error") or info.get("skipped") or "-")[:40]


def torchao_summary(rt: dict[str, Any]) -> str:
    """One line on the runtime stage's torchao variants: the version (or why none ran), each variant's
    float8 linears and quantize_ seconds, or its error."""
    parts = [str(rt.get("torchao", "-"))]
    for name, v in rt.get("torchao_variants", {}).items():
        if "error" in v:
            parts.append(f"{name} failed ({v['error'][:160]})")
        else:
            parts.append(f"{name}: {v.get('float8_linears')} float8 linears, {mib(v.get('weight_bytes'))} MiB, "
                         f"quantize_ {v.get('quantize_s')} s")
    return "; ".join(parts)


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    env = report["environment"]
    t = Table(title=f"PTQ on {env.get('device')} · torch {env.get('torch')} · ModelOpt {env.get('nvidia-modelopt')}")
    for c in ("model", "recipe", "calib samples/s", "calib+quantize s", "PTQ total s", "cos vs FP32",
              "weights MiB before→after", "ONNX export s", "ONNX MiB", "peak GPU GiB (PTQ/export)"):
        t.add_column(c, justify="right" if c not in ("model", "recipe") else "left")
    for r in report["ptq"]:
        if "error" in r or "skipped" in r:
            t.add_row(r["model"], r["recipe"], *(["-"] * 7), r.get("error", r.get("skipped", ""))[:60])
            continue
        onnx = r.get("onnx") or {}
        t.add_row(r["model"], r["recipe"], f"{r.get('calib_samples_per_s', '-')}", f"{r['calibrate_quantize_s']}",
                  f"{r['ptq_total_s']}", f"{r['fake_quant_vs_fp32']['cosine']:.5f}",
                  f"{mib(r['weight_bytes_before'])}→{mib(r['weight_bytes_after'])}",
                  onnx_cell(onnx),
                  mib(onnx.get("size_bytes")),
                  f"{r.get('peak_gpu_gib_ptq', '-')}/{onnx.get('peak_gpu_gib', '-')}")
    dec = report.get("decoder_onnx_fp8")
    if dec:
        t.add_row("decoder", "fp8 (export only)", *(["-"] * 5), onnx_cell(dec),
                  mib(dec.get("size_bytes")), f"-/{dec.get('peak_gpu_gib', '-')}")
    con.print(t)
    gemm = report.get("gemm")
    if gemm:
        t = Table(title="GEMM alone at the decoder's shapes: BF16 mm vs FP8 torch._scaled_mm")
        for c in ("M", "layer", "K", "N", "BF16 ms", "FP8 ms", "speed-up", "BF16 TFLOP/s", "FP8 TFLOP/s"):
            t.add_column(c, justify="right")
        for r in gemm:
            t.add_row(str(r["m"]), r["layer"], str(r["k"]), str(r["n"]), f"{r['bf16_ms']:.3f}", f"{r['fp8_ms']:.3f}",
                      f"{r['ratio']:.2f}x", str(r["bf16_tflops"]), str(r["fp8_tflops"]))
        con.print(t)
    rt = report.get("runtime")
    if rt and "results" in rt:
        t = Table(title=f"decoder {rt['params'] / 1e9:.2f}B: FP8 (quantkit torch._scaled_mm; torchao rows: torchao "
                        f"float8) vs BF16, same inputs, median of CUDA-event timings")
        # "vs quantkit": the row's FP8 time against the quantkit variant it stands beside (> 1: the row is faster)
        for c in ("mode", "batch x seq", "BF16 ms", "FP8 ms", "FP8 speed-up", "vs quantkit", "cosine vs BF16",
                  "finite"):
            t.add_column(c, justify="right" if c != "mode" else "left")
        for r in rt["results"]:
            if "skipped" in r:
                t.add_row(r["mode"], "x".join(map(str, r["shape"])), "-", "-", "-", "-", "-", r["skipped"])
                continue
            t.add_row(r["mode"], "x".join(map(str, r["shape"])), f"{r['bf16_ms']:.2f}", f"{r['fp8_ms']:.2f}",
                      f"{r['speedup']:.2f}x", next((f"{v:.2f}x" for k, v in r.items() if k.startswith("vs_quantkit")), "-"),
                      f"{r['cosine_vs_bf16']:.5f}" if "cosine_vs_bf16" in r else "-", str(r.get("finite", "-")))
        con.print(t)
        con.print(f"torchao: {torchao_summary(rt)}")
        extra = {k: v for k, v in rt.items() if k.startswith("kernel_ms")}
        for k, v in extra.items():
            con.print(f"{k}: {json.dumps({name: {c: ms for c, ms in kinds.items() if c != 'top'} for name, kinds in v.items()})}")
        con.print(f"FP8 linears {rt.get('fp8_linears')}; weights {mib(rt.get('bf16_weight_bytes'))} MiB BF16 -> "
                  f"{mib(rt.get('fp8_model_bytes', {}).get('total_bytes'))} MiB FP8 runtime; "
                  f"calibrate+quantize {rt.get('calibrate_quantize_s')} s; FP8 eager vs ModelOpt fake quant cosine "
                  f"{rt.get('fp8_eager_vs_fake_quant_cosine')}; fake quant vs BF16 cosine {rt.get('fake_quant_vs_bf16_cosine')}; "
                  f"BF16 vs FP32 cosine {rt.get('bf16_vs_fp32_cosine')}; "
                  f"fused groups {rt.get('fused_groups')}; gated MLPs in one kernel {rt.get('fp8_gated_mlps')}; "
                  f"compile s {rt.get('compile_s')}")
    cal = report.get("calibration")
    if cal:
        t = Table(title=f"calibration ({cal['recipe']}) of the decoder on {cal['samples']} samples x {cal['seq']} tokens "
                        f"vs the BF16 forward over the same batches")
        for c in ("what", "batch", "tokens/s", "vs compiled BF16 (same batch)", "vs best compiled BF16", "loop s",
                  "calibrate+quantize s"):
            t.add_column(c, justify="right" if c != "what" else "left")
        for r in cal["bf16_forward"]:
            t.add_row(f"BF16 forward, {r['mode']}", str(r["batch"]), f"{r['tokens_per_s']:,}", "-", "-",
                      f"{r['pass_s']:.3f}", "-")
        for r in cal["calibration"]:
            t.add_row(f"calibration, stats: {r['stats']}", str(r["batch"]), f"{r['tokens_per_s']:,}",
                      f"{r.get('vs_compiled_bf16_same_batch', '-')}", f"{r.get('vs_best_compiled_bf16', '-')}",
                      f"{r['forward_loop_s']:.3f}", f"{r['calibrate_quantize_s']}")
        con.print(t)
        con.print(f"amax device vs ModelOpt: {cal['amax_bitwise']}")
    sens = report.get("sensitivity")
    if sens:
        con.print(f"sensitivity balanced on the decoder: {sens.get('seconds')} s, {sens.get('evaluations')} evaluations, "
                  f"{sens.get('units')} units ({sens.get('granularity')}), full {sens.get('full_cosine')}, reached "
                  f"{sens.get('reached_cosine')} ({sens.get('reached')}), keep {sens.get('keep')}, "
                  f"{sens.get('stopped', '')}")
    for e in report.get("errors", []):
        con.print(f"[red]error[/red] {e['stage']}: {e['error']}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny models: check the code paths in a minute or two")
    p.add_argument("--json", default=None, help="where to write the JSON (default benchmarks/bench_gpu_<date>.json)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new stages after this many seconds")
    p.add_argument("--modelopt-ext", choices=("skip", "jit"), default="skip",
                   help="skip: ModelOpt's PyTorch FP8/INT8 fake quant; jit: build its CUDA extensions first (~60 s each)")
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages not to run")
    p.add_argument("--only", nargs="*", default=None, choices=STAGES,
                   help="run just these stages (e.g. --only calibration sensitivity: a few minutes)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--no-torchao", action="store_true",
                   help="leave torchao's float8 variants out of the runtime stage (default: run them if torchao imports)")
    args = p.parse_args(argv)

    from quantkit import console

    console.set_quiet(True)
    budget = Budget(args.budget_s)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = sizes(args.smoke)
    date = datetime.date.today().isoformat()
    json_path = Path(args.json) if args.json else Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_gpu_{date}.json"
    report: dict[str, Any] = {"schema": "quantkit.bench_gpu/1", "environment": environment(args),
                              "sizes": {k: v for k, v in s.items()}, "ptq": [], "errors": [], "skipped": []}

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - budget.start, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    def run(stage: str, need_s: float, fn: Callable[[], Any]) -> Any:
        if stage.split(":")[0] in args.skip or (args.only is not None and stage.split(":")[0] not in args.only):
            report["skipped"].append({"stage": stage, "why": "--skip/--only"})
            return None
        if budget.left() < need_s:
            report["skipped"].append({"stage": stage, "why": f"budget: {budget.left():.0f} s left, needs ~{need_s:.0f}"})
            print(f"[bench] skip {stage}: budget", flush=True)
            return None
        print(f"[bench] {stage} ({budget.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:
            report["errors"].append({"stage": stage, "error": f"{type(e).__name__}: {str(e)[:600]}",
                                     "traceback": traceback.format_exc()[-3000:]})
            print(f"[bench] {stage} FAILED: {type(e).__name__}: {e}", flush=True)
            cleanup()
            return None
        finally:
            print(f"[bench] {stage} done in {time.perf_counter() - t0:.1f} s", flush=True)
            save()

    t0 = time.perf_counter()
    import modelopt.torch.quantization  # noqa: F401  (import cost reported, not charged to a stage)

    import quantkit.ptq  # noqa: F401

    report["environment"]["import_s"] = round(time.perf_counter() - t0, 1)
    if args.modelopt_ext == "skip":
        skip_modelopt_jit()
    else:
        from modelopt.torch.quantization import extensions

        t0 = time.perf_counter()
        extensions.get_cuda_ext()
        extensions.get_cuda_ext_fp8()
        report["environment"]["modelopt_jit_s"] = round(time.perf_counter() - t0, 1)

    dec_calib = calibration_set("decoder", s)
    vis_calib = calibration_set("vision", s)
    export_root = json_path.parent / ".bench_onnx"
    cuda = device.startswith("cuda")
    fp8_gpu = cuda and torch.cuda.get_device_capability() >= (8, 9)

    report["calibration"] = run("calibration", 60, lambda: calibration_stage(s, device, dec_calib))
    report["sensitivity"] = run("sensitivity", 60, lambda: sensitivity_stage(
        s, device, dec_calib, min(300.0, budget.left() - 30)))
    if fp8_gpu or (args.smoke and not cuda):  # on a CPU only as a check of the code path
        report["runtime"] = run("runtime", 150, lambda: runtime_stage(s, device, dec_calib, budget,
                                                                      torchao=not args.no_torchao))
    if fp8_gpu:
        report["gemm"] = run("gemm", 15, lambda: gemm_bench(s["decoder"], s["gemm_tokens"], s["iters"]))
    for recipe in RECIPES:
        row = run(f"decoder-ptq:{recipe}", 60, lambda: ptq_stage(
            "decoder", lambda: build_decoder(s["decoder"], device), dec_calib, recipe, s, device, None))
        report["ptq"].append(row or {"model": "decoder", "recipe": recipe, "skipped": "budget/--skip/error"})
        save()
    # ONNX export of each vision model right after its PTQ, each under a time limit that keeps the
    # decoder export and the final table inside the budget.
    do_export = "vision-onnx" not in args.skip and (args.only is None or "vision-onnx" in args.only)
    for recipe in RECIPES:
        row = run(f"vision-ptq:{recipe}", 40, lambda: ptq_stage(
            "vision", lambda: build_vision(s["vision"], device), vis_calib, recipe, s, device,
            export_root if do_export else None, lambda: min(120.0, budget.left() - 90)))
        report["ptq"].append(row or {"model": "vision", "recipe": recipe, "skipped": "budget/--skip/error"})
        save()

    def decoder_onnx():
        from quantkit import ptq
        from quantkit.recipe import load_recipe

        loaded = build_decoder(s["decoder"], device)
        recipe = load_recipe("fp8")
        calib_part, _ = ptq.split_calibration(dec_calib, recipe)
        ptq.quantize_model(loaded, recipe, calib_part.subset(range(min(64, len(calib_part)))), dtype="bf16",
                           device=torch.device(device), batch_size=s["batch_size"])
        info = export_stage(loaded, recipe, export_root / "decoder-fp8", budget.left() - 20)
        info["note"] = "fp8 recipe, calibrated on 64 samples (export time does not depend on it)"
        del loaded
        cleanup()
        return info

    # Exporting the 2.1 B decoder (external data, over 4 GB) takes minutes, and torch.onnx.export cannot
    # be interrupted mid-way: start it only with room to finish, or alone (--skip everything else).
    report["decoder_onnx_fp8"] = run("decoder-onnx", 300, decoder_onnx)
    save()
    print_tables(report)
    print(f"[bench] JSON: {json_path}", flush=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
