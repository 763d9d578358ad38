"""Graph surgery: turn ModelOpt's raw ONNX export into the graph a strongly-typed TensorRT build needs.

Each pass takes and returns a ModelProto and says what it changed (`SurgeryLog`), so export.json
records why the graph differs from what the exporter wrote. The passes: standard-domain FP8 Q/DQ
(ModelOpt leaves domain "trt" on ops it renamed), stale value_info dropped, constants folded (INT8
weights become INT8 initializers; DequantizeLinear is never folded away), dead nodes removed,
Q/DQ scales retyped to the dtype of the tensor they quantize, and I/O names and dtypes set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantkit.export.graph import (
    BFLOAT16, FLOAT16, DQ_OPS, FLOAT, FLOAT_TYPES, FP4_DYNAMIC_OPS, PASS_THROUGH_OPS, Q_OPS, TORCH_TO_ONNX, GraphIndex,
    attribute, dtype_name,
)

log = logging.getLogger(__name__)

# Ops whose float inputs must all have one type (ONNX type constraint T shared by the inputs).
_SAME_TYPE_OPS = {"MatMul": None, "Gemm": None, "Add": None, "Sub": None, "Mul": None, "Div": None,
                  "Conv": None, "ConvTranspose": None, "Concat": None, "Max": None, "Min": None, "Sum": None,
                  "LayerNormalization": None, "Where": (1, 2), "Pow": (0,)}


@dataclass
class SurgeryLog:
    """What the passes changed: pass name -> count, plus one line per notable change."""

    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, count: int, note: str | None = None) -> None:
        if count:
            self.counts[name] = self.counts.get(name, 0) + count
            if note:
                self.notes.append(note)

    def to_dict(self) -> dict:
        return {"passes": dict(self.counts), "notes": list(self.notes)}


# ---------------------------------------------------------------------------------------------
# individual passes


def standard_qdq_domain(model: onnx.ModelProto) -> int:
    """QuantizeLinear/DequantizeLinear left in domain "trt" -> the standard ONNX domain.

    ModelOpt's FP8 exporter renames TRT_FP8QuantizeLinear to QuantizeLinear but keeps the node's
    domain, so neither the ONNX checker nor ONNX Runtime finds the op; TensorRT's parser accepts the
    standard op with a FLOAT8E4M3FN zero point.
    """
    changed = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain not in ("", "ai.onnx"):
            node.domain = ""
            changed += 1
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return changed


def drop_value_info(model: onnx.ModelProto) -> int:
    """Drop intermediate value_info: ModelOpt leaves stale entries (UINT8 on FP8 Q outputs, FP32 on
    DQ outputs it retyped) that make shape inference and ONNX Runtime reject the graph."""
    n = len(model.graph.value_info)
    del model.graph.value_info[:]
    return n


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Constant folding with onnx-graphsurgeon (evaluated by ONNX Runtime), then dead-node cleanup.

    DequantizeLinear nodes and custom-domain ops are never folded: folding a DQ of a constant
    weight would turn the quantized weight back into a float one. A QuantizeLinear of a constant
    float weight (INT8 export) does fold, into an INT8 initializer.
    """
    import onnx_graphsurgeon as gs

    before = len(model.graph.node)

    def exclude(node) -> bool:
        return node.op in DQ_OPS or node.op in FP4_DYNAMIC_OPS or (node.domain not in ("", "ai.onnx", None))

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    try:
        graph.fold_constants(partitioning="basic", error_ok=True, should_exclude_node=exclude, fold_shapes=True)
    except Exception as e:  # a graph that cannot be evaluated stays unfolded, which TensorRT can still take
        log.warning("constant folding skipped: %s", e)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(model, out)
    return out, before - len(out.graph.node)


def quantize_constant_weights(model: onnx.ModelProto) -> int:
    """QuantizeLinear of a constant float weight (ModelOpt's INT8 export) -> an INT8 initializer.

    onnx-graphsurgeon never folds Q/DQ, so the INT8 graph would keep FP32 weights plus a Q/DQ pair
    (4x the size, and a Q that TensorRT has to run at build time). The DequantizeLinear stays.
    """
    index = GraphIndex.build(model)
    folded, keep = 0, []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2:
            keep.append(node)
            continue
        x, scale = index.constant_value(node.input[0]), index.constant_value(node.input[1])
        zp = index.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if x is None or scale is None or (zp is not None and zp.dtype not in (np.int8, np.uint8)) or \
                attribute(node, "block_size", 0):
            keep.append(node)
            continue
        axis = int(attribute(node, "axis", 1))
        s = scale.astype(np.float32)
        z = zp.astype(np.int32) if zp is not None else np.zeros((), np.int32)
        if s.ndim == 1 and x.ndim > 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            s = s.reshape(shape)
            z = z.reshape(shape) if z.ndim == 1 else z
        out_type = zp.dtype if zp is not None else np.uint8
        lo, hi = (-128, 127) if out_type == np.int8 else (0, 255)
        q = np.clip(np.rint(x.astype(np.float32) / s) + z, lo, hi).astype(out_type)
        model.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded += 1
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return folded


def _restore_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """onnx-graphsurgeon drops or resets model-level fields: keep the exporter's."""
    dst.ir_version = src.ir_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version


def _set_initializer_dtype(model: onnx.ModelProto, index: GraphIndex, name: str, elem_type: int) -> bool:
    """Rewrite a float initializer (or Constant) `name` in another float type; False if not constant."""
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    if name in index.initializers:
        init = index.initializers[name]
        original = numpy_helper.to_array(init).astype(np.float32)
        value = original.astype(np_type)
        init.CopyFrom(numpy_helper.from_array(value, name))
        nonzero = original != 0
        if nonzero.any():
            err = float(np.max(np.abs(value.astype(np.float32)[nonzero] - original[nonzero]) / np.abs(original[nonzero])))
            # Twice the format's own rounding bound (FP16 2^-11, BF16 2^-8): more means subnormal or underflow.
            bound = {FLOAT16: 2.0**-10, BFLOAT16: 2.0**-7}.get(elem_type, 0.0)
            if bound and err > bound:
                log.debug("scale %s loses %.2g relative precision in %s", name, err, dtype_name(elem_type))
                _PRECISION_NOTES.append(f"scale '{name}' in {dtype_name(elem_type)} is off by up to {err:.1e} "
                                        "(relative: below the format's normal range)")
        return True
    node = index.producer.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                value = numpy_helper.to_array(a.t).astype(np.float32).astype(np_type)
                a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))
                return True
    return False


_PRECISION_NOTES: list[str] = []


def _scale_source(index: GraphIndex, scale: str) -> str:
    """A scale may itself be a DQ (NVFP4's second level); the constant to retype is at the end of that."""
    node = index.producer.get(scale)
    if node is not None and node.op_type in DQ_OPS and len(node.input) > 1:
        return node.input[1]
    return scale


def match_qdq_scale_dtypes(model: onnx.ModelProto, graph_type: int = FLOAT) -> tuple[int, list[str]]:
    """Give every Q/DQ scale the float type of the tensor it quantizes or produces.

    QuantizeLinear needs scale and input of one type; DequantizeLinear's output takes the scale's
    type, so an FP32 scale on an FP16 graph (the FP16-weights export) feeds FP32 into FP16 ops,
    which ONNX Runtime rejects and a strongly-typed build would run in FP32.
    """
    index = GraphIndex.build(model)
    changed, notes = 0, []
    for node in model.graph.node:
        if node.op_type not in Q_OPS or len(node.input) < 2:
            continue
        x_type, s_type = index.dtype(node.input[0]), index.dtype(node.input[1])
        if x_type in FLOAT_TYPES and s_type in FLOAT_TYPES and x_type != s_type:
            if _set_initializer_dtype(model, index, node.input[1], x_type):
                changed += 1
                notes.append(f"{node.name}: scale {dtype_name(s_type)} -> {dtype_name(x_type)} (input is {dtype_name(x_type)})")
    if changed:
        index = GraphIndex.build(model)
    for _ in range(3):  # a retyped DQ can make the next mismatch visible
        fixed = _retype_dq_for_consumers(model, index, notes, graph_type)
        if not fixed:
            break
        changed += fixed
        index = GraphIndex.build(model)
    return changed, notes


def _dq_feeding(index: GraphIndex, tensor: str):
    node = index.upstream(tensor, through=PASS_THROUGH_OPS)
    return node if node is not None and node.op_type in DQ_OPS else None


def _retype_dq_for_consumers(model: onnx.ModelProto, index: GraphIndex, notes: list[str], graph_type: int) -> int:
    changed = 0
    for node in model.graph.node:
        if node.op_type not in _SAME_TYPE_OPS:
            continue
        positions = _SAME_TYPE_OPS[node.op_type]
        inputs = [(i, t) for i, t in enumerate(node.input) if t and (positions is None or i in positions)]
        typed = [(i, t, index.dtype(t)) for i, t in inputs if index.dtype(t) in FLOAT_TYPES]
        if len({ty for _, _, ty in typed}) < 2:
            continue
        # The type the non-DQ inputs agree on is the compute type; DQ-fed inputs follow it.
        non_dq = {ty for _, t, ty in typed if _dq_feeding(index, t) is None}
        if len(non_dq) > 1 or (not non_dq and graph_type not in {ty for _, _, ty in typed}):
            continue
        # Every input DQ-fed (NVFP4 weights and activations): the graph's float type decides.
        want = non_dq.pop() if non_dq else graph_type
        for _, t, ty in typed:
            if ty == want:
                continue
            dq = _dq_feeding(index, t)
            if dq is None or len(dq.input) < 2:
                continue
            source = _scale_source(index, dq.input[1])
            if _set_initializer_dtype(model, index, source, want):
                changed += 1
                notes.append(f"{dq.name}: scale {dtype_name(ty)} -> {dtype_name(want)} to match {node.op_type} "
                             f"'{node.name}'")
    return changed


# A Cast changes the type its consumer computes in, which can make the next op downstream clash
# (T5's GELU: x + 0.044715 * x**3 with x an NVFP4 MatMul's FP16 output): repair until none is left.
_MAX_REPAIR_PASSES = 16


def repair_type_clashes(model: onnx.ModelProto, graph_type: int) -> tuple[int, list[str]]:
    """An op whose float inputs disagree (no DQ scale could fix it) gets a Cast to the graph's type.

    ModelOpt's NVFP4 exporter computes each NVFP4 MatMul in FP16 even in an FP32 graph and leaves
    the FP32 bias Add behind it; the Cast back to FP32 is what a strongly-typed build needs there.
    The types are inferred again after each pass, since a Cast retypes everything downstream of it.
    """
    total, notes = 0, []
    for _ in range(_MAX_REPAIR_PASSES):
        count, pass_notes = _repair_type_clashes_once(model, graph_type)
        total += count
        notes.extend(pass_notes)
        if not count:
            break
    return total, notes


def _repair_type_clashes_once(model: onnx.ModelProto, graph_type: int) -> tuple[int, list[str]]:
    index = GraphIndex.build(model)
    namer = set(index.producer) | set(index.initializers)
    added, notes = [], []
    for node in model.graph.node:
        if node.op_type not in _SAME_TYPE_OPS:
            continue
        positions = _SAME_TYPE_OPS[node.op_type]
        typed = [(i, t, index.dtype(t)) for i, t in enumerate(node.input)
                 if t and (positions is None or i in positions) and index.dtype(t) in FLOAT_TYPES]
        types = {ty for _, _, ty in typed}
        if len(types) < 2:
            continue
        target = graph_type if graph_type in types else max(types, key=lambda ty: [ty for _, _, ty in typed].count(ty))
        for i, t, ty in typed:
            if ty == target:
                continue
            name = f"{t}_as_{dtype_name(target)}"
            k = 0
            while name in namer:
                k += 1
                name = f"{t}_as_{dtype_name(target)}_{k}"
            namer.add(name)
            added.append((node, helper.make_node("Cast", [t], [name], to=target, name=f"{node.name}/input{i}_cast")))
            node.input[i] = name
            notes.append(f"{node.op_type} '{node.name}': input {i} {dtype_name(ty)} cast to {dtype_name(target)}")
    if added:
        order = []
        pending = {id(n): [c for m, c in added if m is n] for n, _ in added}
        for n in model.graph.node:
            order.extend(pending.get(id(n), []))
            order.append(n)
        del model.graph.node[:]
        model.graph.node.extend(order)
    return len(added), notes


def enforce_io_dtypes(model: onnx.ModelProto, io_type: int) -> tuple[int, list[str]]:
    """Float graph inputs and outputs in the recipe's io_dtype, with explicit Casts inside.

    ModelOpt's FP16-weights conversion turns the graph's float I/O into FP16 (keep_io_types=False)
    and rewrites the output Cast, leaving outputs declared FP32 but computed in FP16.
    """
    changed, notes = 0, []
    index = GraphIndex.build(model)
    initializers = set(index.initializers)
    new_nodes = []
    for vi in model.graph.input:
        t = vi.type.tensor_type
        if vi.name in initializers or t.elem_type not in FLOAT_TYPES or t.elem_type == io_type:
            continue
        inner = t.elem_type
        cast_out = f"{vi.name}_as_{dtype_name(inner)}"
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == vi.name:
                    node.input[i] = cast_out
        new_nodes.append(helper.make_node("Cast", [vi.name], [cast_out], to=inner, name=f"/{vi.name}/io_cast"))
        t.elem_type = io_type
        changed += 1
        notes.append(f"input {vi.name}: {dtype_name(io_type)} at the boundary, cast to {dtype_name(inner)} inside")
    tail = []
    for vi in model.graph.output:
        actual = index.dtype(vi.name) if vi.name in index.producer else None
        t = vi.type.tensor_type
        want = io_type if (actual in FLOAT_TYPES or t.elem_type in FLOAT_TYPES) else None
        if want is None or actual is None or actual == want:
            if want is not None:
                t.elem_type = want
            continue
        inner_name = f"{vi.name}_{dtype_name(actual)}"
        index.producer[vi.name].output[list(index.producer[vi.name].output).index(vi.name)] = inner_name
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name == vi.name:
                    node.input[i] = inner_name
        tail.append(helper.make_node("Cast", [inner_name], [vi.name], to=want, name=f"/{vi.name}/io_cast"))
        t.elem_type = want
        changed += 1
        notes.append(f"output {vi.name}: computed in {dtype_name(actual)}, cast to {dtype_name(want)} at the boundary")
    if new_nodes or tail:
        nodes = new_nodes + list(model.graph.node) + tail
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return changed, notes


def remove_noop_casts(model: onnx.ModelProto) -> int:
    """Cast to the type its input already has: bypassed (graph outputs keep their names)."""
    index = GraphIndex.build(model)
    outputs = set(index.graph_outputs)
    removed = 0
    keep = []
    rename: dict[str, str] = {}
    for node in model.graph.node:
        if (node.op_type == "Cast" and node.output[0] not in outputs
                and index.dtype(node.input[0]) == int(attribute(node, "to", -1))):
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            removed += 1
            continue
        keep.append(node)
    if not removed:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed


def set_io(model: onnx.ModelProto, input_names: list[str], output_names: list[str]) -> int:
    """Rename graph inputs/outputs (ModelOpt names them args.N / out.N) to the model's names."""
    mapping = {}
    real_inputs = [v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    for vi, name in zip(real_inputs, input_names):
        mapping[vi.name] = name
    for vi, name in zip(model.graph.output, output_names):
        mapping[vi.name] = name
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return 0
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in model.graph.node:
        for i, n in enumerate(node.input):
            if n in mapping:
                node.input[i] = mapping[n]
        for i, n in enumerate(node.output):
            if n in mapping:
                node.output[i] = mapping[n]
    return len(mapping)


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in values.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def infer_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fresh value_info from ONNX shape inference (what tools and readers of the file see).

    Inference runs on a weightless skeleton, so a graph past protobuf's 2 GB limit gets types too."""
    from quantkit.export.graph import skeleton

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as e:
        log.warning("shape inference failed after surgery: %s", e)
        return model
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {vi.name: vi for vi in inferred.graph.output}
    for vi in model.graph.output:
        if vi.name in outputs and not vi.type.tensor_type.shape.dim:
            vi.CopyFrom(outputs[vi.name])
    return model


# ---------------------------------------------------------------------------------------------
# the sequence


Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


def prepare_for_tensorrt(model: onnx.ModelProto, input_names: list[str] | None = None,
                         output_names: list[str] | None = None, fold: bool = True,
                         io_dtype: str | None = None) -> tuple[onnx.ModelProto, SurgeryLog]:
    """Every pass in order; returns the new model and what changed."""
    surgery = SurgeryLog()
    surgery.add("standard_qdq_domain", standard_qdq_domain(model),
                "FP8 Q/DQ moved from domain 'trt' to the standard ONNX domain")
    surgery.add("drop_stale_value_info", drop_value_info(model))
    if input_names or output_names:
        surgery.add("rename_io", set_io(model, input_names or [], output_names or []))
    if fold:
        model, folded = fold_constants(model)
        surgery.add("fold_constants", folded, f"constant folding removed {folded} nodes" if folded else None)
    graph_type = TORCH_TO_ONNX.get({p.key: p.value for p in model.metadata_props}.get("quantkit.weights_dtype", ""), FLOAT)
    _PRECISION_NOTES.clear()
    count, notes = match_qdq_scale_dtypes(model, graph_type)
    surgery.add("match_qdq_scale_dtypes", count)
    surgery.notes.extend(_PRECISION_NOTES[:10])
    folded_q = quantize_constant_weights(model)
    surgery.add("quantize_constant_weights", folded_q,
                f"{folded_q} constant float weights quantized to INT8 initializers (Q of a constant folded)"
                if folded_q else None)
    if folded_q:
        model, _ = fold_constants(model)  # the float weights and scale constants left unused
    surgery.notes.extend(notes[:20] + ([f"... and {len(notes) - 20} more scale retypes"] if len(notes) > 20 else []))
    count, notes = repair_type_clashes(model, graph_type)
    surgery.add("repair_type_clashes", count)
    surgery.notes.extend(notes[:20] + ([f"... and {len(notes) - 20} more casts"] if len(notes) > 20 else []))
    if io_dtype:
        count, notes = enforce_io_dtypes(model, TORCH_TO_ONNX[io_dtype])
        surgery.add("enforce_io_dtypes", count)
        surgery.notes.extend(notes)
    surgery.add("remove_noop_casts", remove_noop_casts(model))
    model = infer_value_info(model)
    return model, surgery
