"""The copy of an exported graph that ONNX Runtime can run as a reference.

ONNX Runtime cannot run TensorRT's custom ops, so `verification_copy()` rewrites them with standard
ONNX (opset 21+): the dynamic NVFP4 quantizer `trt::TRT_FP4DynamicQuantize` and its two
DequantizeLinear become the same arithmetic in plain ops (block max, FP8-rounded block scale, E2M1
rounding), FP4 weights that the CPU provider cannot dequantize are decoded to float, and FP16/BF16
graphs are computed in FP32 with every 16-bit tensor explicitly rounded to its 16-bit type (the CPU
provider lacks most 16-bit kernels and silently skips roundings between its FP32 fallbacks).
`verification_runner()` opens an OnnxRuntimeRunner over that copy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantkit.export.graph import infer_dtypes
from quantkit.runtime.onnxruntime import OnnxRuntimeRunner

_FP4 = getattr(TensorProto, "FLOAT4E2M1", 23)
_FP8 = TensorProto.FLOAT8E4M3FN
VERIFICATION_MIN_OPSET = 21
E2M1_MAX, E4M3_MAX = 6.0, 448.0
_BLOCK_SCALE_FLOOR = 1e-5  # ModelOpt's kernel: a block scale below this becomes 1.0


class _Namer:
    def __init__(self, model: onnx.ModelProto, prefix: str):
        self.taken = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
        self.prefix, self.i = prefix, 0

    def __call__(self, hint: str) -> str:
        while True:
            self.i += 1
            name = f"{self.prefix}/{hint}_{self.i}"
            if name not in self.taken:
                self.taken.add(name)
                return name


class UnsupportedGraph(ValueError):
    """The graph holds ops ONNX Runtime cannot run (e.g. TensorRT custom ops): no reference here."""


def _const(nodes: list, namer: _Namer, value, dtype=np.float32) -> str:
    name = namer("const")
    nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype))))
    return name


def _op(nodes: list, namer: _Namer, op: str, inputs: list[str], **attrs) -> str:
    out = namer(op)
    nodes.append(helper.make_node(op, inputs, [out], **attrs))
    return out


def _fp4_dynamic_emulation(node: onnx.NodeProto, scale_dq: onnx.NodeProto, data_dq: onnx.NodeProto,
                           namer: _Namer, float_type: int) -> list[onnx.NodeProto]:
    """Standard ops computing data_dq's output from node's input, as ModelOpt's NVFP4 fake quant does.

    Blocks of `block_size` along the last axis: scale = fp8(amax / (6 * g)) * g (1.0 below 1e-5),
    values = sign(x) * e2m1_round(|x| / scale) * scale, where g is the per-tensor (global) scale.
    E2M1 rounding: ONNX Round is half-to-even, so round(v / step) * step with step 0.5, 1, 2 on
    [0, 2), [2, 4), [4, 6] gives E2M1's nearest-even values; v is clamped at 6 first (saturation).
    """
    block = 16
    for a in data_dq.attribute:
        if a.name == "block_size":
            block = a.i
    x, g = node.input[0], node.input[1]
    nodes: list = []
    c = lambda v: _const(nodes, namer, v)  # noqa: E731
    xf = _op(nodes, namer, "Cast", [x], to=TensorProto.FLOAT)
    gf = _op(nodes, namer, "Cast", [g], to=TensorProto.FLOAT)
    shape = _op(nodes, namer, "Shape", [xf])
    lead = _op(nodes, namer, "Slice", [shape, _const(nodes, namer, [0], np.int64), _const(nodes, namer, [-1], np.int64)])
    last = _op(nodes, namer, "Slice", [shape, _const(nodes, namer, [-1], np.int64), _const(nodes, namer, [2**62], np.int64)])
    nblocks = _op(nodes, namer, "Div", [last, _const(nodes, namer, [block], np.int64)])
    bshape = _op(nodes, namer, "Concat", [lead, nblocks, _const(nodes, namer, [block], np.int64)], axis=0)
    xb = _op(nodes, namer, "Reshape", [xf, bshape])
    mag = _op(nodes, namer, "Abs", [xb])
    amax = _op(nodes, namer, "ReduceMax", [mag, _const(nodes, namer, [-1], np.int64)], keepdims=1)
    ratio = _op(nodes, namer, "Div", [amax, _op(nodes, namer, "Mul", [gf, c(E2M1_MAX)])])
    ratio = _op(nodes, namer, "Min", [ratio, c(E4M3_MAX)])
    fp8 = _op(nodes, namer, "Cast", [ratio], to=_FP8, saturate=1)
    scale = _op(nodes, namer, "Mul", [_op(nodes, namer, "Cast", [fp8], to=TensorProto.FLOAT), gf])
    tiny = _op(nodes, namer, "Less", [scale, c(_BLOCK_SCALE_FLOOR)])
    scale = _op(nodes, namer, "Where", [tiny, c(1.0), scale])
    v = _op(nodes, namer, "Min", [_op(nodes, namer, "Div", [mag, scale]), c(E2M1_MAX)])
    step = _op(nodes, namer, "Where", [_op(nodes, namer, "Less", [v, c(2.0)]), c(0.5),
                                       _op(nodes, namer, "Where", [_op(nodes, namer, "Less", [v, c(4.0)]), c(1.0), c(2.0)])])
    q = _op(nodes, namer, "Mul", [_op(nodes, namer, "Round", [_op(nodes, namer, "Div", [v, step])]), step])
    sign = _op(nodes, namer, "Where", [_op(nodes, namer, "Less", [xb, c(0.0)]), c(-1.0), c(1.0)])
    y = _op(nodes, namer, "Mul", [_op(nodes, namer, "Mul", [q, scale]), sign])
    y = _op(nodes, namer, "Reshape", [y, shape])
    nodes.append(helper.make_node("Cast", [y], [data_dq.output[0]], to=float_type))
    return nodes


def _decode_fp4(t: onnx.TensorProto) -> np.ndarray:
    import ml_dtypes

    raw = np.frombuffer(t.raw_data, dtype=np.uint8)
    lo, hi = raw & 0x0F, raw >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(-1)[: int(np.prod(t.dims))]
    return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(tuple(t.dims))


def _fold_fp4_weight_dq(model: onnx.ModelProto) -> int:
    """DQ(DQ(fp8 block scales, g), fp4 weights) of constants -> one float initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    remove, added = [], []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or inits[node.input[0]].data_type != _FP4:
            continue
        scale_node = producers.get(node.input[1])
        if scale_node is None or scale_node.op_type != "DequantizeLinear":
            continue
        s8, g = inits.get(scale_node.input[0]), inits.get(scale_node.input[1])
        if s8 is None or g is None:
            continue
        import ml_dtypes

        block_scales = np.frombuffer(s8.raw_data, dtype=ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(tuple(s8.dims))
        scales = block_scales * numpy_helper.to_array(g).astype(np.float32)
        values = _decode_fp4(inits[node.input[0]])
        block = next((a.i for a in node.attribute if a.name == "block_size"), 16)
        weights = values * np.repeat(scales, block, axis=-1)[..., : values.shape[-1]]
        out_type = numpy_helper.to_array(g).dtype
        added.append(numpy_helper.from_array(weights.astype(out_type), node.output[0]))
        remove += [node, scale_node]
    for n in remove:
        if n in model.graph.node:
            model.graph.node.remove(n)
    model.graph.initializer.extend(added)
    return len(added)


_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
# Ops that only move or select values: their 16-bit outputs are already rounded, no rounding pair needed.
_MOVE_OPS = {"Constant", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice",
             "Gather", "GatherElements", "Concat", "Split", "Shape", "Size"}


def _half_to_fp32(model: onnx.ModelProto) -> int:
    """Every FP16/BF16 initializer, Cast target, constant and graph I/O type in FP32 (values are exact)."""
    changed = 0
    for t in model.graph.initializer:
        if t.data_type in _HALF:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            changed += 1
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i in _HALF:
                a.i = TensorProto.FLOAT
                changed += 1
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in _HALF:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                changed += 1
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.type.tensor_type.elem_type in _HALF:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
            changed += 1
    return changed


def _half_emulated_in_fp32(model: onnx.ModelProto) -> dict[int, int]:
    """Compute a FP16/BF16 graph in FP32, rounding every 16-bit tensor as the graph has it written.

    ONNX Runtime's CPU provider has few 16-bit kernels: it wraps the others in Casts to FP32 and then
    removes the Cast pairs between neighbours, so a chain of FP16 ops runs in FP32 with no rounding
    in between (Add(Add(a, b), c) rounded once): the graph as written is not what runs. Here each
    16-bit output of a computing node gets an explicit Cast(to 16-bit) -> Cast(FLOAT) pair, which
    ONNX Runtime keeps with optimizations off. Returns {16-bit type: tensors rounded}.
    """
    types = infer_dtypes(model)
    _half_to_fp32(model)
    taken = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    counts: dict[int, int] = {}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type in _MOVE_OPS:
            continue
        for i, name in enumerate(node.output):
            half = types.get(name)
            if not name or half not in _HALF:
                continue
            raw, narrow = f"{name}/verify_fp32", f"{name}/verify_rounded"
            if raw in taken or narrow in taken:
                raise ValueError(f"{name}: cannot name the rounding of this tensor ({raw} exists)")
            taken |= {raw, narrow}
            node.output[i] = raw
            nodes.append(helper.make_node("Cast", [raw], [narrow], to=half, name=f"{name}/verify_round"))
            nodes.append(helper.make_node("Cast", [narrow], [name], to=TensorProto.FLOAT, name=f"{name}/verify_widen"))
            counts[half] = counts.get(half, 0) + 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return counts


def verification_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` that ONNX Runtime's CPU provider runs, and one line per change."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes = []
    consumers: dict[str, list] = {}
    for n in out.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    namer = _Namer(out, "verify")
    new_nodes, dropped = [], set()
    emulated = 0
    float_types = {}
    for vi in [*out.graph.input, *out.graph.output]:
        float_types[vi.name] = vi.type.tensor_type.elem_type
    for node in out.graph.node:
        if node.op_type != "TRT_FP4DynamicQuantize":
            continue
        users = consumers.get(node.output[0], [])
        scale_users = consumers.get(node.output[1], []) if len(node.output) > 1 else []
        data_dq = next((u for u in users if u.op_type == "DequantizeLinear"), None)
        scale_dq = next((u for u in scale_users if u.op_type == "DequantizeLinear"), None)
        if data_dq is None or scale_dq is None or len(users) != 1:
            raise ValueError(f"{node.name}: TRT_FP4DynamicQuantize is not followed by the two-level DequantizeLinear")
        out_type = _dq_output_type(out, scale_dq)
        new_nodes.append((node, _fp4_dynamic_emulation(node, scale_dq, data_dq, namer, out_type)))
        dropped |= {id(node), id(scale_dq), id(data_dq)}
        emulated += 1
    if emulated:
        kept = []
        replacements = {id(n): repl for n, repl in new_nodes}
        for node in out.graph.node:
            if id(node) in replacements:
                kept.extend(replacements[id(node)])
            elif id(node) not in dropped:
                kept.append(node)
        del out.graph.node[:]
        out.graph.node.extend(kept)
        notes.append(f"{emulated} trt::TRT_FP4DynamicQuantize + two-level DequantizeLinear emulated with standard ops")
    folded = _fold_fp4_weight_dq(out)
    if folded:
        notes.append(f"{folded} FP4 weights dequantized to float (the CPU provider has no FLOAT4E2M1 DequantizeLinear)")
    if any(t.data_type in _HALF for t in out.graph.initializer) or any(
            vi.type.tensor_type.elem_type in _HALF for vi in [*out.graph.input, *out.graph.output]) or any(
            a.name == "to" and a.i in _HALF for n in out.graph.node for a in n.attribute):
        del out.graph.value_info[:]
        for half, count in sorted(_half_emulated_in_fp32(out).items()):
            name = {TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}[half]
            notes.append(f"{name} computed in FP32 with each of {count} {name} tensors rounded to {name} "
                         "(the CPU provider would skip the roundings between its FP32 fallback kernels)")
    used = {n.domain for n in out.graph.node}
    imports = [o for o in out.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del out.opset_import[:]
    out.opset_import.extend(imports)
    del out.graph.value_info[:]
    custom = sorted({f"{n.domain}::{n.op_type}" for n in out.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise UnsupportedGraph(f"ONNX Runtime cannot run {', '.join(custom)}; no standard-op equivalent is known")
    version = next((o.version for o in imports if o.domain in ("", "ai.onnx")), VERIFICATION_MIN_OPSET)
    if version < VERIFICATION_MIN_OPSET:
        out = _upgrade_opset(out, version)
        notes.append(f"opset {version} -> {VERIFICATION_MIN_OPSET}")
    return out, notes


def _upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The graph in opset VERIFICATION_MIN_OPSET, each op rewritten to that opset's form.

    Raising the version number alone is not enough: ops changed signature in between (opset 18 moved
    ReduceMean's `axes` from an attribute to an input, so a 17 graph relabelled 21 is invalid)."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, VERIFICATION_MIN_OPSET)
    except Exception as e:  # noqa: BLE001 — onnx raises several types; the message names the op
        raise UnsupportedGraph(f"cannot convert the graph from opset {version} to {VERIFICATION_MIN_OPSET} for "
                               f"ONNX Runtime's reference ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                               ) from None


def _add_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Make intermediate tensors graph outputs too (with their inferred element types)."""
    types = infer_dtypes(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, types.get(name) or TensorProto.FLOAT, None))
            present.add(name)


def _dq_output_type(model: onnx.ModelProto, scale_dq: onnx.NodeProto) -> int:
    """The float type of the two-level DQ chain: its per-tensor scale's type."""
    for t in model.graph.initializer:
        if t.name == scale_dq.input[1]:
            return t.data_type
    for n in model.graph.node:
        if scale_dq.input[1] in n.output and n.op_type == "Constant":
            return n.attribute[0].t.data_type
    return TensorProto.FLOAT


def verification_runner(path: str | os.PathLike, *, extra_outputs: list[str] | None = None,
                        **options) -> OnnxRuntimeRunner:
    """An OnnxRuntimeRunner over the verification copy of the graph at `path` (the graph itself when
    it needs no change); `extra_outputs` are intermediate tensors to return too. The copy lives in a
    temporary folder for the runner's lifetime; the runner's `notes` say what the copy changed."""
    path = Path(path)
    model = onnx.load(str(path))
    copy, notes = verification_copy(model)
    if extra_outputs:
        _add_outputs(copy, extra_outputs)
    tmp = None
    model_path = path
    if notes or extra_outputs:
        tmp = tempfile.TemporaryDirectory(prefix="quantkit-ort-")
        model_path = Path(tmp.name) / "verification.onnx"
        big = copy.ByteSize() > 1_900_000_000
        onnx.save_model(copy, str(model_path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="verification.onnx.data")
    del model, copy
    return OnnxRuntimeRunner(model_path, label=path, notes=notes, keep=tmp, **options)
