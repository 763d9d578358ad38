"""ONNX export of a quantized run: ModelOpt's exporter, quantkit's graph surgery, model.onnx + export.json.

`export_run(OUT)` rebuilds the quantized model of a `quantize` output folder, exports it through
ModelOpt (`modelopt.torch._deploy.utils.get_onnx_bytes_and_metadata`), applies the surgery a
strongly-typed TensorRT build needs (quantkit.export.surgery), and writes OUT/model.onnx (with
OUT/model.onnx.data past protobuf's 2 GB), and OUT/export.json: names, shapes with dynamic dims,
dtypes, opset, the oldest TensorRT that builds it, file sizes and exporter versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import onnx
import torch
from torch import nn

from quantkit import console
from quantkit.errors import ExportError, InputError
from quantkit.compat.modelopt import EXPORTER_NAME
from quantkit.export.graph import MODULE_NAMES_KEY, SCOPE_PREFIX_KEY, dtype_name
from quantkit.io_names import OUTPUT_NAMES_KEY, graph_output_names, renamed_outputs
from quantkit.export.surgery import SurgeryLog, prepare_for_tensorrt, set_metadata
from quantkit.recipe import Precision

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
EXPORT_JSON = "export.json"
AUDIT_JSON = "audit.json"
# protobuf cannot serialize a message of 2 GiB or more; stay clear of it (the graph itself adds bytes).
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
# Initializers at least this large go to the external data file when external data is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024
# Lowest opset each quantized format needs (FP8/INT8 with 16-bit scales: QuantizeLinear-19; FP4: 23).
FORMAT_MIN_OPSET = {Precision.FP8: 19, Precision.INT8: 19, Precision.NVFP4: 23}
BASE_OPSET = 17
_WRAPPER_ATTR = "model"


@dataclasses.dataclass
class ExportResult:
    """What `export_run` wrote: the graph's path and the export.json content, its precision audit, and
    (from `quantkit.QuantizedModel.export`) the ONNX Runtime reference and the compile check of the graph.
    Truthy when the audit is clean (an export without an audit is not vouched for)."""

    out_dir: Path
    onnx_path: Path
    info: dict[str, Any]
    surgery: SurgeryLog
    audit: Any = None  # the PrecisionAudit of the graph, when export_run(audit=True)
    reference: Any = None  # verify.reference.ReferenceResult (quantkit.QuantizedModel.export)
    compile_check: Any = None  # verify.compile_check.CompileCheck (QuantizedModel.export(compile_check=True))

    def __bool__(self) -> bool:
        return self.audit is not None and bool(self.audit)

    @property
    def external_data(self) -> bool:
        return bool(self.info.get("external_data"))


# ---------------------------------------------------------------------------------------------
# the module that is exported


def _exportable(model: nn.Module, input_names: list[str], output_names: list[str], read_outputs,
                model_dtype: torch.dtype, io_dtype: torch.dtype) -> nn.Module:
    """A module with a forward(<input names>) signature returning a tuple of outputs.

    ModelOpt names the graph inputs after the forward's parameters, so the signature is generated
    with the real input names. Float inputs arrive in the recipe's io_dtype and are cast to the
    model's dtype; float outputs are cast to io_dtype: the casts are explicit in the graph.
    """
    for name in input_names:
        if not name.isidentifier():
            raise ExportError(f"input name {name!r} is not a Python identifier; rename the model's inputs")
    params = ", ".join(input_names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self._run({params})\n", namespace)  # noqa: S102

    def run(self, *args):
        args = [a.to(model_dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        outputs = read_outputs(getattr(self, _WRAPPER_ATTR)(**dict(zip(input_names, args))))
        return tuple(outputs[n].to(io_dtype) if outputs[n].is_floating_point() else outputs[n] for n in output_names)

    cls = type("QuantkitExport", (nn.Module,), {"forward": namespace["forward"], "_run": run})
    wrapper = cls()
    setattr(wrapper, _WRAPPER_ATTR, model)
    # torch.onnx.export restores the top module's training flag afterwards, recursively: a wrapper
    # left in training mode would switch dropout on in the model after the export.
    return wrapper.eval()


def default_opset(plan_layers: list[dict], attention_precision: str | None) -> int:
    used = set()
    for row in plan_layers:
        for key in ("weights", "activations"):
            if row.get(key):
                used.add(Precision(row[key]))
    if attention_precision and attention_precision != "skip":
        used.add(Precision(attention_precision))
    return max([BASE_OPSET] + [FORMAT_MIN_OPSET[p] for p in used if p in FORMAT_MIN_OPSET])


def default_dynamic_axes(input_names: list[str], output_names: list[str], example: Mapping[str, torch.Tensor],
                         profiles: Mapping[str, Any] | None = None, sequence_model: bool = False) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output is `batch`; for token models axis 1 is `sequence`; a build
    profile whose min and max differ on a dimension makes that dimension dynamic too."""
    axes: dict[str, dict[int, str]] = {}
    for name in input_names:
        rank = example[name].dim()
        if rank == 0:
            continue
        dims = {0: "batch"}
        if sequence_model and rank >= 2:
            dims[1] = "sequence"
        profile = (profiles or {}).get(name)
        if profile is not None:
            for i, (lo, hi) in enumerate(zip(profile.min, profile.max)):
                if lo != hi and i < rank:
                    dims.setdefault(i, f"{name}_dim{i}")
        axes[name] = dims
    # keyed by graph name: an output named like an input has another one there (io_names)
    for name in graph_output_names(input_names, output_names):
        axes[name] = {0: "batch", 1: "sequence"} if sequence_model else {0: "batch"}
    return axes


def _consistent_output_axes(axes: dict[str, dict[int, str]], example: Mapping[str, torch.Tensor],
                            outputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Keep an output's named dynamic axis only where its size equals an input dimension of that name
    (a pooled [batch, hidden] output has no `sequence` axis even in a token model)."""
    sizes: dict[str, set[int]] = {}
    for name, dims in axes.items():
        if name in example:
            for i, d in dims.items():
                if int(i) < example[name].dim():
                    sizes.setdefault(d, set()).add(int(example[name].shape[int(i)]))
    out = {}
    for name, dims in axes.items():
        if name not in outputs:
            out[name] = dims
            continue
        t = outputs[name]
        out[name] = {int(i): d for i, d in dims.items()
                     if int(i) < t.dim() and (d not in sizes or int(t.shape[int(i)]) in sizes[d])}
    return out


def _static_output_dims(model: onnx.ModelProto, outputs: Mapping[str, torch.Tensor],
                        axes: Mapping[str, Mapping[int, str]], example: Mapping[str, torch.Tensor]) -> None:
    """Output dims the exporter left as generated symbols ('Castout.0_dim_2', shape inference stops at
    TensorRT's custom ops) get the traced size, unless that size is also a dynamic input dim's size."""
    dynamic_sizes = {int(example[n].shape[int(i)]) for n, dims in axes.items() if n in example
                     for i in dims if int(i) < example[n].dim()}
    for vi in model.graph.output:
        t = outputs.get(vi.name)
        if t is None:
            continue
        declared = {int(i) for i in axes.get(vi.name, {})}
        for i, dim in enumerate(vi.type.tensor_type.shape.dim):
            if i >= t.dim() or i in declared or not dim.HasField("dim_param"):
                continue
            if int(t.shape[i]) not in dynamic_sizes:
                dim.Clear()
                dim.dim_value = int(t.shape[i])


def _modelopt_names(axes: dict[str, dict[int, str]], output_names: list[str], ranks: dict[str, int]) -> dict:
    """ModelOpt names outputs out.0, out.1...: translate our output names; drop axes past the rank."""
    out = {}
    for name, dims in axes.items():
        key = f"out.{output_names.index(name)}" if name in output_names else name
        rank = ranks.get(name)
        out[key] = {int(i): str(d) for i, d in dims.items() if rank is None or int(i) < rank}
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """ModelOpt and onnx-graphsurgeon print and warn a lot; keep it out of quantkit's output."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx", "onnx_graphsurgeon")]
    levels = [lg.level for lg in loggers]
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # graphsurgeon's folding sessions print optimizer notices
    except ImportError:
        pass
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # torch's C++ exporter writes its warnings (custom-op shape inference) straight to fd 2.
    err_file = tempfile.TemporaryFile(mode="w+b")
    saved_fd = None
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(err_file.fileno(), 2)
    except (OSError, ValueError):
        saved_fd = None
    try:
        with warnings.catch_warnings(), redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        err_file.seek(0)
        for line in err_file.read().decode(errors="replace").splitlines():
            log.debug("exporter stderr: %s", line)
        err_file.close()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    for line in buf.getvalue().splitlines():
        log.debug("exporter: %s", line)


@contextlib.contextmanager
def _initializers_per_parameter():
    """torch.onnx (TorchScript) merges initializers of equal value in eval mode: the deep-copied, identical
    layers of an nn.TransformerEncoder share one, the others read it through an Identity, and ModelOpt's
    NVFP4/INT4 weight passes (which look a quantized weight's initializer up by name) fail. Merging only
    tensors that share storage (torch's training-mode rule) keeps each parameter its own initializer and
    still gives tied weights one. Scoped to one export."""
    from quantkit.compat.torch_onnx import initializer_dedup_pass

    space, name = initializer_dedup_pass()
    original = getattr(space, name)

    def by_storage(graph, params_dict, is_train):
        return original(graph, params_dict, True)

    setattr(space, name, by_storage)
    try:
        yield
    finally:
        setattr(space, name, original)


_MISSING_WEIGHT = re.compile(r"Initializer for weight '([^']+)' not found")


def _exporter_failure(e: AssertionError) -> ExportError:
    """ModelOpt's ONNX passes fail by assertion; one line naming the layer, and what to do."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = _MISSING_WEIGHT.search(msg)
    if m:
        layer = m.group(1).removeprefix("model.").removesuffix(".weight")
        return ExportError(f"layer {layer}: ModelOpt's ONNX exporter found no weight initializer for it ({msg}); "
                           f"its weight is not a plain parameter in the graph: skip the layer in the recipe "
                           "(precision: skip) or choose a format without weight compression (fp8, fp16)")
    return ExportError(f"ModelOpt's ONNX exporter failed: {msg}")


def _is_fp8(quantizer: Any) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return (isinstance(quantizer, TensorQuantizer) and quantizer.is_enabled and quantizer.num_bits == (4, 3)
            and not quantizer.block_sizes)


def _fp8_export_fixes(model: nn.Module):
    """ModelOpt's FP8 post-processing, run for models whose only FP8 quantizers are quantkit's
    attention-matmul ones, and kept off the Convs the plan leaves unquantized (compat.modelopt)."""
    from quantkit.compat.modelopt import fp8_export_fixes

    any_fp8 = any(_is_fp8(m) for m in model.modules())
    convs = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    # The exporter names a Conv's weight initializer after the parameter, except where it folded a
    # BatchNorm into the Conv (new weights, new name): only the named weights of quantized Convs get Q/DQ.
    quantized = {f"{name}.weight" for name, m in convs.items()
                 if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)}
    return fp8_export_fixes(any_fp8, quantized)


def _modelopt_export(wrapper: nn.Module, args: tuple, opset: int, dynamic_axes: dict, weights_dtype: str,
                     workdir: Path) -> Path:
    from quantkit.compat.modelopt import onnx_exporter, sequential_cast_fix
    from quantkit.export.symbolics import patched_symbolics

    get_onnx_bytes_and_metadata, OnnxBytes = onnx_exporter()

    with patched_symbolics(), _fp8_export_fixes(wrapper), _initializers_per_parameter(), sequential_cast_fix(), \
            _quiet_exporter():
        try:
            onnx_bytes, _ = get_onnx_bytes_and_metadata(wrapper, args, model_name="model",
                                                         dynamic_axes=dynamic_axes, onnx_opset=opset,
                                                         weights_dtype=weights_dtype)
        except AssertionError as e:
            raise _exporter_failure(e) from None
        files = OnnxBytes.from_bytes(onnx_bytes)
        del onnx_bytes
        files.write_to_disk(str(workdir), clean_dir=False)
    path = workdir / f"{files.model_name}.onnx"
    if not path.is_file():
        raise ExportError(f"ModelOpt's exporter wrote no {path.name} (got {sorted(files.onnx_model)})")
    return path


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * 4
    return total


def save_model(model: onnx.ModelProto, path: Path, force_external: bool = False) -> bool:
    """Save `model` at `path`; past the protobuf limit the weights go to `<name>.data` beside it.
    Returns whether external data was used. Written under temporary names, then renamed."""
    path = Path(path)
    external = force_external or _tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_path = tmp_dir / path.name
        if external:
            onnx.save_model(model, str(tmp_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=EXTERNAL_TENSOR_MIN_BYTES, convert_attribute=False)
        else:
            onnx.save_model(model, str(tmp_path))
        stale = path.parent / data_name
        if not external and stale.exists():
            stale.unlink()
        if external:
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return external


def load_model(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load by path, so that model.onnx.data is found next to the graph."""
    return onnx.load(os.fspath(path), load_external_data=load_external_data)


def _value_info_summary(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    shape = []
    for d in t.shape.dim:
        shape.append(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None))
    return {"name": vi.name, "dtype": dtype_name(t.elem_type), "shape": shape}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("quantkit", "torch", "nvidia-modelopt", "onnx", "onnx-graphsurgeon", "onnxruntime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _graph_dynamic_axes(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """{tensor: {axis: dim name}} of the graph's inputs and outputs, as the file declares them."""
    info = describe_graph(model)
    return {v["name"]: {str(i): d for i, d in enumerate(v["shape"]) if isinstance(d, str)}
            for v in [*info["inputs"], *info["outputs"]] if any(isinstance(d, str) for d in v["shape"])}


def describe_graph(model: onnx.ModelProto) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {
        "inputs": [_value_info_summary(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_value_info_summary(v) for v in model.graph.output],
        "opset": opset.get("ai.onnx"),
        "opset_imports": opset,
        "ir_version": model.ir_version,
        "nodes": len(model.graph.node),
    }


# ---------------------------------------------------------------------------------------------
# export


def _effective_weights_dtype(model_dtype: str, requested: str) -> tuple[str, str, str | None]:
    """(ModelOpt weights_dtype argument, weights dtype in the graph, note)."""
    if model_dtype != "fp32":
        note = None
        if requested not in ("fp32", model_dtype):
            note = f"export.weights_dtype {requested} ignored: the model was quantized in {model_dtype}"
        return "fp32", model_dtype, note  # "fp32" = no conversion by ModelOpt: the weights already are 16-bit
    if requested == "bf16":
        raise ExportError("export.weights_dtype bf16 on a model quantized in FP32: ModelOpt cannot convert a "
                          "quantized graph to BF16; quantize with --dtype bf16 instead")
    return requested, requested, None


def export_model(model: nn.Module, example: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                 input_names: list[str], output_names: list[str], read_outputs=None, model_dtype: str = "fp32",
                 io_dtype: str = "fp32", weights_dtype: str = "fp32", opset: int = 19,
                 dynamic_axes: dict[str, dict[int, str]] | None = None,
                 force_external_data: bool = False) -> tuple[onnx.ModelProto, SurgeryLog, bool]:
    """Export a (fake-)quantized model to `path` with ModelOpt, then the TensorRT surgery.

    Outputs are named `io_names.graph_output_names(input_names, output_names)` in the graph (an output
    named like an input would be wired to that input, and the exporter pruned the whole UNet away);
    dynamic_axes name outputs by those graph names. Returns (the final graph without its weights
    loaded, the surgery log, external data used)."""
    from quantkit.models import DTYPES

    path = Path(path)
    read_outputs = read_outputs or (lambda r: dict(zip(output_names, r if isinstance(r, (tuple, list)) else (r,))))
    mo_weights, graph_weights, _ = _effective_weights_dtype(model_dtype, weights_dtype)
    wrapper = _exportable(model, input_names, output_names, read_outputs, DTYPES[model_dtype], DTYPES[io_dtype])
    missing = [n for n in input_names if n not in example]
    if missing:
        raise ExportError(f"example inputs lack {missing}; the model takes {input_names}")
    args = tuple(example[n] for n in input_names)
    with torch.no_grad():
        sample = wrapper(*args)
    graph_outputs = graph_output_names(input_names, output_names)
    ranks = {**{n: example[n].dim() for n in input_names}, **{n: t.dim() for n, t in zip(graph_outputs, sample)}}
    dynamic_axes = _consistent_output_axes(dynamic_axes or {}, example, dict(zip(graph_outputs, sample)))
    mo_axes = _modelopt_names(dynamic_axes, graph_outputs, ranks)
    with tempfile.TemporaryDirectory(prefix="quantkit-export-") as tmp:
        raw_path = _modelopt_export(wrapper, args, opset, mo_axes, mo_weights, Path(tmp))
        raw = load_model(raw_path)
    # The module names let the audit and the per-block reference map graph scopes back to modules
    # whatever wraps them (graph.ScopeResolver).
    renamed = renamed_outputs(input_names, output_names)
    set_metadata(raw, {SCOPE_PREFIX_KEY: _WRAPPER_ATTR, "quantkit.weights_dtype": graph_weights,
                       "quantkit.io_dtype": io_dtype,
                       MODULE_NAMES_KEY: json.dumps([n for n, _ in model.named_modules() if n]),
                       **({OUTPUT_NAMES_KEY: json.dumps(renamed)} if renamed else {})})
    with _quiet_exporter():
        model_proto, surgery = prepare_for_tensorrt(raw, input_names=input_names, output_names=graph_outputs,
                                                     io_dtype=io_dtype)
    del raw
    for graph_name, name in renamed.items():
        surgery.notes.append(f"output {name!r} is named {graph_name!r} in the graph (an input is named {name!r})")
    _static_output_dims(model_proto, dict(zip(graph_outputs, sample)), dynamic_axes, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = save_model(model_proto, path, force_external=force_external_data)
    if external:
        surgery.notes.append(f"weights stored in {path.name}.data (graph over protobuf's 2 GB limit)")
    return load_model(path, load_external_data=False), surgery, external


def _example_inputs(run) -> dict[str, torch.Tensor]:
    """Inputs to trace the graph with: the model's own example, a tokenized sentence pair, or one
    batch of the calibration set the run was calibrated on."""
    from quantkit.models import DTYPES

    loaded = run.loaded
    if loaded.example_inputs:
        return {k: v.to(DTYPES[run.dtype]) if v.is_floating_point() else v for k, v in loaded.example_inputs.items()}
    if loaded.tokenizer is not None:
        return loaded.tokenize(["quantkit exports this model to ONNX for a strongly typed TensorRT build.",
                                "A second, shorter sentence."])
    from quantkit import ptq

    info = run.report.get("calibration", {}) if isinstance(run.report, dict) else {}
    calibration = ptq.open_calibration(loaded, info.get("path"), bool(info.get("synthetic")), 2)
    for batch_args, kwargs in calibration.batches(2, device="cpu", dtype=DTYPES[run.dtype]):
        named = dict(zip(loaded.input_names, batch_args))
        named.update(kwargs)
        return named
    raise ExportError(f"{run.out_dir}: no example inputs to trace the model with (empty calibration set)")


def export_run(out_dir: str | os.PathLike, dynamic_axes: dict[str, dict[int, str]] | None = None,
               opset: int | None = None, *, device: str = "cpu", weights_dtype: str | None = None,
               force_external_data: bool = False, audit: bool = False, model: str | None = None,
               trust_model_code: bool | None = None, run=None) -> ExportResult:
    """Export the quantized model of a `quantize` output folder to OUT/model.onnx and OUT/export.json
    (and, with `audit`, OUT/audit.json), all three replaced together or not at all.

    `model` / `trust_model_code`: see quantkit.ptq.load_quantized (a code spec in run.json is not run
    otherwise).
    dynamic_axes and opset override the recipe's `export:` section (itself defaulting to batch and
    sequence axes and the lowest opset the recipe's formats need). `run` (a ptq.QuantizedRun) is the
    quantized model already in memory (quantkit.QuantizedModel.export); without it the folder's model
    is rebuilt on `device`."""
    from quantkit.outdir import OutputFolder
    from quantkit.ptq import RUN_FILE, STATE_FILE, model_trust

    out_dir = Path(out_dir)
    if not (out_dir / RUN_FILE).is_file() or not (out_dir / STATE_FILE).is_file():
        raise InputError(f"{out_dir}: not a quantize output folder (needs {RUN_FILE} and {STATE_FILE}); "
                         "run `quantize --out` first")
    # model.onnx (+ .data), export.json and audit.json are one unit: built in a staged copy of the
    # folder (hard links) and swapped in whole, under the folder's lock; a killed export leaves the
    # previous set, and its staging folder is cleaned by the next run.
    with model_trust(model, trust_model_code), OutputFolder.staged(out_dir, keep_existing=True) as staging:
        for name in (ONNX_NAME, DATA_NAME, EXPORT_JSON, AUDIT_JSON):
            (staging / name).unlink(missing_ok=True)  # nothing of the previous export survives half-replaced
        result = _export_into(staging, dynamic_axes, opset, device=device, weights_dtype=weights_dtype,
                              force_external_data=force_external_data, run=run)
        if audit:
            from quantkit.export.audit import audit as audit_graph, read_plan, write_audit

            plan_file = staging / "plan.json"
            plan = read_plan(plan_file) if plan_file.is_file() else None
            result.audit = audit_graph(result.onnx_path, plan)
            result.audit.path = str(out_dir / ONNX_NAME)  # where it will be once the folder is swapped in
            write_audit(result.audit, staging / AUDIT_JSON)
    result.out_dir, result.onnx_path = out_dir, out_dir / ONNX_NAME
    return result


def _export_into(out_dir: Path, dynamic_axes, opset, *, device: str, weights_dtype: str | None,
                 force_external_data: bool, run=None) -> ExportResult:
    from quantkit.trt_requirements import format_version, min_tensorrt_version
    from quantkit.outdir import atomic_write_json
    from quantkit.ptq import load_quantized

    t0 = time.perf_counter()
    run = run if run is not None else load_quantized(out_dir, device)
    loaded, recipe, plan = run.loaded, run.recipe, run.plan
    spec = recipe.export
    example = _example_inputs(run)
    plan_dict = plan.to_dict()
    opset = opset or spec.opset or default_opset(plan_dict["layers"], str(recipe.attention.precision))
    need = default_opset(plan_dict["layers"], str(recipe.attention.precision))
    if opset < need:
        raise InputError(f"--opset {opset}: the recipe's formats need opset >= {need}")
    axes = dynamic_axes or ({k: dict(v) for k, v in spec.dynamic_axes.items()} if spec.dynamic_axes else None)
    if axes is None:
        axes = default_dynamic_axes(loaded.input_names, loaded.output_names, example, recipe.build.envelope(),
                                    sequence_model=loaded.tokenizer is not None)
    graph_outputs = graph_output_names(loaded.input_names, loaded.output_names)
    unknown = [n for n in axes if n not in loaded.input_names and n not in graph_outputs]
    if unknown:
        raise InputError(f"dynamic axes name {unknown}, which are not inputs ({loaded.input_names}) or outputs "
                         f"({graph_outputs}, as the graph names them) of the model")
    requested_weights = weights_dtype or spec.weights_dtype
    _, graph_weights, weights_note = _effective_weights_dtype(run.dtype, requested_weights)
    console.info(f"exporting {loaded.spec} ({run.dtype}, recipe {recipe.name}) to ONNX opset {opset}")
    path = out_dir / ONNX_NAME
    graph, surgery, external = export_model(
        loaded.model, example, path, input_names=loaded.input_names, output_names=loaded.output_names,
        read_outputs=loaded.named_outputs, model_dtype=run.dtype, io_dtype=spec.io_dtype,
        weights_dtype=requested_weights, opset=opset, dynamic_axes=axes, force_external_data=force_external_data)
    if weights_note:
        surgery.notes.append(weights_note)
    version, reasons = min_tensorrt_version(graph)
    files = {ONNX_NAME: path.stat().st_size}
    if external:
        files[DATA_NAME] = (out_dir / DATA_NAME).stat().st_size
    info = {
        "schema": "quantkit.export/1",
        "onnx": ONNX_NAME,
        "recipe": recipe.name,
        "model": loaded.spec,
        "model_dtype": run.dtype,
        "weights_dtype": graph_weights,
        "io_dtype": spec.io_dtype,
        **describe_graph(graph),
        "output_names": dict(zip(graph_outputs, loaded.output_names)),  # graph name -> the model's
        "dynamic_axes": _graph_dynamic_axes(graph),
        "min_tensorrt_version": format_version(version),
        "min_tensorrt_reasons": reasons,
        "external_data": external,
        "files": files,
        "size_bytes": sum(files.values()),
        "surgery": surgery.to_dict(),
        "exporter": {"path": EXPORTER_NAME,
                     "versions": _versions()},
        "export_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out_dir / EXPORT_JSON, info)
    return ExportResult(out_dir, path, info, surgery)
