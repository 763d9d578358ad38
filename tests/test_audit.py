"""The precision audit: counts on an exported FP8 graph, and graphs broken on purpose (a protected
Softmax cast down to FP16, a planned FP8 layer with its Q/DQ removed) fail naming the node;
RMSNorm and RoPE patterns are found with the dtype they compute in."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_export import export_tiny

from quantkit.cli import main as cli_main
from quantkit.export.audit import audit


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    loaded, plan, graph, surgery, ref, x = export_tiny("fp8", tmp)
    plan_dict = plan.to_dict()
    # The tiny attention's softmax: protected whether or not protect.py recognised the block.
    if not any(p["op"] == "softmax" and p["name"] == "blocks.0" for p in plan_dict["protected"]):
        plan_dict["protected"].append({"name": "blocks.0", "op": "softmax", "module_class": "TinyBlock", "how": "test"})
    (tmp / "plan.json").write_text(json.dumps(plan_dict))
    return tmp, plan_dict


def test_exported_fp8_graph_passes_with_counts(exported):
    tmp, plan = exported
    result = audit(tmp / "model.onnx", plan)
    assert result, result.violations
    assert result.counts["compute_by_format"]["fp8"] == {"MatMul": 12}  # 2 blocks x 6 linears
    assert result.counts["compute_by_format"]["unquantized"] == {"MatMul": 5}  # head + 2x(Q·Kᵀ, P·V)
    assert result.counts["attention_matmuls"] == {"with_qdq": 0, "without_qdq": 4}
    assert result.counts["softmax"] == {"float32": 2}
    assert result.counts["norms"] == {"layernorm:float32": 4}
    assert {r["module"] for r in result.compute if r["weights"] == "fp8"} >= {"blocks.0.q_proj", "blocks.1.down"}


def _insert_fp16_softmax(model: onnx.ModelProto) -> str:
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax" and "blocks.0" in n.name)
    src, out = softmax.input[0], softmax.output[0]
    softmax.input[0], softmax.output[0] = "narrowed", "softmax16"
    nodes = list(model.graph.node)
    i = nodes.index(softmax)
    nodes.insert(i, helper.make_node("Cast", [src], ["narrowed"], to=TensorProto.FLOAT16, name="/evil/Cast_fp16"))
    nodes.insert(i + 2, helper.make_node("Cast", ["softmax16"], [out], to=TensorProto.FLOAT, name="/evil/Cast_back"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return softmax.name


def test_protected_softmax_cast_down_to_fp16_fails_naming_the_node(exported, tmp_path):
    tmp, plan = exported
    model = onnx.load(str(tmp / "model.onnx"))
    name = _insert_fp16_softmax(model)
    onnx.save(model, str(tmp_path / "broken.onnx"))
    result = audit(tmp_path / "broken.onnx", plan)
    assert not result
    hits = [v for v in result.violations if name in v]
    assert hits and "float16" in hits[0] and "/evil/Cast_fp16" in hits[0], result.violations
    assert any(c["node"] == "/evil/Cast_fp16" for c in result.narrowing_casts)


def _strip_qdq(model: onnx.ModelProto, layer_scope: str) -> str:
    """Remove the weight DQ and the activation Q/DQ of one linear: its MatMul runs on plain floats."""
    nodes = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and n.name == f"{layer_scope}/MatMul")
    drop = []
    for i, tensor in enumerate(list(matmul.input)):
        producer = nodes.get(tensor)
        chain = []
        while producer is not None and producer.op_type in ("Transpose", "Cast"):
            chain.append(producer)
            producer = nodes.get(producer.input[0])
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        if producer.input[0] in inits:  # weight: decode the FP8 initializer to a float one
            q = inits[producer.input[0]]
            values = np.frombuffer(q.raw_data, dtype=ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(tuple(q.dims))
            scale = numpy_helper.to_array(inits[producer.input[1]]).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(values * scale, producer.output[0]))
            drop.append(producer)
        else:  # activation: bypass Q and DQ
            quant = nodes[producer.input[0]]
            matmul.input[i] = quant.input[0]
            drop += [producer, quant]
    for n in drop:
        model.graph.node.remove(n)
    return matmul.name


def test_planned_fp8_layer_without_qdq_fails_naming_the_node(exported, tmp_path):
    tmp, plan = exported
    model = onnx.load(str(tmp / "model.onnx"))
    name = _strip_qdq(model, "/model/blocks.0/up")
    onnx.save(model, str(tmp_path / "broken.onnx"))
    result = audit(tmp_path / "broken.onnx", plan)
    assert not result
    hits = [v for v in result.violations if name in v]
    assert len(hits) == 2, result.violations  # weights and activations
    assert all(v.startswith("blocks.0.up: planned fp8") for v in hits)
    assert result.counts["compute_by_format"]["fp8"] == {"MatMul": 11}


def test_quantized_layer_the_plan_left_alone_is_a_violation(exported):
    tmp, plan = exported
    changed = json.loads(json.dumps(plan))
    row = next(r for r in changed["layers"] if r["name"] == "blocks.1.q_proj")
    row.update(precision="skip", weights=None, activations=None)
    result = audit(tmp / "model.onnx", changed)
    assert any(v.startswith("blocks.1.q_proj: the plan leaves it unquantized") for v in result.violations)


def test_audit_cli_exits_1_and_writes_audit_json(exported, tmp_path):
    tmp, plan = exported
    model = onnx.load(str(tmp / "model.onnx"))
    _insert_fp16_softmax(model)
    onnx.save(model, str(tmp_path / "model.onnx"))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert cli_main(["audit", str(tmp_path / "model.onnx"), "-q"]) == 1
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["passed"] is False and written["violations"]
    assert cli_main(["audit", str(tmp / "model.onnx"), "--plan", str(tmp / "plan.json"), "--out",
                     str(tmp_path / "ok.json")]) == 0


def _norm_and_rope_graph(fp32: bool) -> onnx.ModelProto:
    """x -> RMSNorm (ReduceMean(x^2)...Reciprocal) -> RoPE (x*cos + rotate_half(x)*sin), FP16 I/O.

    With fp32 the two patterns compute in FP32 between Casts (as protect.py exports them)."""
    h, f = TensorProto.FLOAT16, TensorProto.FLOAT
    inner = f if fp32 else h
    npt = np.float32 if fp32 else np.float16
    c = lambda name, v, t=npt: numpy_helper.from_array(np.asarray(v, dtype=t), name)  # noqa: E731
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=inner, name="/model/norm/Cast"),
        helper.make_node("Pow", ["xf", "two"], ["sq"], name="/model/norm/Pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, name="/model/norm/ReduceMean"),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="/model/norm/Add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="/model/norm/Sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv"], name="/model/norm/Reciprocal"),
        helper.make_node("Mul", ["xf", "inv"], ["normed"], name="/model/norm/Mul"),
        helper.make_node("Slice", ["normed", "s0", "s1", "ax"], ["x1"], name="/model/attn/Slice"),
        helper.make_node("Slice", ["normed", "s1", "s2", "ax"], ["x2"], name="/model/attn/Slice_1"),
        helper.make_node("Neg", ["x2"], ["nx2"], name="/model/attn/Neg"),
        helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1, name="/model/attn/Concat"),
        helper.make_node("Mul", ["normed", "cos"], ["a"], name="/model/attn/Mul"),
        helper.make_node("Mul", ["rot", "sin"], ["b"], name="/model/attn/Mul_1"),
        helper.make_node("Add", ["a", "b"], ["roped"], name="/model/attn/Add"),
        helper.make_node("Cast", ["roped"], ["y"], to=h, name="/model/attn/Cast"),
    ]
    inits = [c("two", 2.0), numpy_helper.from_array(np.array([-1], np.int64), "axes"), c("eps", 1e-6),
             numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([4], np.int64), "s1"),
             numpy_helper.from_array(np.array([8], np.int64), "s2"), numpy_helper.from_array(np.array([-1], np.int64), "ax"),
             c("cos", np.ones(8)), c("sin", np.zeros(8))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", h, [2, 8])],
                              [helper.make_tensor_value_info("y", h, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("fp32", [True, False])
def test_rmsnorm_and_rope_patterns_are_found_with_their_dtype(fp32):
    plan = {"layers": [], "attention": [],
            "protected": [{"name": "norm", "op": "rmsnorm"}, {"name": "pkg.modeling:apply_rotary_pos_emb", "op": "rope"}]}
    result = audit(_norm_and_rope_graph(fp32), plan)
    want = "float32" if fp32 else "float16"
    assert [(r["kind"], r["dtype"]) for r in result.norms] == [("rmsnorm", want)]
    assert [(r["node"], r["dtype"]) for r in result.rope] == [("/model/attn/Add", want)]
    assert bool(result) is fp32
    if not fp32:
        assert any("protected rmsnorm '/model/norm/ReduceMean'" in v for v in result.violations)
        assert any("protected rope '/model/attn/Add'" in v for v in result.violations)


def test_exporter_added_softmax_qdq_is_explicit_not_a_violation(exported, tmp_path):
    """ModelOpt's FP8 exporter puts Q/DQ (scale 1/448) after a Softmax feeding a MatMul, which the PyTorch
    model does not have; the audit lists it instead of failing (quantkit's FP32 softmax Cast prevents it)."""
    import onnx_graphsurgeon as gs
    from modelopt.onnx.export.fp8_exporter import FP8QuantExporter

    tmp, plan = exported
    graph = gs.import_onnx(onnx.load(str(tmp / "model.onnx")))
    assert FP8QuantExporter._insert_qdq_after_softmax(graph) == 2
    model = gs.export_onnx(graph)
    result = audit(model, plan)
    assert result, result.violations
    assert len(result.exporter_added) == 2 and "1/448" in result.exporter_added[0]
    assert result.counts["attention_matmuls"] == {"with_qdq": 2, "without_qdq": 2}
    assert sum(r["exporter_added_qdq"] for r in result.attention) == 2
