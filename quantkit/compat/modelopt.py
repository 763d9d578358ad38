"""ModelOpt internals quantkit relies on: calibrator state, the QuantModuleRegistry's entries, the
ONNX exporter under `modelopt.torch._deploy` and its FP8 post-processing, the NVFP4 kernel global.

Each accessor checks the attribute exists (compat.require) so that a ModelOpt whose internals moved
fails here, by name, rather than changing what quantkit computes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from quantkit.compat import require

PACKAGE = "nvidia-modelopt"


def _req(obj: Any, attr: str, owner: str | None = None) -> Any:
    return require(obj, attr, PACKAGE, owner)


# ---------------------------------------------------------------------------------------------
# TensorQuantizer and its calibrator


def _is_tensor_quantizer(obj: Any) -> bool:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return isinstance(obj, TensorQuantizer)


def calibrator(quantizer: Any) -> Any:
    """The quantizer's calibrator (None when it has none, or is no TensorQuantizer)."""
    if not _is_tensor_quantizer(quantizer):
        return None
    return _req(quantizer, "_calibrator", "TensorQuantizer")


def bias_calibrator(quantizer: Any) -> Any:
    return _req(quantizer, "_bias_calibrator", "TensorQuantizer")


def is_calibrating(quantizer: Any) -> bool:
    """Whether the quantizer collects calibration statistics now (between enable_calib and load_calib_amax)."""
    return bool(_req(quantizer, "_if_calib", "TensorQuantizer"))


def calib_amax(cal: Any) -> Any:
    """A max calibrator's running |x| max (None before the first batch)."""
    return _req(cal, "_calib_amax", type(cal).__name__)


def set_calib_amax(cal: Any, value: Any) -> None:
    _req(cal, "_calib_amax", type(cal).__name__)
    cal._calib_amax = value


def is_dynamic(quantizer: Any) -> bool:
    """Whether the quantizer computes its scale per call (it collects no calibration statistics)."""
    return bool(_req(quantizer, "_dynamic", "TensorQuantizer"))


def is_plain_max_calibrator(cal: Any) -> bool:
    """Whether `cal` is ModelOpt's MaxCalibrator itself (not a subclass) and keeps no per-call amax
    list: the calibrator whose running max quantkit.max_calibration.RunningAmax reproduces bit for bit."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    return type(cal) is MaxCalibrator and not bool(_req(cal, "_track_amax", "MaxCalibrator"))


def calibrator_axis(cal: Any) -> Any:
    """The quantization axis a calibrator keeps (None: per tensor)."""
    return _req(cal, "_axis", type(cal).__name__)


def reduce_axis_of(x: Any, axis: Any) -> Any:
    """The dimensions MaxCalibrator.collect reduces for quantization `axis` (None: all of them)."""
    from modelopt.torch.quantization import utils as quant_utils

    return _req(quant_utils, "convert_quantization_axis_to_reduce_axis")(x, axis)


@contextlib.contextmanager
def collect_replaced(calibrators: list[Any], collectors: list[Callable[[Any], None]]) -> Iterator[None]:
    """Each calibrator's `collect` (what TensorQuantizer.collect calls with the tensor it sees) is
    the matching collector for the duration of the block; ModelOpt's own method afterwards."""
    for cal in calibrators:
        if not callable(getattr(type(cal), "collect", None)) or "collect" in vars(cal):
            _req(object(), "collect (a method, not already replaced)", type(cal).__name__)
    try:
        for cal, fn in zip(calibrators, collectors):
            cal.collect = fn  # an instance attribute: this object only, removed below
        yield
    finally:
        for cal in calibrators:
            vars(cal).pop("collect", None)


def uses_constant_amax(quantizer: Any) -> bool:
    """Quantizers ModelOpt gives a fixed amax (FP8 E4M3's 448) rather than a calibrated one."""
    if not _is_tensor_quantizer(quantizer):
        return False
    return bool(_req(quantizer, "_use_constant_amax", "TensorQuantizer"))


def amax_buffer(quantizer: Any) -> Any:
    """The quantizer's amax buffer itself (edited in place), None when it has none; unlike the public
    `amax` it does not assert on dynamic quantizers."""
    return getattr(quantizer, "_amax", None) if "_amax" in _req(quantizer, "_buffers", "Module") else None


# ---------------------------------------------------------------------------------------------
# QuantModuleRegistry: which nn.Module classes get which QuantModule


def registered_exactly(registry: Any, cls: type) -> tuple[type, str] | None:
    """(QuantModule class, key) registered for `cls` itself, not through a base class; else None."""
    entries = _req(registry, "_registry", "QuantModuleRegistry")
    keys = _req(registry, "_key_registry", "QuantModuleRegistry")
    if cls not in entries:
        return None
    return entries[cls], keys[cls]


def registered_base(registry: Any, cls: type) -> type | None:
    """The registered class ModelOpt would convert `cls` by (itself, or a base with the same forward)."""
    return _req(registry, "_get_registered_nn_class", "QuantModuleRegistry")(cls)


# ---------------------------------------------------------------------------------------------
# ONNX export (modelopt.torch._deploy: the exporter ModelOpt's own deployment uses)


def onnx_exporter() -> tuple[Callable, type]:
    """(get_onnx_bytes_and_metadata, OnnxBytes)."""
    from modelopt.torch._deploy.utils import torch_onnx

    return _req(torch_onnx, "get_onnx_bytes_and_metadata"), _req(torch_onnx, "OnnxBytes")


EXPORTER_NAME = "modelopt.torch._deploy.utils.get_onnx_bytes_and_metadata (TorchScript)"


@contextlib.contextmanager
def fp8_export_fixes(any_fp8: bool, quantized_weights: set[str]) -> Iterator[None]:
    """Two corrections to ModelOpt 0.47's FP8 export, for the duration of one export.

    ModelOpt runs its FP8 post-processing (TRT_FP8 custom ops -> standard Q/DQ) only when some layer
    has FP8 weight *and* input quantizers; with `any_fp8` (e.g. only quantkit's attention-matmul
    quantizers are FP8) it runs anyway, or the graph would keep custom ops that only TensorRT runs.
    And that post-processing gives every Conv weight FP8 Q/DQ, also the Convs the plan leaves
    unquantized: only the Convs whose weight initializer is in `quantized_weights` get it (a Conv with a
    BatchNorm folded in by the exporter has a new weight name and is not one of them).
    """
    from modelopt.onnx.export.fp8_exporter import FP8QuantExporter
    from modelopt.torch._deploy.utils import torch_onnx

    own_check = _req(torch_onnx, "is_fp8_quantized")
    own_conv = FP8QuantExporter.__dict__.get("_quantize_conv_weights_to_fp8")
    if not isinstance(own_conv, staticmethod):
        _req(object(), "_quantize_conv_weights_to_fp8 (a staticmethod)", "FP8QuantExporter")

    def is_fp8_quantized(m: Any) -> bool:
        return own_check(m) or any_fp8

    def quantize_conv_weights_to_fp8(graph) -> int:
        hidden = [n for n in graph.nodes
                  if n.op == "Conv" and len(n.inputs) > 1 and n.inputs[1].name not in quantized_weights]
        for n in hidden:
            n.op = "Conv:not-quantized"  # skipped by ModelOpt's `node.op != "Conv"` test
        try:
            return own_conv.__func__(graph)
        finally:
            for n in hidden:
                n.op = "Conv"

    torch_onnx.is_fp8_quantized = is_fp8_quantized
    FP8QuantExporter._quantize_conv_weights_to_fp8 = staticmethod(quantize_conv_weights_to_fp8)
    try:
        yield
    finally:
        torch_onnx.is_fp8_quantized = own_check
        FP8QuantExporter._quantize_conv_weights_to_fp8 = own_conv


@contextlib.contextmanager
def sequential_cast_fix() -> Iterator[None]:
    """For one export: ModelOpt 0.47's `remove_redundant_casts` drops the first of two Casts
    (x -> FP32 -> FP16) when that FP32 Cast has one *Cast* consumer, whatever its other consumers,
    and then wires all of them to the 16-bit input. An FP16 layer's output cast back to FP32 and read
    by the next FP16 layer and by an FP32-protected GroupNorm handed the norm an FP16 tensor (the
    UNet's downsampler conv). Here a first Cast is dropped only when that Cast is its one consumer."""
    from modelopt.onnx import utils as onnx_utils

    own = _req(onnx_utils, "_is_sequential_cast")
    consumers_of = _req(onnx_utils, "get_consumer_nodes")

    def is_sequential_cast(model: Any, node: Any) -> bool:
        return own(model, node) and len(consumers_of(model, node.output[0])) == 1

    onnx_utils._is_sequential_cast = is_sequential_cast
    try:
        yield
    finally:
        onnx_utils._is_sequential_cast = own


# ---------------------------------------------------------------------------------------------
# The NVFP4 kernel global (quantkit.nvfp4_cpu routes CPU tensors around it)


def tensor_quant_module() -> Any:
    """`modelopt.torch.quantization.tensor_quant`, checked to have the global nvfp4_cpu replaces and
    the forward that calls it."""
    from modelopt.torch.quantization import tensor_quant

    _req(tensor_quant, "dynamic_block_quantize_op")
    if not callable(_req(tensor_quant, "_dynamic_block_quantize_forward")):
        _req(object(), "_dynamic_block_quantize_forward (callable)", "tensor_quant")
    return tensor_quant
