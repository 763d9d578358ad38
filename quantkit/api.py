"""The public Python API: quantize a model inside your own process, then inspect, save, export,
compare and reload it. The command line (quantkit.cli) is a thin caller of these functions.

    qm = quantkit.quantize(model, recipe="fp8", calibration=loader)   # a DataLoader of your batches
    assert qm.report, qm.report.failures                              # truthy when the gate passed
    qm.save("runs/policy-fp8"); result = qm.export("runs/policy-fp8")   # result: truthy when the audit is clean

What quantkit changes outside the model (transformers' attention registry, ModelOpt's module
registry, rotary functions in modeling files, the model's attention implementation) lives as long
as the quantized model does and is undone when it is garbage-collected, or at once by
`QuantizedModel.close()` / the end of its `with` block (quantkit.patches).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from quantkit import patches
from quantkit.errors import CalibrationError, InputError, ModelSpecError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantkit.calib import CalibrationSet
    from quantkit.compare import Comparison
    from quantkit.export.audit import PrecisionAudit
    from quantkit.export.onnx_export import ExportResult
    from quantkit.models import LoadedModel
    from quantkit.plan import Plan
    from quantkit.recipe import Recipe

__all__ = ["QuantizedModel", "QuantizeReport", "audit", "collect", "load", "plan", "quantize"]


# ---------------------------------------------------------------------------------------------
# What the user hands in: a model, a recipe, calibration data


def _recipe(recipe: "str | os.PathLike | Recipe") -> "Recipe":
    from quantkit.recipe import Recipe, load_recipe

    return recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))


def _positional_names(module: "nn.Module") -> list[str]:
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _named(module: "nn.Module", batch: Any, where: str) -> dict[str, Any]:
    """A batch as the keyword arguments of `module.forward`: a dict as it is, a tuple/list or a tensor
    matched to forward's positional parameters in order."""
    import torch

    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, (tuple, list)):
        names = _positional_names(module)
        if len(batch) > len(names):
            raise CalibrationError(f"{where}: a batch of {len(batch)} values, but {type(module).__name__}.forward "
                                   f"takes {len(names)} positional argument(s) ({', '.join(names)})")
        return dict(zip(names, batch))
    raise CalibrationError(f"{where}: a batch is a dict of name -> tensor, a tuple of tensors or a tensor; got "
                           f"{type(batch).__name__}")


def _loaded(model: "nn.Module | LoadedModel | str", example: dict[str, Any] | None) -> "LoadedModel":
    from torch import nn

    from quantkit.models import LoadedModel, _output_names, load_model
    from quantkit.ptq import PYTHON_SPEC

    if isinstance(model, LoadedModel):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(None if model is None else str(model))  # None: the default built-in model
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"quantize: model must be an nn.Module, a quantkit.models.LoadedModel or a model spec "
                             f"(built-in name, model folder, package.module:function); got {type(model).__name__}")
    spec = f"{PYTHON_SPEC}{type(model).__module__}.{type(model).__qualname__}"
    model.eval()
    loaded = LoadedModel(spec=spec, model=model, input_names=list(example or {}), output_names=["output"],
                         example_inputs=example)
    if example:
        loaded.output_names = _output_names(spec, model, example)
    return loaded


def _calibration(calibration: Any, loaded: "LoadedModel", recipe: "Recipe"):
    """A CalibrationSet (or a ptq.LoopCalibration) from what `quantize(calibration=...)` accepts."""
    from quantkit import ptq
    from quantkit.calib import BATCHING_CALLS, CalibrationSet, Sample

    if calibration is None:
        return ptq.open_calibration(loaded, None, False, recipe.calibration.max_samples)
    if isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, (str, os.PathLike)):
        return CalibrationSet.open(calibration)
    if callable(calibration) and not hasattr(calibration, "__iter__"):
        heldout = None
        if loaded.example_inputs:
            heldout = CalibrationSet.from_samples([Sample((), dict(loaded.example_inputs))],
                                                  {"source": "example_inputs (Python)", "batching": BATCHING_CALLS})
        return ptq.LoopCalibration(calibration, heldout)
    if not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration: a CalibrationSet, a set folder, an iterable of batches (e.g. a "
                               f"DataLoader) or a forward_loop(model) callable; got {type(calibration).__name__}")
    where = f"calibration ({type(calibration).__name__})"
    batches = [_named(loaded.model, b, where) for b in calibration]
    if not batches:
        raise CalibrationError(f"{where}: yielded no batch")
    # One sample per batch, replayed as the loader made it (BATCHING_CALLS): quantkit never re-batches it.
    return CalibrationSet.from_samples([Sample((), b) for b in batches],
                                       {"source": f"{type(calibration).__name__} of {len(batches)} batches (Python)",
                                        "batching": BATCHING_CALLS})


# ---------------------------------------------------------------------------------------------
# Results


class QuantizeReport:
    """The report of a quantization (what report.json holds), read through attributes.

    Truthy when the recipe's accuracy gate passed on the held-out samples; `failures` says why not."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def passed(self) -> bool:
        return bool(self.data.get("passed"))

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failures(self) -> list[str]:
        return list(self.data.get("failures", []))

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """runtime -> output -> quantkit.metrics.Metrics against the FP32 model."""
        from quantkit.metrics import Metrics

        return {runtime: {out: Metrics.from_dict(m) for out, m in outputs.items()}
                for runtime, outputs in (self.data.get("metrics") or {}).items()}

    @property
    def cosine(self) -> float:
        """The worst fake-quant output cosine against FP32 (nan when nothing was measured)."""
        values = [m.cosine for m in self.metrics.get("fake-quant", {}).values()]
        return min(values) if values else float("nan")

    @property
    def recipe_sha256(self) -> str:
        return self.data["recipe"]["sha256"]

    @property
    def warnings(self) -> list[str]:
        return list(self.data.get("warnings", []))

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def __repr__(self) -> str:
        verdict = "passed" if self else "FAILED: " + "; ".join(self.failures)
        return f"QuantizeReport(cosine={self.cosine:.6f}, {verdict})"


class QuantizedModel:
    """A model quantized by `quantize` (or rebuilt by `load`): `.model` is the quantized nn.Module.

    What quantkit changed outside the model (quantkit.patches) belongs to the model: it stays in
    force while `.model` is alive, whether or not this object is, and is undone when the model is
    garbage-collected. `close()`, or the end of a `with` block, undoes it at once: the model then
    runs unquantized attention, so use it inside the block."""

    def __init__(self, result, *, dtype: str, device: Any, saved_to: Path | None = None):
        self._result = result
        self.dtype = dtype
        self.device = device
        self.saved_to = saved_to
        # No finalizer here: the model holds its changes (patches.of_model) and undoes them when it is
        # collected, so dropping this object while the caller keeps `.model` leaves the model routed.

    @property
    def result(self):
        """The stage result underneath: quantkit.ptq.QuantizeResult (from `quantize`) or ptq.QuantizedRun
        (from `load`, whose report is the folder's report.json)."""
        return self._result

    @property
    def model(self) -> "nn.Module":
        return self._result.loaded.model

    @property
    def loaded(self) -> "LoadedModel":
        return self._result.loaded

    @property
    def plan(self) -> "Plan":
        return self._result.plan

    @property
    def recipe(self) -> "Recipe":
        return self._result.recipe

    @property
    def report(self) -> QuantizeReport:
        return QuantizeReport(self._result.report)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def save(self, out: str | os.PathLike) -> Path:
        """Write the run folder (recipe.yaml, plan.json, modelopt_state.pth, run.json, report.json/.md/.html)
        atomically: an interrupted save leaves what was in `out` before."""
        from quantkit.outdir import OutputFolder
        from quantkit.ptq import save_run

        out = Path(out)
        with OutputFolder.staged(out) as tmp:
            save_run(self._result, tmp, self.loaded.spec, self.dtype)
        self.saved_to = out
        return out

    def export(self, out: str | os.PathLike | None = None, *, audit: bool = True, reference: bool = True,
               dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int | None = None,
               weights_dtype: str | None = None, reference_samples: int | None = None,
               compile_check: bool = False, targets: list[str] | None = None) -> "ExportResult":
        """Export to OUT/model.onnx (+ export.json), audit the graph's precisions against the plan
        (OUT/audit.json) and, with `reference`, run it on ONNX Runtime against this model and the FP32
        one on the held-out samples (at most `reference_samples`; into OUT/report.json). With
        `compile_check`, TensorRT's (or TensorRT-RTX's) parser and builder take the graph for `targets`
        (default: the recipe's), recorded in report.json. OUT defaults to the folder `save` wrote (or
        `load` read); a new one is saved first. The result is truthy when the audit is clean; its
        `reference` and `compile_check` say the rest."""
        from quantkit import console
        from quantkit.export.onnx_export import export_run
        from quantkit.ptq import QuantizedRun

        out = Path(out) if out is not None else self.saved_to
        if out is None:
            raise InputError("export: give a folder (qm.export('runs/name')) or save() first")
        if self.saved_to is None or Path(self.saved_to).resolve() != out.resolve():
            self.save(out)
        run = QuantizedRun(out, self.loaded, self.recipe, self.plan, self.dtype, self._result.report)
        result = export_run(out, dynamic_axes=dynamic_axes, opset=opset, weights_dtype=weights_dtype, audit=audit,
                            run=run)
        # A model loaded from a folder has no held-out samples in memory: the reference rebuilds them
        # from the folder's calibration set, as `quantize` split it.
        loaded_from_folder = isinstance(self._result, QuantizedRun)
        if reference and (loaded_from_folder or self._result.heldout is not None):
            import torch

            from quantkit.ptq import model_trust
            from quantkit.verify.ort_copy import UnsupportedGraph
            from quantkit.verify.reference import reference_run

            # The reference feeds CPU batches: a model elsewhere is rebuilt on the CPU for it, from the
            # spec this one was loaded from (already trusted when it was loaded).
            on_cpu = torch.device(self.device).type == "cpu"
            try:
                with model_trust(None if on_cpu else self.loaded.spec):
                    result.reference = reference_run(out, max_samples=reference_samples, run=run if on_cpu else None,
                                                     heldout=self._result.heldout,
                                                     fp32_outputs=self._result.fp32_outputs)
            except UnsupportedGraph as e:  # the graph is written and audited; only the cross-check cannot run
                console.warn(f"ONNX Runtime reference skipped: {e}. {out}/model.onnx is written and audited; "
                             "a TensorRT build may still take it")
        if compile_check:
            from quantkit.verify.compile_check import check_export

            result.compile_check = check_export(out, target_names=targets or None)
        return result

    def compare(self, against: str = "fp32", runtimes: list[str] | None = None, *, max_samples: int | None = None,
                batch_size: int | None = None, device: Any = None) -> "Comparison":
        """Run every runtime available for the saved folder (fp32, fake-quant, onnxruntime after export,
        tensorrt after a build) on its held-out samples against `against`; see `quantkit compare`."""
        from quantkit import compare as compare_mod
        from quantkit.ptq import resolve_device

        if self.saved_to is None:
            raise InputError("compare: save() the model first (compare reads the run folder)")
        return compare_mod.compare(self.saved_to, against=against, runtimes=runtimes, max_samples=max_samples,
                                   batch_size=batch_size, device=resolve_device(device))

    def close(self) -> None:
        """Undo what quantkit changed outside the model now, instead of when the model is collected."""
        patches.release(self.model)

    def __enter__(self) -> "QuantizedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QuantizedModel({self.loaded.spec}, recipe {self.recipe.name}, {self.dtype}, {self.report!r})"


# ---------------------------------------------------------------------------------------------
# The verbs


def quantize(model: "nn.Module | LoadedModel | str", recipe: "str | os.PathLike | Recipe" = "balanced",
             calibration: Any = None, example_inputs: Any = None, device: "str | torch.device | None" = None,
             dtype: str | None = None, *, batch_size: int | None = None, strict: bool = False,
             per_layer: bool = True, data_parallel: Any = None) -> QuantizedModel:
    """Quantize `model` in place under `recipe`, calibrated on `calibration`, and evaluate it.

    model: an nn.Module (its forward may take several tensors), a quantkit.models.LoadedModel, or a
      model spec as the CLI takes it (built-in name, model folder, package.module:function).
    recipe: a shipped recipe name, a YAML path or a quantkit.recipe.Recipe.
    calibration: a CalibrationSet, a set folder (`quantkit collect`), an iterable of batches (a
      DataLoader; each batch a dict of name -> tensor, a tuple of tensors or a tensor), or a callable
      forward_loop(model). Batches are held out for the evaluation by the recipe's heldout_fraction;
      a forward_loop has none, so the evaluation runs on example_inputs. None: the model's built-in set.
    example_inputs: a dict, tuple or tensor the model runs on (names the inputs of a plain nn.Module;
      the first calibration batch does otherwise).
    device: "cpu", "cuda[:N]" (default: cuda if available). dtype: "fp32" (default), "fp16", "bf16".
    Returns a QuantizedModel; `.report` is truthy when the recipe's accuracy gate passed.
    """
    from quantkit import ptq

    recipe = _recipe(recipe)
    from torch import nn

    base = getattr(model, "model", model)  # a LoadedModel's module
    example = None
    if example_inputs is not None and isinstance(base, nn.Module):
        example = _named(base, example_inputs, "example_inputs")
    loaded = _loaded(model, example)
    calib = _calibration(calibration, loaded, recipe)
    if not loaded.input_names and not isinstance(calib, ptq.LoopCalibration):
        first = calib[0]  # name the inputs after the first batch: export and the reports need names
        loaded.input_names = list(first.kwargs)
        loaded.example_inputs = dict(first.kwargs)
        from quantkit.models import _output_names

        loaded.output_names = _output_names(loaded.spec, loaded.model, loaded.example_inputs)
    device = ptq.resolve_device(device) if not hasattr(device, "type") else device
    dtype = dtype or "fp32"
    from quantkit.placement import is_dispatched

    result = ptq.quantize(loaded, recipe, calib, dtype=dtype, device=device, batch_size=batch_size, strict=strict,
                          per_layer=per_layer and not is_dispatched(loaded.model), data_parallel=data_parallel)
    return QuantizedModel(result, dtype=dtype, device=device)


def load(folder: str | os.PathLike, model: "nn.Module | LoadedModel | str | None" = None,
         device: "str | torch.device" = "cpu", *, trust_model_code: bool | None = None) -> QuantizedModel:
    """Rebuild a saved run (`QuantizedModel.save`, `quantkit quantize --out`) without calibration data.

    `model`: a fresh, unquantized instance of the model, needed when it was quantized from Python
    (its folder cannot name a loader for it), or a model spec to load instead of the folder's.
    A folder whose run.json names Python code (`module:function`) runs it only with that spec passed
    again or `trust_model_code=True` (quantkit.ptq.load_quantized)."""
    import json

    from quantkit import ptq

    if model is None or isinstance(model, str):
        run = ptq.load_quantized(folder, device, model=model, trust_model_code=trust_model_code)
        return QuantizedModel(run, dtype=run.dtype, device=device, saved_to=Path(folder))
    loaded = _loaded(model, None)
    if not loaded.input_names:
        run_file = Path(folder) / ptq.RUN_FILE
        if run_file.is_file():
            run = json.loads(run_file.read_text())
            loaded.input_names, loaded.output_names = run["input_names"], run["output_names"]
    run = ptq.load_quantized(folder, device, loaded=loaded)
    return QuantizedModel(run, dtype=run.dtype, device=device, saved_to=Path(folder))


def plan(model: "nn.Module | LoadedModel | str", recipe: "str | os.PathLike | Recipe" = "balanced",
         dtype: str | None = None, *, strict: bool = False) -> "Plan":
    """Which layer gets which precision under `recipe`, and why; protections and attention conversions.

    The model is left as it is: the plan is made on a copy (for a spec, on a freshly loaded model)."""
    import copy

    from quantkit import ptq

    recipe = _recipe(recipe)
    if model is None or isinstance(model, (str, os.PathLike)):
        loaded = _loaded(model, None)
    else:
        original = _loaded(model, None)
        loaded = copy.copy(original)
        loaded.model = copy.deepcopy(original.model)
    try:
        return ptq.prepare(loaded, recipe, dtype or "fp32", "cpu", strict=strict)
    finally:
        patches.release(loaded.model)


def audit(graph: str | os.PathLike, plan: "str | os.PathLike | None" = None, *, against_plan: bool = True,
          out: str | os.PathLike | None = None) -> "PrecisionAudit":
    """Read an exported graph's precisions (Q/DQ per layer, softmax, norms, RoPE) and check them against
    a plan.json: `plan`, else the one beside the graph if there is one (`against_plan=False`: report
    only). Writes audit.json to `out` (default: beside the graph). Truthy without violations."""
    from quantkit.export.audit import audit as audit_graph, read_plan, write_audit

    path = Path(graph)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    plan_path = Path(plan) if plan else path.parent / "plan.json"
    plan_dict = None
    if against_plan and plan_path.is_file():
        plan_dict = read_plan(plan_path)
    elif plan and against_plan:
        raise InputError(f"{plan_path}: no such plan file")
    result = audit_graph(path, plan_dict)
    write_audit(result, Path(out) if out else path.parent / "audit.json")
    return result


def collect(model: str | None, out: str | os.PathLike, *, data: str | None = None, module: str | None = None,
            **options: Any) -> "CalibrationSet":
    """Record the real inputs of `model` (a model spec) or of one submodule over a data source into a
    calibration set folder `out` (shards + manifest); returns the set. Options as `quantkit collect`:
    field, split, runner, max_samples, batch_size, shard_size, resume, overwrite, synthetic, seed,
    device, dtype, progress."""
    import importlib

    collect_mod = importlib.import_module("quantkit.collect")  # the module; quantkit.collect is this function
    from quantkit.calib import CalibrationSet

    collect_mod.collect(model, out, data=data, module=module, **options)
    return CalibrationSet.open(out)

