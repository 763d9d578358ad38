"""Post-training quantization end to end: plan -> protect -> attention Q/DQ -> mtq.quantize -> evaluate.

`prepare()` applies everything that changes the model's structure (FP32 guards, quantized
attention, per-layer dtypes) and is re-run identically by `load_quantized()` before ModelOpt's
state is restored, so a saved run reloads without calibration data. `quantize()` calibrates and
evaluates on held-out samples against the FP32 reference; `save_run()` writes the output folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import io
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from quantkit import console
from quantkit.errors import CalibrationError, InputError, ModelRaised, PlanError, QuantkitError
from quantkit.graph_scales import snap_fp8_amax
from quantkit.models import DTYPES, LoadedModel, load_model
from quantkit.plan import Plan, make_plan
from quantkit.recipe import FORMATS, Precision, Recipe, load_recipe

STATE_FILE = "modelopt_state.pth"
RUN_FILE = "run.json"


def _torch_dtype(dtype: str) -> torch.dtype:
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"--device {device}: use cpu or cuda[:N]")
    return torch.device(device)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("quantkit", "torch", "nvidia-modelopt", "onnx", "onnxruntime", "transformers", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _needs_cuda_nvfp4(plan: Plan) -> bool:
    return any(Precision.NVFP4 in (r.weights, r.activations) for r in plan.layers)


def enable_cpu_nvfp4_if_needed(model: nn.Module, plan: Plan, device: torch.device) -> None:
    """ModelOpt's NVFP4 fake-quant needs CUDA; on the CPU quantkit supplies the same arithmetic (routed
    for as long as `model`'s changes hold it: quantkit.patches)."""
    if device.type == "cpu" and _needs_cuda_nvfp4(plan):
        try:
            from quantkit import nvfp4_cpu
        except ImportError:
            raise QuantkitError("NVFP4 on the CPU is not available in this build; run on a CUDA device "
                                "(--device cuda) or pick a recipe without nvfp4 (e.g. fp8)") from None
        from quantkit.patches import of_model

        nvfp4_cpu.install(of_model(model))


def move_model(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """model.to(device, dtype); a model placed over several devices (--device-map) keeps its placement."""
    from quantkit.placement import is_dispatched

    if is_dispatched(model):
        model.to(dtype=dtype)
    else:
        model.to(device=device, dtype=dtype)


def probe_inputs(loaded: LoadedModel, device: torch.device | str, dtype: str) -> dict[str, Any] | None:
    """Keyword inputs for the plan's one probe forward (quantkit.roles): the model's example inputs,
    else a tokenized sentence; None when the model has neither (roles then come from names)."""
    example = loaded.example_inputs
    if not example and loaded.tokenizer is not None:
        try:
            example = loaded.tokenize(["quantkit reads the structure of this model.", "A second sentence."])
        except Exception:  # noqa: BLE001 — no example: roles from the module tree and names
            return None
    if not example:
        return None
    from quantkit.placement import is_dispatched

    # A model placed over several devices (--device-map) takes its inputs where its first layer is.
    target = "cpu" if is_dispatched(loaded.model) else device
    return {k: (v.to(device=target, dtype=_torch_dtype(dtype)) if v.is_floating_point() else v.to(target))
            if torch.is_tensor(v) else v for k, v in example.items()}


def prepare(loaded: LoadedModel, recipe: Recipe, dtype: str = "fp32", device: torch.device | str = "cpu",
            strict: bool = False) -> Plan:
    """Move the model to device/dtype, plan it, and apply FP32 guards, attention Q/DQ and layer dtypes."""
    from quantkit import attention, multihead, protect
    from quantkit.layer_dtype import apply_layer_dtypes, called_modules, island_rows, seal_islands
    from quantkit.placement import rebind_hooked_forwards

    model = loaded.model
    move_model(model, device, _torch_dtype(dtype))
    model.eval()
    # Before planning: the projections of every nn.MultiheadAttention become layers of the plan.
    multihead.expose_projections(model)
    plan = make_plan(model, recipe, model_dtype=dtype, strict=strict, example=probe_inputs(loaded, device, dtype))
    protections = protect.protect_model(model, recipe.protect)
    conversions = attention.convert_attention(model, recipe.attention)
    called = None
    if island_rows(plan.layers, _torch_dtype(dtype)):
        example = probe_inputs(loaded, device, dtype)
        called = called_modules(model, example) if example else None
    apply_layer_dtypes(model, plan.layers, _torch_dtype(dtype), called)
    plan.warnings += [f"{row.name}: {row.note}" for row in plan.layers if row.note and "without calling" in row.note]
    for name, island in seal_islands(model, _torch_dtype(dtype)):
        plan.warnings.append(f"{name or type(model).__name__}: its weights are {str(island).removeprefix('torch.')} "
                             f"in a {dtype} model (shared with a layer the plan casts); it casts at its boundaries")
    rebind_hooked_forwards(model)  # the guards and attention routing swapped classes under accelerate's hooks
    plan.protections = [dataclasses.asdict(p) for p in protections]
    plan.attention = [dataclasses.asdict(c) for c in conversions]
    for c in conversions:
        if not c.converted:
            plan.warnings.append(f"attention {c.name} ({c.module_class}) was not converted: {c.reason}; "
                                 "its matmuls stay unquantized")
    return plan


# ---------------------------------------------------------------------------------------------
# Calibration data and evaluation


def open_calibration(loaded: LoadedModel, calib: str | None, synthetic: bool, max_samples: int | None):
    from quantkit import calib as calib_mod

    from quantkit.errors import require_positive

    require_positive("--max-samples", max_samples)
    if synthetic and calib:
        raise InputError("--synthetic and --calib exclude each other: pick real data or random data")
    if synthetic:
        return calib_mod.synthetic_set(loaded, n=max_samples or 64, seed=0)
    if calib:
        cs = calib_mod.CalibrationSet.open(calib)
    elif loaded.default_calibration:
        cs = calib_mod.builtin_set(loaded, loaded.default_calibration)
    else:
        raise CalibrationError(
            f"{loaded.spec}: no calibration data. Collect real inputs with `quantkit collect --model {loaded.spec} "
            "--data ... --out calib/` and pass --calib calib/ (or --synthetic to calibrate on noise, which the "
            "report will say)")
    if max_samples and len(cs) > max_samples:
        cs = cs.subset(range(max_samples))
    return cs


@torch.no_grad()
def run_outputs(loaded: LoadedModel, model: nn.Module, dataset, batch_size: int, device, dtype: str,
                desc: str) -> list[dict[str, torch.Tensor]]:
    """The named outputs of `model` on every batch of `dataset`, in FP32 on the CPU."""
    from tqdm.auto import tqdm

    from quantkit.calib import Sample, call_model

    outs = []
    batches = list(dataset.batches(batch_size, device=device, dtype=_torch_dtype(dtype)))
    for i, (args, kwargs) in enumerate(tqdm(batches, desc=desc, disable=console.is_quiet(), leave=False)):
        with _naming_the_model(loaded):
            result = call_model(model, Sample(args, kwargs), f"{desc} batch {i}")
        result = loaded.named_outputs(result)
        outs.append({k: v.detach().float().cpu() for k, v in result.items()})
    return outs


@contextlib.contextmanager
def _naming_the_model(loaded: LoadedModel):
    """A model's own exception (ModelRaised) leaves with the model spec in front of it."""
    try:
        yield
    except ModelRaised as e:
        raise ModelRaised(f"{loaded.spec}: {e}") from None


def compare_runs(reference: list[dict[str, torch.Tensor]], candidate: list[dict[str, torch.Tensor]]):
    from quantkit.metrics import OutputsAccumulator

    acc = OutputsAccumulator()
    for ref, cand in zip(reference, candidate):
        acc.update(ref, cand)
    return acc.result()


def error_histograms(reference, candidate) -> dict[str, Any]:
    try:
        from quantkit.report import build_error_histogram
    except ImportError:
        return {}
    out = {}
    for name in reference[0]:
        ref = torch.cat([r[name].flatten() for r in reference])
        cand = torch.cat([c[name].flatten() for c in candidate])
        out[name] = build_error_histogram(ref, cand)
    return out


def quantizer_counts(model: nn.Module) -> dict[str, int]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts = {"weight": 0, "input": 0, "output": 0, "bmm": 0, "other": 0, "enabled": 0, "disabled": 0}
    for name, m in model.named_modules():
        if not isinstance(m, TensorQuantizer):
            continue
        leaf = name.rsplit(".", 1)[-1]
        kind = ("weight" if leaf == "weight_quantizer" else "input" if leaf == "input_quantizer"
                else "output" if leaf == "output_quantizer" else "bmm" if "bmm" in leaf else "other")
        counts[kind] += 1
        counts["enabled" if m.is_enabled else "disabled"] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Quantize


@dataclasses.dataclass
class QuantizeResult:
    """What `quantize` made: the quantized model (in `loaded`), its plan, and what its evaluation
    measured. Truthy when the accuracy gate passed. `report` is report.json's content, rendered from
    these fields by quantkit.report.render (the one place that lays report.json out)."""

    loaded: LoadedModel
    recipe: Recipe
    plan: Plan
    model_info: dict[str, Any]  # spec, class, dtype, device
    calibration: dict[str, Any]  # the set's info plus samples_total / calibration_samples / heldout_samples
    metrics: dict[str, Any]  # output -> quantkit.metrics.Metrics, fake-quant vs FP32 on the held-out samples
    histograms: dict[str, Any]  # output -> error histogram (report.document.build_error_histogram)
    thresholds: Any  # quantkit.metrics.Thresholds: the recipe's gate
    failures: list[str]  # why the gate failed (empty: passed)
    warnings: list[str]
    quantizers: dict[str, int]  # TensorQuantizers by kind and state (quantizer_counts)
    per_layer: list[dict[str, Any]]  # per-layer error against the FP32 model (layer_error)
    timings: dict[str, float]
    created: str  # UTC, ISO 8601
    versions: dict[str, str]
    heldout: Any = None  # the samples the report's metrics were measured on (None: none)
    fp32_outputs: list | None = None  # the FP32 model's outputs per batch of `heldout`
    placement: dict[str, Any] | None = None  # --device-map: where the model's layers went (placement.Placement)
    data_parallel: dict[str, Any] | None = None  # --nproc: the ranks' calibration (distributed.DataParallel)

    @property
    def passed(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.passed

    @property
    def report(self) -> dict[str, Any]:
        from quantkit.report.render import quantize_report

        return quantize_report(self)


class LoopCalibration:
    """Calibration through the caller's own `forward_loop(model)` (as `mtq.quantize` takes it).

    quantkit cannot hold samples out of a loop, so the evaluation runs on `heldout` (a CalibrationSet,
    e.g. of the example inputs) when there is one, else the report says nothing was measured."""

    synthetic = False

    def __init__(self, loop: Callable[[nn.Module], Any], heldout=None):
        self.loop, self.heldout = loop, heldout

    def __len__(self) -> int:
        return 0

    def forward_loop(self, **_: Any) -> Callable[[nn.Module], Any]:
        return self.loop

    def info(self) -> dict[str, Any]:
        name = getattr(self.loop, "__qualname__", type(self.loop).__name__)
        return {"source": f"forward_loop {name} (Python)", "synthetic": False, "path": None}


def _check_quantizers_reached(model: nn.Module, plan: Plan) -> list[str]:
    """Every layer the plan quantizes must carry an enabled, calibrated weight quantizer."""
    modules = dict(model.named_modules())
    problems = []
    for row in plan.quantized_layers():
        q = getattr(modules.get(row.name), "weight_quantizer", None)
        if q is None or not q.is_enabled:
            problems.append(f"{row.name}: planned {row.weights} but ModelOpt put no enabled weight quantizer on it")
    return problems


def finish_histogram_calibration(model: nn.Module, plan: Plan) -> None:
    from quantkit.compat import modelopt as modelopt_compat
    from quantkit.modelopt_config import histogram_calibrated_quantizers

    methods = histogram_calibrated_quantizers(plan)
    if not methods:
        return
    modules = dict(model.named_modules())
    for qname, method in methods.items():
        q = modules.get(qname)
        if q is None or modelopt_compat.calibrator(q) is None:
            continue
        kwargs = {"percentile": 99.99} if method == "percentile" else {}
        q.load_calib_amax(method, **kwargs)


def run_weight_algorithms(model: nn.Module, plan: Plan, forward_loop) -> None:
    """Each rule's NVFP4 weight algorithm, as one `mtq.calibrate` pass over its own layers.

    ModelOpt applies a calibration algorithm to every enabled quantizer, so the quantizers of all
    other layers are switched off for the pass (calibration statistics are gathered with
    quantization off anyway, so the other layers' state does not change what a pass computes).
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    from quantkit.modelopt_config import weight_algorithm_passes

    for name, algorithm, layers in weight_algorithm_passes(plan):
        layer_set = set(layers)
        quantizers = {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
        off = [n for n, q in quantizers.items() if q.is_enabled and n.rsplit(".", 1)[0] not in layer_set]
        for n in off:
            quantizers[n].disable()
        for n, q in quantizers.items():  # the pass calibrates its layers from scratch, as mtq.quantize would
            if n.rsplit(".", 1)[0] in layer_set and q.is_enabled:
                q.reset_amax()
        try:
            console.info(f"weight algorithm {name} on {len(layers)} layer(s)")
            mtq.calibrate(model, algorithm, forward_loop)
        finally:
            modules = dict(model.named_modules())  # the pass may have swapped quantizer modules
            for n in off:
                modules[n].enable()


def split_calibration(calibration, recipe: Recipe):
    calib_part, heldout = calibration.split(recipe.calibration.heldout_fraction, seed=0)
    if len(calib_part) == 0 or len(heldout) == 0:
        raise CalibrationError(f"{calibration.info().get('path') or 'calibration set'}: {len(calibration)} samples "
                               "is too few to keep a held-out split; collect more")
    return calib_part, heldout


def _check_something_is_quantized(plan: Plan, recipe: Recipe, model_spec: str) -> None:
    """A quantizing recipe that reaches nothing would "pass" with cosine 1.0 and MSE 0: the number
    that means nothing. (A recipe without Q/DQ, like fp16, is not asked to quantize.)"""
    if not any(FORMATS[p].quantized for p in recipe.precisions_used()):
        return
    if plan.quantized_layers() or any(a["converted"] and a["quantizers"] for a in plan.attention):
        return
    raise PlanError(f"recipe {recipe.name} quantizes no layer of {model_spec} (its quantizing rules match none of "
                    f"the model's {len(plan.layers)} Linear/Conv/Embedding layers, and no attention was converted); "
                    f"see `quantkit plan --recipe {recipe.name} --model {model_spec}` and add rules that match")


def quantize_model(loaded: LoadedModel, recipe: Recipe, calib_part, *, dtype: str, device: torch.device,
                   batch_size: int, strict: bool = False, data_parallel=None, allow_nothing: bool = False,
                   device_stats: bool = True) -> Plan:
    """prepare + mtq.quantize on `calib_part`, in place; checks that the quantizers match the plan.

    A quantizing recipe that reaches no layer is a PlanError unless `allow_nothing` (sensitivity's
    check of a suggestion that keeps every layer wide).

    With `data_parallel` (a quantkit.distributed.DataParallel) this rank calibrates its shard of
    `calib_part` and the statistics are reduced across ranks (the same amax as one process).

    With `device_stats` (the default) a max-calibrated plan collects its statistics on the device
    (quantkit.max_calibration: ModelOpt's amax bit for bit, without a host sync per quantizer call);
    other algorithms (smoothquant, awq, the rules' weight algorithms) run ModelOpt's own loop.
    """
    import modelopt.torch.quantization as mtq

    from quantkit import attention
    from quantkit.max_calibration import device_max_calibration
    from quantkit.modelopt_config import build_quant_config
    from quantkit.plan import calibration_algorithm

    plan = prepare(loaded, recipe, dtype, device, strict=strict)
    if not allow_nothing:
        _check_something_is_quantized(plan, recipe, loaded.spec)
    enable_cpu_nvfp4_if_needed(loaded.model, plan, device)
    config = build_quant_config(plan)
    fast = device_max_calibration if device_stats and calibration_algorithm(plan) == "max" else None
    if data_parallel is not None:
        from quantkit.distributed import check_plan

        check_plan(plan)
        forward_loop = data_parallel.forward_loop(calib_part, batch_size=batch_size, device=device,
                                                  dtype=_torch_dtype(dtype), progress=not console.is_quiet())
        calibrate_loop = (data_parallel.forward_loop(calib_part, batch_size=batch_size, device=device,
                                                     dtype=_torch_dtype(dtype), progress=not console.is_quiet(),
                                                     wrap=fast) if fast else forward_loop)
    else:
        forward_loop = calib_part.forward_loop(batch_size=batch_size, device=device, dtype=_torch_dtype(dtype),
                                               progress=not console.is_quiet())
        calibrate_loop = fast(forward_loop) if fast else forward_loop
    with torch.no_grad():
        with _quiet_stdout(), _naming_the_model(loaded):
            mtq.quantize(loaded.model, config, calibrate_loop)
            run_weight_algorithms(loaded.model, plan, forward_loop)
        finish_histogram_calibration(loaded.model, plan)
        # A FP16/BF16 graph holds dtype(amax / 448): make that the step PyTorch uses too (graph_scales.py).
        snap_fp8_amax(loaded.model, _torch_dtype(dtype))
    problems = _check_quantizers_reached(loaded.model, plan) + attention.verify_attention(
        loaded.model, [attention.AttentionConversion(**a) for a in plan.attention])
    if problems:
        raise QuantkitError("the quantized model does not match the plan:\n  " + "\n  ".join(problems))
    return plan


def quantize(loaded: LoadedModel, recipe: Recipe, calibration, *, dtype: str = "fp32",
             device: torch.device | str = "cpu", batch_size: int | None = None, strict: bool = False,
             per_layer: bool = True, reference: list[dict[str, torch.Tensor]] | None = None,
             data_parallel=None) -> QuantizeResult:
    """Quantize `loaded.model` in place under `recipe`, calibrated on `calibration`; evaluate on held-out data.

    `reference` (FP32 outputs on the held-out split) may be passed in when several recipes are
    tried on one model; per_layer keeps an FP32 copy of the model to compare layer by layer.
    With `data_parallel`, only the calibration is shared between ranks (see quantize_model); the
    reference and the evaluation run here, on the rank that calls this (rank 0).
    """
    from quantkit.layer_error import per_layer_error

    from quantkit.errors import require_positive

    require_positive("--batch-size", batch_size)
    device = torch.device(device)
    batch_size = batch_size or recipe.calibration.batch_size
    if isinstance(calibration, LoopCalibration):
        calib_part, heldout = calibration, calibration.heldout
    else:
        calib_part, heldout = split_calibration(calibration, recipe)
    timings: dict[str, float] = {}

    # The FP32 reference: the untouched model, before anything is converted.
    t0 = time.perf_counter()
    move_model(loaded.model, device, torch.float32)
    if reference is None and heldout is not None:
        reference = run_outputs(loaded, loaded.model, heldout, batch_size, device, "fp32", "reference (fp32)")
    reference_model = copy.deepcopy(loaded.model) if per_layer and heldout is not None else None
    if reference_model is not None:
        from quantkit import multihead

        multihead.expose_projections(reference_model)  # the same layer names as the prepared model
    timings["reference_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan = quantize_model(loaded, recipe, calib_part, dtype=dtype, device=device, batch_size=batch_size, strict=strict,
                          data_parallel=data_parallel)
    timings["quantize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = loaded.model
    candidate = (run_outputs(loaded, model, heldout, batch_size, device, dtype, "evaluate (quantized)")
                 if heldout is not None else [])
    metrics = compare_runs(reference, candidate) if heldout is not None else {}
    layers = []
    if reference_model is not None:
        layers = per_layer_error(reference_model, model, heldout, plan.layers, batch_size, device,
                                 torch.float32, _torch_dtype(dtype))
        del reference_model
    timings["evaluate_s"] = time.perf_counter() - t0
    return evaluated(loaded, recipe, plan, calibration, calib_part, heldout, model, metrics,
                     error_histograms(reference, candidate) if heldout is not None else {}, timings, dtype, device,
                     layers, reference)


def evaluated(loaded, recipe, plan, calibration, calib_part, heldout, model, metrics, histograms, timings,
              dtype, device, per_layer, fp32_outputs) -> QuantizeResult:
    """The QuantizeResult of a quantized model: its gate judged, what the report warns about."""
    from quantkit.metrics import Thresholds
    from quantkit.report.render import now

    thresholds = Thresholds.of_recipe(recipe)
    failures = []
    for name, m in metrics.items():
        failures += m.failures(thresholds, label=f"fake-quant/{name}")
    info = dict(calibration.info())
    info.update(samples_total=len(calibration), calibration_samples=len(calib_part),
                heldout_samples=len(heldout) if heldout is not None else 0)
    if not metrics:  # nothing held out (a forward_loop without example inputs): no gate can pass
        failures.append("not measured: no held-out samples to compare with the FP32 model (pass example_inputs "
                        "or calibration batches)")
    warnings = list(plan.warnings)
    if info.get("synthetic"):
        warnings.insert(0, "calibrated on SYNTHETIC data (--synthetic): accuracy numbers do not reflect real inputs")
    if torch.device(device).type == "cpu" and _needs_cuda_nvfp4(plan):
        warnings.append("NVFP4 was simulated on the CPU with quantkit's ModelOpt-equivalent kernel")
    return QuantizeResult(
        loaded, recipe, plan,
        model_info={"spec": loaded.spec, "class": type(model).__name__, "dtype": dtype, "device": str(device)},
        calibration=info, metrics=dict(metrics), histograms=histograms, thresholds=thresholds, failures=failures,
        warnings=warnings, quantizers=quantizer_counts(model), per_layer=per_layer, timings=timings, created=now(),
        versions=versions(), heldout=heldout, fp32_outputs=fp32_outputs)


# ---------------------------------------------------------------------------------------------
# Saving and reloading a run


def save_run(result: QuantizeResult, out: Path, model_spec: str, dtype: str) -> None:
    """Write plan.json, recipe.yaml, run.json, the ModelOpt state and the reports into `out`."""
    import modelopt.torch.opt as mto

    from quantkit.outdir import atomic_write_json, atomic_write_text

    # The gate is written out resolved: a later quantkit with other default thresholds must not
    # change this folder's verdict (`compare` judges by the saved recipe).
    atomic_write_text(out / "recipe.yaml", result.recipe.resolved().to_yaml())
    atomic_write_json(out / "plan.json", result.plan.to_dict())
    atomic_write_json(out / RUN_FILE, {"model": model_spec, "dtype": dtype, "recipe": "recipe.yaml",
                                       "input_names": result.loaded.input_names,
                                       "output_names": result.loaded.output_names, "versions": versions()})
    mto.save(result.loaded.model, str(out / STATE_FILE))
    from quantkit.report.render import write_quantize

    write_quantize(result, out)


@dataclasses.dataclass
class QuantizedRun:
    out_dir: Path
    loaded: LoadedModel
    recipe: Recipe
    plan: Plan
    dtype: str
    report: dict[str, Any]  # the folder's report.json as read (what later stages recorded in it included)
    heldout: Any = None  # not kept in a folder: rebuilt from the calibration set when needed
    fp32_outputs: list | None = None

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))

    def __bool__(self) -> bool:
        return self.passed


# Who may name code in a run folder: a `module:function` / `file.py:function` spec read from a
# run.json is imported only when the caller passes the model again or trusts the folder (a folder
# someone else made must not run code). Entry points (export, compare, the ONNX Runtime reference)
# set this for the loads they make, however deep.
_TRUST: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar("quantkit_trust", default=(None, False))


@contextlib.contextmanager
def model_trust(model: str | None = None, trust_model_code: bool | None = None):
    """Within the block, load_quantized uses `model` instead of run.json's spec, or trusts run.json's code.

    None leaves what an enclosing block says (by default: no model given, nothing trusted)."""
    outer_model, outer_trust = _TRUST.get()
    token = _TRUST.set((model or outer_model, outer_trust if trust_model_code is None else trust_model_code))
    try:
        yield
    finally:
        _TRUST.reset(token)


def read_run_record(out_dir: Path) -> dict[str, Any]:
    """run.json of a run folder, checked: a JSON object with a string `model` and a known `dtype`."""
    from quantkit.models import DTYPES
    from quantkit.textlimits import read_json_limited, shorten

    path = out_dir / RUN_FILE
    run = read_json_limited(path, "run record")
    if not isinstance(run, dict):
        raise InputError(f"{path}: corrupt run record (a JSON object with 'model' and 'dtype', got a "
                         f"{type(run).__name__}); re-run `quantize --out {out_dir}`")
    if not isinstance(run.get("model"), str) or not run["model"]:
        raise InputError(f"{path}: corrupt run record: field 'model' is missing or not a model spec "
                         f"({shorten(run.get('model'))}); re-run `quantize --out {out_dir}` or pass --model")
    if run.get("dtype") not in DTYPES:
        raise InputError(f"{path}: corrupt run record: field 'dtype' is {shorten(run.get('dtype'))}, expected one of "
                         f"{', '.join(DTYPES)}")
    return run


def run_model_spec(out_dir: Path, stored: str, model: str | None = None, trust_model_code: bool = False) -> str:
    """The spec to load a run's model from; refuses code named by the folder unless trusted."""
    from quantkit.models import is_code_spec
    from quantkit.textlimits import shorten

    if model:
        return model
    if is_code_spec(stored) and not trust_model_code:
        raise InputError(f"{out_dir / RUN_FILE}: names the model {shorten(stored)}, which is Python code to import "
                         "and run; quantkit does not run code named by a folder. Pass --model with that spec again "
                         "(or --trust-model-code if you made this folder or trust who did)")
    return stored


def restore_state(model: nn.Module, state_file: Path, spec: str) -> None:
    """mto.restore with torch.load(weights_only=True) said explicitly, so no environment variable turns
    the pickle check off; the allow-list is scoped to this call (ModelOpt's states hold slices)."""
    import modelopt.torch.opt as mto

    try:
        with torch.serialization.safe_globals([slice]), _quiet_stdout():
            mto.restore(model, str(state_file), weights_only=True)
    except QuantkitError:
        raise
    except Exception as e:  # truncated, not a ModelOpt state, or another model's: many exception types
        from quantkit.textlimits import first_line

        raise InputError(f"{state_file}: cannot be restored onto the model {spec} ({type(e).__name__}: "
                         f"{first_line(e)}); it is truncated, not a ModelOpt state, or another model's "
                         "(re-run `quantize --out` for this folder)") from None


def _quiet_stdout():
    # ModelOpt prints its own progress lines ("Inserted N quantizers", SmoothQuant counts) to
    # stdout; --quiet means quiet.
    return contextlib.redirect_stdout(io.StringIO()) if console.is_quiet() else contextlib.nullcontext()


def load_quantized(out_dir: str | Path, device: str | torch.device = "cpu", *, model: str | None = None,
                   trust_model_code: bool | None = None, loaded: LoadedModel | None = None) -> QuantizedRun:
    """Rebuild a `quantize` output folder's model: same model, same preparation, ModelOpt state restored.

    A code spec (`module:function`, `file.py:function`) in run.json is imported only with `model`
    given again or `trust_model_code` (default: what the enclosing `model_trust` block says).
    `loaded` is a fresh, unquantized copy of the model instead (a model quantized from Python: run.json
    then says `python:<class>`)."""
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    if not run_file.is_file() or not (out_dir / STATE_FILE).is_file():
        raise InputError(f"{out_dir}: not a quantize output folder (needs {RUN_FILE} and {STATE_FILE}); "
                         "run `quantize --out` first")
    scoped_model, scoped_trust = _TRUST.get()
    model = model or scoped_model
    trust_model_code = scoped_trust if trust_model_code is None else trust_model_code
    run = read_run_record(out_dir)
    recipe = load_recipe(out_dir / "recipe.yaml")
    if loaded is None:
        if str(run["model"]).startswith(PYTHON_SPEC) and not model:
            raise InputError(f"{out_dir}: the model ({run['model']}) was quantized from Python; pass a fresh instance "
                             "of it: quantkit.load(folder, model=...)")
        spec = run_model_spec(out_dir, run["model"], model, trust_model_code)
        loaded = load_model(spec)
    else:
        spec = loaded.spec
    device = torch.device(device)
    plan = prepare(loaded, recipe, run["dtype"], device)
    enable_cpu_nvfp4_if_needed(loaded.model, plan, device)
    restore_state(loaded.model, out_dir / STATE_FILE, spec)
    loaded.model.to(device)
    report = {}
    if (out_dir / "report.json").is_file():
        from quantkit.textlimits import read_json_limited

        report = read_json_limited(out_dir / "report.json", "report")
        report = report if isinstance(report, dict) else {}
    return QuantizedRun(out_dir, loaded, recipe, plan, run["dtype"], report)


# ---------------------------------------------------------------------------------------------
# CLI glue (called by quantkit.cli)


PYTHON_SPEC = "python:"  # run.json's model spec for a model handed to quantkit.quantize as an object


def _default_out(recipe: str, model: str | None) -> Path:
    model_name = Path(model).name if model else "minilm"
    model_name = model_name.replace(":", "-").replace("/", "-")
    return Path("runs") / f"{Path(recipe).stem}-{model_name}"


def output_folder(args) -> Path:
    """--out, else runs/<recipe>-<model>."""
    return Path(args.out) if args.out else _default_out(args.recipe, args.model)


def calibration_summary(calibration) -> str:
    return (f"calibration: {len(calibration)} samples from {calibration.info().get('source')}"
            + (" (SYNTHETIC)" if calibration.synthetic else ""))


FAILED_SUFFIX = ".failed"


def failed_beside(out: Path) -> Path:
    """Where a run that misses its gate goes when `out` holds a passing run (kept unless --force)."""
    return out.with_name(out.name + FAILED_SUFFIX)


def holds_passing_run(out: Path) -> bool:
    from quantkit.outdir import is_quantkit_output
    from quantkit.textlimits import read_json_limited

    if not is_quantkit_output(out) or not (out / "report.json").is_file():
        return False
    try:
        report = read_json_limited(out / "report.json", "report")
    except InputError:
        return False
    return isinstance(report, dict) and report.get("passed") is True


def check_quantize_output(out: Path, calib: str | None = None, force: bool = False) -> None:
    """Before any work: `out` is a folder quantize may replace (quantkit.outdir.check_output), and so is
    the folder beside it that a failing run would go to when `out` holds a passing one."""
    from quantkit.outdir import check_output

    check_output(out, protect=[calib])
    if not force and holds_passing_run(out):
        check_output(failed_beside(out), what="--out (for a failing run)", protect=[calib])


def write_run(result: QuantizeResult, out: Path, model_spec: str, dtype: str, *, force: bool = False,
              protect=()) -> Path:
    """Save the run into `out` atomically (staged, then renamed), then print its tables and verdict.

    A run that misses its gate does not replace a passing run in `out` (unless `force`): it is
    written beside it, to OUT.failed. Returns the folder written."""
    from quantkit.outdir import OutputFolder

    target = out
    if not result.passed and not force and holds_passing_run(Path(out)):
        target = failed_beside(Path(out))
    with OutputFolder.staged(target, protect=protect) as tmp:
        save_run(result, tmp, model_spec, dtype)
    show_result(result, target, kept=out if target != out else None)
    return target


def show_result(result: QuantizeResult, out: Path, kept: Path | None = None) -> None:
    """The warnings, coverage and accuracy tables and the verdict, printed last."""
    report = result.report
    for w in report["warnings"]:
        console.warn(w)
    console.show(console.coverage_table(report["coverage"]),
                 console.metrics_table(report["metrics"], report["thresholds"].get("cosine_min")))
    verdict = "PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"])
    # Printed under --quiet too: the verdict is the result (the exit code says the same, 0 or 1).
    print(f"{verdict} · results in {out}/ (report.json, report.md, report.html, plan.json, {STATE_FILE})")
    if kept is not None:
        print(f"the previous passing result in {kept}/ is kept; this failing run is in {out}/ "
              "(--force replaces the previous result)")
