"""Export defects the family matrix found (issue 15), each on the smallest graph that shows it:
an output named like an input (diffusers' UNet `sample`), ModelOpt's Cast-pair removal that handed
an FP32-protected GroupNorm an FP16 tensor, and a tied weight the model reads through another alias."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

warnings.filterwarnings("ignore")


class Denoiser(nn.Module):
    """`sample` in, `sample` out, as UNet2DConditionModel returns it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, sample: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(sample) * scale


def test_output_named_like_an_input_gets_its_own_graph_name_and_pairs_back(tmp_path):
    """At c2c3e56 such an output was refused (exit 2); before that the graph came out with 0 nodes."""
    from quantkit.export.onnx_export import export_model
    from quantkit.io_names import OUTPUT_NAMES_KEY, graph_output_names, to_model_outputs
    from quantkit.verify.ort_copy import verification_runner

    torch.manual_seed(0)
    model = Denoiser().eval()
    example = {"sample": torch.randn(2, 8), "scale": torch.full((2, 1), 0.5)}
    path = tmp_path / "model.onnx"
    graph, surgery, _ = export_model(model, example, path, input_names=["sample", "scale"],
                                     output_names=["sample"], opset=17,
                                     dynamic_axes={"sample": {0: "batch"}, "scale": {0: "batch"},
                                                   "sample_out": {0: "batch"}})
    assert graph_output_names(["sample", "scale"], ["sample"]) == ["sample_out"]
    assert [i.name for i in graph.graph.input] == ["sample", "scale"]
    assert [o.name for o in graph.graph.output] == ["sample_out"]
    assert len(graph.graph.node) >= 4  # the model, not an input wired to the output
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta[OUTPUT_NAMES_KEY]) == {"sample_out": "sample"}
    assert "output 'sample' is named 'sample_out' in the graph (an input is named 'sample')" in surgery.notes
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # the input keeps its axes
    x = {"sample": torch.randn(3, 8), "scale": torch.full((3, 1), 2.0)}
    runner = verification_runner(path)
    got = to_model_outputs(runner.run(x), ["sample", "scale"], ["sample"])
    runner.close()
    with torch.no_grad():
        want = model(**x)
    assert list(got) == ["sample"] and got["sample"].shape == (3, 8)
    assert torch.allclose(got["sample"], want, atol=1e-5)


def test_graph_output_names_avoid_every_taken_name():
    from quantkit.io_names import graph_output_names, renamed_outputs

    assert graph_output_names(["x", "x_out"], ["x", "y"]) == ["x_out2", "y"]
    assert renamed_outputs(["a"], ["b"]) == {}


def test_cast_pair_removal_keeps_a_cast_other_nodes_read():
    """x16 -> Cast(FP32) -> {Cast(FP16) -> FP16 layer, FP32 GroupNorm}: ModelOpt 0.47 counted only the Cast
    consumers, dropped the FP32 Cast and wired the norm to the FP16 tensor (UNet's downsampler conv,
    audit: 'protected groupnorm ... computes in float16'). Inside sequential_cast_fix it stays."""
    from modelopt.onnx.utils import remove_redundant_casts

    from quantkit.compat.modelopt import sequential_cast_fix

    def graph() -> onnx.ModelProto:
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="to16"),
                 helper.make_node("Relu", ["x16"], ["h16"], name="fp16_layer"),
                 helper.make_node("Cast", ["h16"], ["h32"], to=TensorProto.FLOAT, name="back_to_fp32"),
                 helper.make_node("Cast", ["h32"], ["n16"], to=TensorProto.FLOAT16, name="next_layer_in"),
                 helper.make_node("Neg", ["n16"], ["y16"], name="next_fp16_layer"),
                 helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT, name="y_cast"),
                 helper.make_node("Sigmoid", ["h32"], ["z"], name="fp32_norm")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])])
        return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))

    def norm_input(model: onnx.ModelProto) -> str:
        return next(n for n in model.graph.node if n.name == "fp32_norm").input[0]

    assert norm_input(remove_redundant_casts(graph())) == "h16"  # ModelOpt alone: the defect
    with sequential_cast_fix():
        fixed = remove_redundant_casts(graph())
    assert norm_input(fixed) == "h32"
    assert "back_to_fp32" in {n.name for n in fixed.graph.node}
    assert norm_input(remove_redundant_casts(graph())) == "h16"  # the fix lasts for the block only
    onnx.checker.check_model(fixed)
    assert onnx.shape_inference.infer_shapes(fixed).graph.output[1].type.tensor_type.elem_type == TensorProto.FLOAT


class Aliased(nn.Module):
    """T5's `shared` embedding and `encoder.embed_tokens` hold one weight; only embed_tokens is called."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(32, 16)
        self.embed_tokens = nn.Embedding(32, 16)
        self.embed_tokens.weight = self.shared.weight
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, input_ids):
        return self.mlp(self.embed_tokens(input_ids))


def aliased():
    from quantkit.models import LoadedModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Aliased().eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    return LoadedModel(spec=f"{__file__}:aliased", model=model, input_names=["input_ids"], output_names=["output"],
                       example_inputs={"input_ids": ids})


def test_uncalled_alias_of_a_cast_weight_keeps_the_shared_precision():
    """At c2c3e56 t5_encoder x balanced planned `shared` skip beside the FP16 `embed_tokens` holding the
    same (FP16) tensor: the plan said one thing, the tensor another."""
    from quantkit import calib, ptq
    from quantkit.recipe import load_recipe

    loaded = aliased()
    result = ptq.quantize(loaded, load_recipe("balanced"), calib.synthetic_set(loaded, n=8, seed=0), batch_size=4,
                          per_layer=False)
    rows = {name: result.plan.layer(name) for name in ("shared", "embed_tokens")}
    assert {str(r.precision) for r in rows.values()} == {"fp16"}
    assert "as those of embed_tokens" in rows["shared"].note
    assert loaded.model.shared.weight is loaded.model.embed_tokens.weight
    assert loaded.model.shared.weight.dtype == torch.float16
    assert not any(w.startswith("shared: planned") for w in result.plan.warnings)
    assert np.isfinite(result.report["metrics"]["fake-quant"]["output"]["cosine"])
