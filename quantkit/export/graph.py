"""A read-only index of an ONNX graph: producers, consumers, constants and the dtype of every tensor.

Shared by the graph surgery, the precision audit and the ONNX Runtime verification copy. Dtypes
come from ONNX shape inference on a copy whose (often stale) value_info was dropped, then from a
small propagation for what inference cannot type (TensorRT's custom ops and what follows them).
Node names from the TorchScript exporter carry the module path (`/model/layers.0/mlp/up_proj/MatMul`);
`module_of()` turns that back into the dotted module name a plan uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

FLOAT, FLOAT16, BFLOAT16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE
FLOAT_TYPES = {FLOAT, FLOAT16, BFLOAT16, DOUBLE}
FP8 = TensorProto.FLOAT8E4M3FN
FP4 = getattr(TensorProto, "FLOAT4E2M1", 23)
INT8, UINT8 = TensorProto.INT8, TensorProto.UINT8

DTYPE_NAMES = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", DOUBLE: "float64", FP8: "float8e4m3fn",
               FP4: "float4e2m1", INT8: "int8", UINT8: "uint8", TensorProto.INT32: "int32",
               TensorProto.INT64: "int64", TensorProto.BOOL: "bool"}
# The quantkit precision each quantized element type stands for.
QUANT_FORMATS = {FP8: "fp8", INT8: "int8", UINT8: "int8", FP4: "nvfp4"}
SCOPE_PREFIX_KEY = "quantkit.scope_prefix"
MODULE_NAMES_KEY = "quantkit.module_names"  # JSON list of the exported model's module names
TORCH_TO_ONNX = {"fp32": FLOAT, "fp16": FLOAT16, "bf16": BFLOAT16}

Q_OPS = {"QuantizeLinear", "TRT_FP8QuantizeLinear", "TRT_INT4QuantizeLinear"}
DQ_OPS = {"DequantizeLinear", "TRT_FP8DequantizeLinear", "TRT_INT4DequantizeLinear"}
FP4_DYNAMIC_OPS = {"TRT_FP4DynamicQuantize"}
COMPUTE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
# Ops that move or reshape data without computing: a DQ seen through them still feeds the compute op.
PASS_THROUGH_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice",
                    "Gather", "Concat", "Split"}


def dtype_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    return DTYPE_NAMES.get(elem_type, onnx.TensorProto.DataType.Name(elem_type).lower())


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class GraphIndex:
    """Lookups over one ModelProto's main graph. Rebuild it after changing the model."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: list[str] = field(default_factory=list)
    scope_prefix: str = ""
    scopes: "ScopeResolver | None" = None

    @classmethod
    def build(cls, model: onnx.ModelProto, scope_prefix: str | None = None,
              module_names: Iterable[str] = ()) -> "GraphIndex":
        """`module_names` (with those the export recorded in the graph's metadata) resolve scopes to
        module names whatever the wrapping; without any, scopes are joined as they read."""
        g = model.graph
        index = cls(model=model)
        index.initializers = {t.name: t for t in g.initializer}
        for node in g.node:
            for out in node.output:
                if out:
                    index.producer[out] = node
            for inp in node.input:
                if inp:
                    index.consumers.setdefault(inp, []).append(node)
        index.graph_inputs = [v.name for v in g.input if v.name not in index.initializers]
        index.graph_outputs = [v.name for v in g.output]
        index.dtypes = infer_dtypes(model)
        index.scope_prefix = guess_scope_prefix(model) if scope_prefix is None else scope_prefix
        names = [*recorded_module_names(model), *module_names]
        index.scopes = ScopeResolver(names) if names else None
        return index

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    def dtype(self, tensor: str) -> int | None:
        return self.dtypes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        """An initializer, a Constant node's output, or a DQ/Cast/Transpose/Reshape of one."""
        seen = 0
        while tensor and seen < 8:
            if tensor in self.initializers:
                return True
            node = self.producer.get(tensor)
            if node is None:
                return False
            if node.op_type == "Constant":
                return True
            if node.op_type in DQ_OPS | {"Cast", "Transpose", "Reshape", "Identity", "Unsqueeze"} | Q_OPS:
                tensor = node.input[0]
                seen += 1
                continue
            return False
        return False

    def constant_value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def module_of(self, node: onnx.NodeProto) -> str:
        """`/model/layers.0/mlp/up_proj/MatMul` -> `layers.0.mlp.up_proj` (the scope prefix removed)."""
        return module_of_name(node.name, self.scope_prefix, self.scopes)

    def upstream(self, tensor: str, through: Iterable[str] = PASS_THROUGH_OPS | {"Cast"}) -> onnx.NodeProto | None:
        """The first producer of `tensor` that is not a pass-through op (Transpose, Reshape, Cast...)."""
        through = set(through)
        for _ in range(16):
            node = self.producer.get(tensor)
            if node is None or node.op_type not in through:
                return node
            tensor = node.input[0]
        return None


def within_scope(module: str, scope: str) -> bool:
    """`module` is `scope` or inside it (dotted module names)."""
    return bool(scope) and (module == scope or module.startswith(scope + "."))


def scope_boundary(index: "GraphIndex", module: str) -> tuple[list[str], list[str]]:
    """(tensors entering, tensors leaving) the nodes of `module`'s scope: computed outside (not
    constants, not graph inputs) and read inside, or computed inside and read outside or returned.

    A node without a scope of its own (a Cast that graph surgery added) belongs where its first
    input was computed, so a cast inside a block does not count as leaving it."""
    scopes: dict[int, str] = {}
    for node in index.model.graph.node:  # topological order: producers come first
        scope = index.module_of(node)
        if not scope and node.input and not node.name.startswith("/"):
            producer = index.producer.get(node.input[0])
            scope = scopes.get(id(producer), "") if producer is not None else ""
        scopes[id(node)] = scope

    def inside(node: onnx.NodeProto) -> bool:
        return within_scope(scopes.get(id(node), ""), module)

    entering: list[str] = []
    leaving: list[str] = []
    outputs = set(index.graph_outputs)
    for node in index.model.graph.node:
        if not inside(node):
            continue
        for name in node.input:
            producer = index.producer.get(name)
            if name and producer is not None and not inside(producer) and not index.is_constant(name) \
                    and name not in entering:
                entering.append(name)
        for name in node.output:
            if name and (name in outputs or any(not inside(c) for c in index.consumers.get(name, []))) \
                    and name not in leaving:
                leaving.append(name)
    return entering, leaving


def module_of_name(node_name: str, scope_prefix: str = "", scopes: "ScopeResolver | None" = None) -> str:
    parts = [p for p in node_name.split("/") if p]
    if len(parts) <= 1:
        return ""
    if scopes is not None:
        chain = parts[1:-1] if scope_prefix and parts[0] == scope_prefix else parts[:-1]
        return scopes.resolve(tuple(chain))
    module = ".".join(_join_scopes(parts[:-1]))
    if scope_prefix and (module == scope_prefix or module.startswith(scope_prefix + ".")):
        module = module[len(scope_prefix) + 1:]
    return module


def _join_scopes(scopes: list[str]) -> list[str]:
    """Scope names -> the atoms of the dotted module name.

    The TorchScript exporter names each called module by the tail of its qualified name from the
    last non-numeric atom on (torch.onnx's `_unqualified_variable_name`): a ModuleList element
    (never called itself) is `layers.0`, but an nn.Sequential is called, so `mlp` is a scope and
    its child `mlp.0` another one (`/model/mlp/mlp.0/Gemm`). A scope that repeats the end of the
    path so far continues it instead of nesting under it.
    """
    atoms: list[str] = []
    for scope in scopes:
        parts = scope.split(".")
        overlap = 0
        if len(parts) > 1:  # only `name.<index>...` scopes can repeat their container
            for k in range(min(len(parts) - 1, len(atoms)), 0, -1):
                if atoms[-k:] == parts[:k]:
                    overlap = k
                    break
        atoms.extend(parts[overlap:])
    return atoms


class ScopeResolver:
    """Graph scopes -> dotted module names, whatever wraps the model.

    A scope is a *called* module, named by the tail of its qualified name (see `_join_scopes`); a
    module that is only reached through (`self.vae.decode(z)`: `vae` is never called) leaves no
    scope, so `/model/decoder/mid_block/...` is `vae.decoder.mid_block...`. Each scope is resolved
    to the nearest known module below the previous one whose name ends with the scope's atoms; what
    no known module explains is appended as it reads."""

    def __init__(self, names: Iterable[str]):
        known: set[tuple[str, ...]] = set()
        for name in names:
            atoms = tuple(a for a in name.split(".") if a)
            for k in range(1, len(atoms) + 1):
                known.add(atoms[:k])
        self._by_last: dict[str, list[tuple[str, ...]]] = {}
        for atoms in sorted(known, key=len):  # shortest (nearest) first
            self._by_last.setdefault(atoms[-1], []).append(atoms)
        self._cache: dict[tuple[str, ...], str] = {}

    def _below(self, current: tuple[str, ...], scope: list[str]) -> tuple[str, ...] | None:
        for atoms in self._by_last.get(scope[-1], ()):
            if len(atoms) > len(current) and atoms[:len(current)] == current and \
                    len(atoms) >= len(scope) and list(atoms[len(atoms) - len(scope):]) == scope:
                return atoms
        return None

    def resolve(self, chain: tuple[str, ...]) -> str:
        if chain not in self._cache:
            current: tuple[str, ...] = ()
            rest: list[str] = []
            for i, scope in enumerate(chain):
                found = self._below(current, scope.split("."))
                if found is None:
                    rest = list(chain[i:])
                    break
                current = found
            atoms = _join_scopes([".".join(current), *rest]) if current and rest else \
                list(current) if current else _join_scopes(list(chain))
            self._cache[chain] = ".".join(atoms)
        return self._cache[chain]


def recorded_module_names(model: onnx.ModelProto) -> list[str]:
    import json

    value = {p.key: p.value for p in model.metadata_props}.get(MODULE_NAMES_KEY)
    try:
        names = json.loads(value) if value else []
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)]


def guess_scope_prefix(model: onnx.ModelProto) -> str:
    """The wrapper's attribute name that every scoped node starts with ('model' for LoadedModel.exportable())."""
    value = {p.key: p.value for p in model.metadata_props}.get(SCOPE_PREFIX_KEY)
    if value is not None:
        return value
    firsts = {n.name.split("/")[1] for n in model.graph.node if n.name.startswith("/") and n.name.count("/") >= 2}
    return firsts.pop() if len(firsts) == 1 else ""


def _value_info_types(graph: onnx.GraphProto) -> dict[str, int]:
    out = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


def _quantize_output_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    out_dtype = attribute(node, "output_dtype", 0)
    if out_dtype:
        return int(out_dtype)
    if len(node.input) > 2 and node.input[2] in types:
        return types[node.input[2]]
    return UINT8


def skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy without value_info and without the bytes of large initializers (dims and types kept):
    enough for type and shape inference, and never near protobuf's 2 GB limit."""
    out = onnx.ModelProto()
    graph = model.graph
    big = [t for t in graph.initializer if len(t.raw_data) > keep_bytes]
    saved = [(t, t.raw_data) for t in big]
    for t, _ in saved:
        t.ClearField("raw_data")
    try:
        out.CopyFrom(model)
    finally:
        for t, raw in saved:
            t.raw_data = raw
    del out.graph.value_info[:]
    return out


def infer_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor we can type: ONNX inference first, then propagation."""
    graph = model.graph
    types: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
    for vi in [*graph.input, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    stripped = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(stripped, check_type=False, strict_mode=False, data_prop=False)
        for name, t in _value_info_types(inferred.graph).items():
            types.setdefault(name, t)
    except Exception:  # inference is a help, never a requirement: propagation below covers the graph
        pass
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
    # Propagate in graph order for what inference left untyped (custom ops and their consumers).
    for _ in range(2):
        for node in graph.node:
            outs = [o for o in node.output if o]
            if all(o in types for o in outs):
                continue
            op = node.op_type
            if op == "Cast":
                types[outs[0]] = int(attribute(node, "to"))
            elif op in Q_OPS:
                types[outs[0]] = _quantize_output_type(node, types)
            elif op in DQ_OPS:
                if len(node.input) > 1 and node.input[1] in types:
                    types[outs[0]] = types[node.input[1]]
            elif op in FP4_DYNAMIC_OPS:
                types[outs[0]] = FP4
                if len(outs) > 1:
                    types[outs[1]] = FP8
            elif op in ("Shape", "Size", "NonZero", "ArgMax", "ArgMin"):
                types[outs[0]] = TensorProto.INT64
            elif op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "IsNaN",
                        "IsInf"):
                types[outs[0]] = TensorProto.BOOL
            else:
                float_in = [types[i] for i in node.input if i in types and types[i] in FLOAT_TYPES]
                any_in = [types[i] for i in node.input if i in types]
                guess = float_in[0] if float_in else (any_in[0] if any_in else None)
                if op == "Where" and len(node.input) > 1 and node.input[1] in types:
                    guess = types[node.input[1]]
                if guess is not None:
                    for o in outs:
                        types.setdefault(o, guess)
    return types
