"""Export of layers whose weights are equal copies (nn.TransformerEncoder deep-copies its layer): each keeps
its own initializer, so ModelOpt's NVFP4 weight pass finds every quantized weight; its failures are one line."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")

from quantkit import nvfp4_cpu  # noqa: E402
from quantkit.errors import ExportError  # noqa: E402
from quantkit.export import onnx_export  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(64, 64)
        self.second = copy.deepcopy(self.first)  # two layers, equal weights

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_equal_copies_keep_their_initializers_under_nvfp4(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 64)
    nvfp4_cpu.install()
    try:
        mtq.quantize(net, mtq.NVFP4_DEFAULT_CFG, lambda m: m(x))
        graph, _, _ = onnx_export.export_model(net, {"x": x}, tmp_path / "m.onnx", input_names=["x"],
                                               output_names=["y"], opset=23)
    finally:
        nvfp4_cpu.uninstall()
    model = onnx.load(str(tmp_path / "m.onnx"))
    # Both layers' FP4 weights are initializers of their own; none read through an Identity of the other.
    fp4 = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == 2, fp4
    assert sum(n.op_type == "MatMul" or n.op_type == "Gemm" for n in model.graph.node) == 2
    assert not [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in fp4]


def test_exporter_assertion_is_one_line_naming_the_layer():
    err = onnx_export._exporter_failure(
        AssertionError("Initializer for weight 'model.encoder.layers.1.linear1.weight' not found."))
    assert isinstance(err, ExportError)
    assert str(err).startswith("layer encoder.layers.1.linear1: ")
    assert "\n" not in str(err) and "skip" in str(err)
    assert str(onnx_export._exporter_failure(AssertionError("x"))) == "ModelOpt's ONNX exporter failed: x"


def test_output_named_as_an_input_is_exported_under_its_own_graph_name(tmp_path):
    """`sample` in and `sample` out (diffusers' UNet): the exported graph was the input itself (0 nodes),
    then it was refused; now the output is `sample_out` in the graph (tests/test_family_export_fixes.py
    checks the ONNX Runtime pairing)."""

    class Residual(nn.Module):
        def forward(self, sample):
            return sample * 2 + 1

    graph, _, _ = onnx_export.export_model(Residual(), {"sample": torch.randn(2, 3)}, tmp_path / "m.onnx",
                                           input_names=["sample"], output_names=["sample"])
    assert [i.name for i in graph.graph.input] == ["sample"]
    assert [o.name for o in graph.graph.output] == ["sample_out"]
    assert {n.op_type for n in graph.graph.node} >= {"Mul", "Add"}
