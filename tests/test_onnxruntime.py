"""ONNX Runtime reference run: the runner interface, the verification copy (dynamic NVFP4 emulated
exactly as ModelOpt's fake quant, FP16/BF16 computed in FP32 with every 16-bit tensor rounded), and reference_run writing report.json."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.test_export import trust_own_runs  # noqa: F401 (autouse)
from tests.test_export import save_tiny_run

from quantkit.runtime import Runner
from quantkit.verify.ort_copy import verification_copy, verification_runner


def _fp4_dynamic_graph(k: int, global_scale: float) -> onnx.ModelProto:
    """x -> trt::TRT_FP4DynamicQuantize -> DQ(block scales, g) -> DQ(values, scales, block 16): ModelOpt's form."""
    nodes = [
        helper.make_node("TRT_FP4DynamicQuantize", ["x", "g"], ["q", "s"], domain="trt", axis=-1, block_size=16,
                         scale_type=TensorProto.FLOAT8E4M3FN, name="/model/fc/input_quantizer/TRT_FP4DynamicQuantize"),
        helper.make_node("DequantizeLinear", ["s", "g"], ["scales"], name="/model/fc/input_quantizer/DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["q", "scales"], ["y"], axis=-1, block_size=16,
                         name="/model/fc/input_quantizer/DequantizeLinear_1"),
    ]
    graph = helper.make_graph(nodes, "fp4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", k])],
                              [numpy_helper.from_array(np.array(global_scale, np.float32), "g")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])


def test_dynamic_nvfp4_emulation_matches_modelopt_fake_quant_exactly(tmp_path):
    from quantkit.nvfp4_cpu import nvfp4_fake_quantize, nvfp4_global_scale

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.logspace(-3, 1, 64)  # blocks of very different ranges
    x[0, :16] = 0.0  # an all-zero block: scale floor
    x[1, 3] = 0.25 * 1e3  # an outlier
    global_amax = x.abs().max()
    path = tmp_path / "fp4.onnx"
    onnx.save(_fp4_dynamic_graph(64, float(nvfp4_global_scale(global_amax))), str(path))
    runner = verification_runner(path)
    assert any("TRT_FP4DynamicQuantize" in n for n in runner.notes)
    out = runner.run({"x": x})["y"]
    ref = nvfp4_fake_quantize(x, global_amax)
    assert torch.equal(out, ref), f"max |err| {(out - ref).abs().max().item()}"


def test_runner_interface_and_input_casts(tmp_path):
    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s"])])
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    runner = verification_runner(path)
    assert isinstance(runner, Runner) and runner.name == "onnxruntime"
    out = runner.run({"ids": torch.tensor([[1, 2, 3]], dtype=torch.int32)})
    assert isinstance(out["y"], torch.Tensor) and out["y"].tolist() == [[1.0, 2.0, 3.0]]
    assert runner.session.get_session_options().graph_optimization_level.name == "ORT_DISABLE_ALL"
    with pytest.raises(ValueError, match="inputs"):
        runner.run({})


def test_bf16_graph_runs_in_fp32_copy():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float32), "w"))
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["w"], ["wb"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xb", "wb"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    copy, notes = verification_copy(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    assert any("BF16" in n for n in notes) and any("opset 19 -> 21" in n for n in notes)
    # BF16 values are computed in FP32; the only BF16 left are the explicit roundings of BF16 tensors.
    rounding = [n for n in copy.graph.node if n.name.endswith("/verify_round")]
    assert [n.output[0].split("/")[0] for n in rounding] == ["xb", "wb", "yb"]  # the two Casts and the MatMul
    assert all(a.i == TensorProto.FLOAT for n in copy.graph.node if n not in rounding for a in n.attribute
               if a.name == "to")


@pytest.mark.parametrize("half", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_graph_rounds_every_tensor_like_pytorch(tmp_path, half):
    """Add(Add(a, b), c) in FP16/BF16: ONNX Runtime's CPU provider alone keeps a + b in FP32 (rounding
    once, 22% of FP16 results differed on MiniLM's embeddings); the runner rounds each Add as torch does."""
    torch_type = {TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}[half]
    nodes = [helper.make_node("Cast", ["a"], ["ah"], to=half), helper.make_node("Cast", ["b"], ["bh"], to=half),
             helper.make_node("Cast", ["c"], ["ch"], to=half), helper.make_node("Add", ["ah", "bh"], ["s1"]),
             helper.make_node("Add", ["s1", "ch"], ["s2"]), helper.make_node("Cast", ["s2"], ["y"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 256]) for n in "abc"]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])])
    path = tmp_path / "adds.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    gen = torch.Generator().manual_seed(0)
    feeds = {n: torch.randn(64, 256, generator=gen) * s for n, s in zip("abc", (1.0, 0.1, 0.1))}
    want = ((feeds["a"].to(torch_type) + feeds["b"].to(torch_type)) + feeds["c"].to(torch_type)).float()
    runner = verification_runner(path)
    assert runner.notes and "rounded" in runner.notes[0]
    assert torch.equal(runner.run(feeds)["y"], want)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    from quantkit.export.onnx_export import export_run

    out = save_tiny_run(tmp_path_factory.mktemp("ortrun"), "int8", samples=20)
    export_run(out)
    return out


def test_opset_17_fp16_graph_is_converted_not_relabelled(tmp_path):
    """An FP16 graph exported at opset 17 (the fp16 recipe's opset): ReduceMean takes `axes` as an attribute
    there and as an input from opset 18. Relabelling the copy 21 made it an invalid graph (gemma, llama,
    qwen2, t5 x fp16 exports died in InferenceSession); the copy is converted op by op."""
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("ReduceMean", ["xh"], ["mh"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["xh", "mh"], ["dh"]),
             helper.make_node("Cast", ["dh"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])])
    path = tmp_path / "rms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    runner = verification_runner(path)
    assert "opset 17 -> 21" in runner.notes
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    xh = x.half()
    want = (xh - xh.float().mean(-1, keepdim=True).half()).float()
    got = runner.run({"x": x})["y"]
    assert got.shape == (3, 8)
    assert torch.equal(got, want)
    copy, _ = verification_copy(onnx.load(str(path)))
    reduce = next(n for n in copy.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 2 and not [a for a in reduce.attribute if a.name == "axes"]


def test_reference_run_writes_report_metrics(exported_run):
    from quantkit.verify.reference import reference_run

    result = reference_run(exported_run)
    report = json.loads((exported_run / "report.json").read_text())
    assert set(report["metrics"]["onnxruntime"]) == {"y"}
    assert set(report["onnxruntime_vs_fake_quant"]) == {"y"}
    assert report["onnxruntime"]["samples"] == result.samples == 2  # 10% of 20 held out
    cos = result.worst_cosine_vs_fake_quant
    assert cos >= 0.9999, f"ORT vs fake-quant cosine {cos}"
    assert result, "truthy when ORT matches fake-quant"
    fq = report["metrics"]["fake-quant"]["y"]["cosine"]
    assert abs(report["metrics"]["onnxruntime"]["y"]["cosine"] - fq) < 1e-3, "ORT is as close to FP32 as fake-quant"


def test_nvfp4_export_keeps_trt_form_and_runs_on_ort(tmp_path):
    """NVFP4 (CPU via quantkit.nvfp4_cpu): trt::TRT_FP4DynamicQuantize + two-level DQ for activations,
    FLOAT4E2M1 weights with FP8 block scales, opset 23, TensorRT >= 11; the ORT copy runs it."""
    from tests.test_export import export_tiny

    from quantkit.export.audit import audit
    from quantkit.trt_requirements import min_tensorrt_version
    from quantkit.metrics import compare

    loaded, plan, graph, surgery, ref, x = export_tiny("nvfp4", tmp_path, opset=23)
    full = onnx.load(str(tmp_path / "model.onnx"))
    ops = [n for n in full.graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    assert len(ops) == 12 and all(n.domain == "trt" for n in ops)
    inits = {t.name: t.data_type for t in full.graph.initializer}
    assert sum(t == TensorProto.FLOAT4E2M1 for t in inits.values()) == 12
    assert sum(t == TensorProto.FLOAT8E4M3FN for t in inits.values()) == 12  # block scales
    assert {o.domain or "": o.version for o in full.opset_import}[""] >= 23
    assert min_tensorrt_version(full)[0] >= (11, 0)
    result = audit(full, plan.to_dict())
    assert result, result.violations
    assert result.counts["compute_by_format"]["nvfp4"] == {"MatMul": 12}
    out = verification_runner(tmp_path / "model.onnx").run({"x": x})["y"]
    m = compare(torch.from_numpy(ref), out)
    # ModelOpt computes NVFP4 MatMuls in FP16 even in an FP32 graph: FP16 rounding, not Q/DQ differences.
    assert m.cosine >= 0.999, f"ORT vs fake-quant cosine {m.cosine}"


def test_custom_ops_are_an_unsupported_graph_not_a_crash(tmp_path):
    """A TensorRT custom op has no ONNX Runtime kernel: a named UnsupportedGraph that export and compare
    turn into "reference skipped" / "not available", instead of a traceback."""
    from quantkit.verify.ort_copy import UnsupportedGraph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("TRT_SomethingCustom", ["x"], ["y"], domain="trt")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("trt", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedGraph, match="ONNX Runtime cannot run trt::TRT_SomethingCustom"):
        verification_runner(path)


def test_reference_compares_each_block_fed_the_graphs_own_input(exported_run):
    """Per block: the PyTorch block gets the tensor the graph fed its block; the head is checked too."""
    from quantkit.verify.reference import reference_run

    result = reference_run(exported_run)
    # blocks.0 reads the graph input itself, so it has no separate input check; blocks.1's input is checked,
    # and what blocks.1 adds to it (its update, without the residual that dominates its output)
    assert set(result.per_block) == {"blocks.0", "blocks.1 input", "blocks.1", "blocks.1 update", "head: y"}
    assert all(m.cosine >= 0.9999 for m in result.per_block.values()), {k: m.cosine for k, m in result.per_block.items()}
    report = json.loads((exported_run / "report.json").read_text())
    assert set(report["onnxruntime_vs_fake_quant_per_block"]) == {"blocks.0", "blocks.1 input", "blocks.1",
                                                                  "blocks.1 update", "head: y"}
    assert report["onnxruntime"]["verdict"] == "per block" and report["onnxruntime"]["passed"] is True


def _with_weight_scale_off(path, quantizer: str, factor: float, tmp_path):
    """A copy of the graph at `path` with the weight DequantizeLinear of `quantizer` scaled by `factor`."""
    from onnx import numpy_helper

    from quantkit.export.graph import GraphIndex

    model = onnx.load(str(path))
    index = GraphIndex.build(model)
    target = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
                  and index.module_of(n) == quantizer and n.input[1] in index.initializers)
    scale = index.initializers[target.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    return broken


def test_a_wrong_scale_in_one_block_fails_that_block_and_no_other(exported_run, tmp_path):
    """A weight DequantizeLinear in blocks.1 with its scale off by 25 %: the per-block check names
    blocks.1, and blocks.0 (fed the same input as PyTorch) still matches."""
    from quantkit.verify.reference import reference_run

    broken = _with_weight_scale_off(exported_run / "model.onnx", "blocks.1.up.weight_quantizer", 1.25, tmp_path)
    result = reference_run(exported_run, onnx_path=broken, update_report=False)
    cos = {k: m.cosine for k, m in result.per_block.items()}
    assert cos["blocks.0"] >= 0.9999 and cos["blocks.1"] < 0.999, cos
    # the update alone (blocks.1's output less the input both sides were fed) shows the error more plainly
    assert cos["blocks.1 update"] < cos["blocks.1"], cos
    assert not result, "a block that computes something else fails the reference"


class _Stemmed(torch.nn.Module):
    """A quantized input projection (patch/feature embedding) before the blocks; `share` uses one
    block object twice (weight-shared depth)."""

    def __init__(self, share: bool = False):
        super().__init__()
        from tests.test_export import TinyBlock

        self.embed = torch.nn.Linear(32, 32)
        first = TinyBlock()
        self.blocks = torch.nn.ModuleList([first, first if share else TinyBlock()])
        self.head = torch.nn.Linear(32, 16)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def stemmed_model(share: bool = False):
    from quantkit.models import LoadedModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _Stemmed(share).eval()
    return LoadedModel(spec=f"{__file__}:stemmed_model", model=model, input_names=["x"], output_names=["y"],
                       example_inputs={"x": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))})


def shared_model():
    return stemmed_model(share=True)


def _exported(tmp_path, loaded):
    from tests.test_export import write_recipe

    from quantkit import calib, ptq
    from quantkit.export.onnx_export import export_run
    from quantkit.recipe import load_recipe

    result = ptq.quantize(loaded, load_recipe(write_recipe(tmp_path, "int8")), calib.synthetic_set(loaded, n=20, seed=0),
                          dtype="fp32", device="cpu", batch_size=4, per_layer=False)
    out = tmp_path / "out"
    out.mkdir()
    ptq.save_run(result, out, loaded.spec, "fp32")
    export_run(out)
    return out


def test_a_wrong_scale_before_the_first_block_fails_its_input_check(tmp_path):
    """Per block, the first block is fed the graph's input — so that input is checked too: an error in
    the stem (here the embedding's weight scale x 1.5) fails `blocks.0 input` while the blocks match."""
    from quantkit.verify.reference import reference_run

    out = _exported(tmp_path, stemmed_model())
    broken = _with_weight_scale_off(out / "model.onnx", "embed.weight_quantizer", 1.5, tmp_path)
    result = reference_run(out, onnx_path=broken, update_report=False)
    cos = {k: m.cosine for k, m in result.per_block.items()}
    assert cos["blocks.0 input"] < 0.9995 and cos["blocks.0"] >= 0.9999 and cos["blocks.1 input"] >= 0.9999, cos
    assert not result
    assert reference_run(out, update_report=False), "the unbroken graph passes"


def test_shared_blocks_are_compared_end_to_end_only():
    """One block object used twice: its hooks would fire per use (and the export names the second use
    apart), so such a model gets no per-block comparison, only the end-to-end one."""
    from quantkit.verify.blockwise import block_names, find_boundaries

    assert block_names(shared_model().model) == []
    assert find_boundaries(shared_model().model, onnx.ModelProto()) is None
    assert block_names(stemmed_model().model) == ["blocks.0", "blocks.1"]


def test_a_cast_added_by_surgery_stays_inside_its_block():
    """A node without a scope (graph surgery's Cast) belongs where its input was computed: it does
    not make the tensor it reads look like one leaving the block."""
    from onnx import TensorProto, helper

    from quantkit.export.graph import GraphIndex, scope_boundary

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/model/blocks.0/A/Relu"),
             helper.make_node("Cast", ["a"], ["a_bf16"], name="a_bf16", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["a_bf16"], ["b"], name="/model/blocks.0/B/Relu"),
             helper.make_node("Relu", ["b"], ["y"], name="/model/head/Relu")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", [io[0]], [io[1]]))
    index = GraphIndex.build(model, scope_prefix="model")
    assert scope_boundary(index, "blocks.0") == ([], ["b"])
