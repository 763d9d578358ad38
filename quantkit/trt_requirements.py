"""The oldest TensorRT that can build an exported graph, read from the graph itself.

`min_tensorrt_version(model_or_path)` scans the ONNX graph (subgraphs and local functions
included) for the low-precision features a strongly-typed TensorRT build must support and returns
the newest minimum among them, with one human-readable reason per feature found. It loads the file
without external data, so it costs a few milliseconds even for multi-GB models. It lives at the top
level because export/ records it in export.json and runtime/tensorrt checks it before a build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import onnx
from onnx import TensorProto

Version = tuple[int, ...]

# Where each number comes from. TensorRT itself cannot run on the machines this was written on,
# so the numbers are documentation, not experiment; the ones marked "project note" could not be
# found in NVIDIA's text during the search and are the project's own reading of the docs (unverified).
#
# Baseline: a strongly-typed network (NetworkDefinitionCreationFlag.STRONGLY_TYPED, trtexec
# --stronglyTyped) does not exist in TensorRT 8.x; ONNX Runtime's TensorRT EP guards it with
# `#if NV_TENSORRT_MAJOR > 8` (microsoft/onnxruntime PR 24298). The exact 9.x minor that added
# it was not found in NVIDIA's release notes.
BASELINE: Version = (9, 0)
# INT8 explicit quantization (QuantizeLinear/DequantizeLinear with INT8) in a strongly-typed
# build: project note ("INT8 Q/DQ 9.2").
INT8_QDQ: Version = (9, 2)
# FP8 E4M3 Q/DQ: project note ("FP8 10.2").
FP8_QDQ: Version = (10, 2)
# Static FP4 (E2M1 tensors, no dynamic quantize op): TensorRT 10.8.0 release notes, "E2M1 FP4
# Data Type: Added support for E2M1 FP4 data type on NVIDIA Blackwell GPUs using explicit
# quantization" (B200/GB200 early access in that release). The project note says 10.11; the
# release notes say 10.8, and this follows the release notes.
FP4_STATIC: Version = (10, 8)
# MXFP8 (TRT_MXFP8DynamicQuantize / E8M0 block scales): TensorRT 10.12.0 release notes, "MXFP8
# Quantization Support: Added support for MXFP8 quantization".
MXFP8: Version = (10, 12)
# Dynamic NVFP4 (activations through trt::TRT_FP4DynamicQuantize): NVIDIA Model-Optimizer
# examples/onnx_ptq/_trt_compat.py, _DYNAMIC_NVFP4_MIN_TRT_VERSION = "11.0" ("Dynamic NVFP4 (W4A4)
# TensorRT engine builds require TensorRT 11.0 or newer").
FP4_DYNAMIC: Version = (11, 0)

_QUANTIZE_OPS = {"QuantizeLinear", "TRT_FP8QuantizeLinear", "TRT_INT4QuantizeLinear"}
_DEQUANTIZE_OPS = {"DequantizeLinear", "TRT_FP8DequantizeLinear", "TRT_INT4DequantizeLinear"}
_FP4_DYNAMIC_OPS = {"TRT_FP4DynamicQuantize"}
_MXFP8_OPS = {"TRT_MXFP8DynamicQuantize", "TRT_MXFP8QuantizeLinear", "TRT_MXFP8DequantizeLinear"}
_FP8_TYPES = {TensorProto.FLOAT8E4M3FN}
_FP4_TYPES = {getattr(TensorProto, "FLOAT4E2M1", -1)} - {-1}
_E8M0_TYPES = {getattr(TensorProto, "FLOAT8E8M0", -1)} - {-1}


@dataclass(frozen=True)
class _Finding:
    version: Version
    feature: str
    where: str

    def reason(self) -> str:
        return f"{self.feature} ({self.where}) needs TensorRT >= {format_version(self.version)}"


def format_version(version: Iterable[int]) -> str:
    return ".".join(str(part) for part in version)


def parse_version(text: str) -> Version:
    """'10.3.0.26' -> (10, 3, 0, 26); stops at the first part that is not a number ('11.0rc1' -> (11,))."""
    parts: list[int] = []
    for piece in str(text).strip().split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    if not parts:
        raise ValueError(f"not a version number: {text!r}")
    return tuple(parts)


def version_at_least(installed: Iterable[int], required: Iterable[int]) -> bool:
    """Compare on the length of `required`: (10, 3, 0, 26) satisfies (10, 2)."""
    required = tuple(required)
    installed = tuple(installed) + (0,) * len(required)
    return installed[: len(required)] >= required


def min_tensorrt_version(onnx_model_or_path: onnx.ModelProto | str | os.PathLike) -> tuple[Version, list[str]]:
    """(oldest TensorRT that can build this graph, one reason per feature that sets a floor).

    The first reason is always the baseline (strongly-typed build); the others follow, newest
    requirement first, one per kind of feature, naming the first node or tensor where it was seen.
    """
    model = _load(onnx_model_or_path)
    findings: dict[str, _Finding] = {}
    for finding in _scan(model):
        findings.setdefault(finding.feature, finding)
    ordered = sorted(findings.values(), key=lambda f: f.version, reverse=True)
    version = max([BASELINE, *(f.version for f in ordered)])
    reasons = [f"strongly-typed ONNX build needs TensorRT >= {format_version(BASELINE)}"]
    reasons += [f.reason() for f in ordered]
    return version, reasons


def _load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    # Weights in model.onnx.data are not needed to read types and op names.
    return onnx.load(os.fspath(model_or_path), load_external_data=False)


def _graphs(model: onnx.ModelProto) -> Iterator[tuple[str, Iterable[onnx.NodeProto], onnx.GraphProto | None]]:
    """Every node list in the model: the main graph, subgraphs of If/Loop/Scan, local functions."""

    def walk(graph: onnx.GraphProto, label: str):
        yield label, graph.node, graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g, f"{label}/{node.name or node.op_type}.{attribute.name}")
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for i, sub in enumerate(attribute.graphs):
                        yield from walk(sub, f"{label}/{node.name or node.op_type}.{attribute.name}[{i}]")

    yield from walk(model.graph, "graph")
    for function in model.functions:
        yield f"function {function.name}", function.node, None


def _tensor_types(graph: onnx.GraphProto | None, nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """Element type of every tensor whose type the graph states, by name."""
    types: dict[str, int] = {}
    if graph is not None:
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
    for node in nodes:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                types[node.output[0]] = attribute.t.data_type
            elif node.op_type == "Cast" and attribute.name == "to":
                types[node.output[0]] = attribute.i
    return types


def _quantized_type(node: onnx.NodeProto, types: dict[str, int]) -> int | None:
    """The low-precision type a Q or DQ node works in.

    The zero point's type is preferred over the output's value_info: ModelOpt's FP8 export leaves
    a stale UINT8 value_info on Q outputs while the zero point is FLOAT8E4M3FN.
    """
    for attribute in node.attribute:
        if attribute.name == "output_dtype" and attribute.i:
            return attribute.i
    if len(node.input) > 2 and node.input[2] in types:
        return types[node.input[2]]
    tensor = node.output[0] if node.op_type in _QUANTIZE_OPS else node.input[0]
    if tensor in types:
        return types[tensor]
    if node.op_type in _QUANTIZE_OPS:
        return TensorProto.UINT8  # ONNX default when neither zero point nor output_dtype is given
    return None


def _scan(model: onnx.ModelProto) -> Iterator[_Finding]:
    for label, nodes, graph in _graphs(model):
        nodes = list(nodes)
        types = _tensor_types(graph, nodes)
        for node in nodes:
            where = f"node '{node.name or node.op_type}' in {label}"
            if node.op_type in _FP4_DYNAMIC_OPS:
                yield _Finding(FP4_DYNAMIC, f"dynamic NVFP4 ({node.op_type})", where)
            elif node.op_type in _MXFP8_OPS:
                yield _Finding(MXFP8, f"MXFP8 ({node.op_type})", where)
            elif node.op_type in _QUANTIZE_OPS or node.op_type in _DEQUANTIZE_OPS:
                qtype = _quantized_type(node, types)
                if qtype == TensorProto.INT8:
                    yield _Finding(INT8_QDQ, "INT8 Q/DQ", where)
                elif qtype in _FP8_TYPES:
                    yield _Finding(FP8_QDQ, "FP8 Q/DQ (FLOAT8E4M3FN)", where)
                elif qtype in _FP4_TYPES:
                    yield _Finding(FP4_STATIC, "static FP4 Q/DQ (FLOAT4E2M1)", where)
        # Typed tensors without a Q/DQ node in sight (pre-quantized weights feeding a custom DQ).
        for name, elem_type in types.items():
            where = f"tensor '{name}' in {label}"
            if elem_type in _FP8_TYPES:
                yield _Finding(FP8_QDQ, "FP8 Q/DQ (FLOAT8E4M3FN)", where)
            elif elem_type in _FP4_TYPES:
                yield _Finding(FP4_STATIC, "static FP4 Q/DQ (FLOAT4E2M1)", where)
            elif elem_type in _E8M0_TYPES:
                yield _Finding(MXFP8, "MXFP8 (FLOAT8E8M0 scales)", where)
