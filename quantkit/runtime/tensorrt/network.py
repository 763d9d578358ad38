"""One parse + build of an ONNX graph: the strongly typed network, its optimization profiles, and the
compiled engine, with what the parser and builder said (`CompileResult`).

`compile_network` never raises for a graph the parser or builder refuses: the refusal, naming node
or layer, is the result. It raises InputError only for build shapes that do not fit the graph.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantkit.errors import InputError
from quantkit.runtime.tensorrt import backend as _backend
from quantkit.runtime.tensorrt.backend import Backend
from quantkit.runtime.tensorrt.profiles import ShapeProfile, check_profiles_against_inputs
from quantkit.runtime.tensorrt.targets import CompileTarget

log = logging.getLogger("quantkit.runtime.tensorrt")

# TensorRT's DataType names -> the names the rest of quantkit uses.
_DTYPE_NAMES = {
    "FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "FP8": "fp8", "FP4": "fp4", "INT8": "int8", "INT4": "int4",
    "UINT8": "uint8", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "E8M0": "e8m0",
}
# Layers that do a model's arithmetic (as opposed to moving, reshaping or quantizing it): the ones
# whose output dtype says what the device computes in.
COMPUTE_LAYERS = {"MATRIX_MULTIPLY": "matmul", "CONVOLUTION": "conv", "DECONVOLUTION": "conv",
                  "ELEMENTWISE": "elementwise", "ACTIVATION": "activation", "UNARY": "unary",
                  "SOFTMAX": "softmax", "NORMALIZATION": "normalization", "REDUCE": "reduce"}
# Said by TensorRT-RTX on every builder after the first (see backend.logger_for): not about the graph.
_NOISE = ("The logger passed into createInferBuilder differs",)


@dataclass
class CompileResult:
    """What one parse + build of a graph for one target said; truthy when the engine was built."""

    backend: str
    version: str
    targets: list[CompileTarget]  # empty: datacenter TensorRT, built for the GPU it ran on
    parsed: bool = False
    parser_errors: list[str] = field(default_factory=list)
    refused_ops: list[str] = field(default_factory=list)  # op type of each refused node
    not_checked: str | None = None  # why this refusal says nothing about the graph on its target
    layers: int = 0
    layers_by_dtype: dict[str, int] = field(default_factory=dict)
    compute_layers_by_dtype: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> dtype -> n
    profiles: int = 0
    built: bool = False
    build_error: str | None = None
    engine_bytes: int = 0
    build_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    engine: Any = field(default=None, repr=False, compare=False)  # the serialized engine, not in to_dict
    timing_cache: Any = field(default=None, repr=False, compare=False)  # datacenter TensorRT's, to save

    def __bool__(self) -> bool:
        return self.parsed and self.built

    @property
    def error(self) -> str | None:
        """One line: why this target did not compile (parser errors name node and op)."""
        if not self.parsed:
            return "the ONNX parser refused the graph: " + " | ".join(self.parser_errors or ["no detail given"])
        if not self.built:
            return "the builder refused the network: " + (self.build_error or "no detail given")
        return None

    def fp32_compute(self) -> dict[str, int]:
        """Compute layers whose output is FP32, by kind (matmul, elementwise, ...)."""
        return {kind: n["fp32"] for kind, n in self.compute_layers_by_dtype.items() if n.get("fp32")}

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "version": self.version,
            "targets": [t.to_dict() for t in self.targets],
            "parsed": self.parsed, "parser_errors": list(self.parser_errors),
            "refused_ops": list(self.refused_ops), "not_checked": self.not_checked,
            "layers": self.layers, "layers_by_dtype": dict(self.layers_by_dtype),
            "compute_layers_by_dtype": {k: dict(v) for k, v in self.compute_layers_by_dtype.items()},
            "profiles": self.profiles, "built": self.built, "build_error": self.build_error,
            "engine_bytes": self.engine_bytes, "build_seconds": round(self.build_seconds, 3),
            "warnings": list(self.warnings),
        }


def dtype_name(trt_dtype) -> str:
    raw = str(trt_dtype).rsplit(".", 1)[-1]
    return _DTYPE_NAMES.get(raw, raw.lower())


def count_layers(network) -> tuple[int, dict[str, int], dict[str, dict[str, int]]]:
    """(layers, layers by first-output dtype, compute layers by kind and dtype) of a parsed network."""
    total = int(getattr(network, "num_layers", 0))
    by_dtype: Counter[str] = Counter()
    compute: dict[str, Counter[str]] = {}
    for i in range(total):
        layer = network.get_layer(i)
        if layer.num_outputs < 1:
            continue
        dtype = dtype_name(layer.get_output(0).dtype)
        by_dtype[dtype] += 1
        kind = COMPUTE_LAYERS.get(str(layer.type).rsplit(".", 1)[-1])
        if kind:
            compute.setdefault(kind, Counter())[dtype] += 1
    return total, dict(sorted(by_dtype.items())), {k: dict(sorted(v.items())) for k, v in sorted(compute.items())}


def compile_network(
    onnx_path: str | Path,
    profile_sets: Sequence[Sequence[ShapeProfile]],
    be: Backend,
    *,
    targets: Sequence[CompileTarget] = (),
    workspace_gib: float,
    opt_level: int,
    timing_cache=None,
) -> CompileResult:
    """Parse `onnx_path` into a strongly typed network and build it; `profile_sets` is one list of
    input shapes per optimization profile (all in one engine).

    For TensorRT-RTX `targets` name the compute capabilities to compile for (ahead of time, no GPU
    needed; several make one engine for all of them); datacenter TensorRT builds for the GPU it runs on. `timing_cache` is a callable
    (config) -> cache, used by datacenter TensorRT only.
    """
    trt = be.module
    onnx_path = Path(onnx_path)
    targets = list(targets) if be.ahead_of_time else []
    result = CompileResult(be.name, be.version, targets)
    logger = _backend.logger_for(trt)
    with logger.capture() as said:
        builder = trt.Builder(logger)
        # Strongly typed: every tensor keeps the graph's type (TensorRT-RTX knows no other kind).
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        # From the path, so model.onnx.data beside it is found.
        result.parsed = bool(parser.parse_from_file(str(onnx_path)))
        if not result.parsed:
            result.parser_errors = _backend.parser_errors(parser) or list(said.errors) or ["no detail given"]
            result.refused_ops = [op for op in _backend.parser_error_ops(parser) if op]
            result.warnings = _warnings(said)
            return result
        result.layers, result.layers_by_dtype, result.compute_layers_by_dtype = count_layers(network)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        config.builder_optimization_level = opt_level
        if targets:
            config.num_compute_capabilities = len(targets)
            for i, t in enumerate(targets):
                config.set_compute_capability(getattr(trt.ComputeCapability, t.enum_name), i)
        result.profiles = add_profiles(builder, config, network, profile_sets, onnx_path.name)
        cache = timing_cache(config) if timing_cache is not None and not be.ahead_of_time else None

        where = f"for {', '.join(t.sm for t in targets)}" if targets else "for this GPU"
        log.info("compiling %s with %s %s; this can take minutes", onnx_path.name, be.label, where)
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        result.build_seconds = time.perf_counter() - start
        result.warnings = _warnings(said)
        if serialized is None:
            result.build_error = " | ".join(said.errors[-5:]) or "no detail given"
            return result
    result.built = True
    result.engine = memoryview(serialized)
    result.engine_bytes = result.engine.nbytes
    result.timing_cache = cache
    return result


def _warnings(said) -> list[str]:
    return [w for w in said.warnings if not any(n in w for n in _NOISE)]


def add_profiles(builder, config, network, profile_sets: Sequence[Sequence[ShapeProfile]], source: str) -> int:
    """Add one optimization profile per set; every set must fit the network's inputs. Returns how many."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    graph_shapes = {t.name: tuple(int(d) for d in t.shape) for t in inputs}
    sets = [list(s) for s in profile_sets] or [[]]
    for shapes in sets:
        check_profiles_against_inputs(graph_shapes, {p.name: p for p in shapes}, source)
    if not any(sets):
        return 0
    for index, shapes in enumerate(sets):
        profile = builder.create_optimization_profile()
        for p in shapes:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        if config.add_optimization_profile(profile) < 0:
            raise InputError(f"{source}: TensorRT refused optimization profile {index} "
                             f"{[p.to_dict() for p in shapes]}")
    return len(sets)
