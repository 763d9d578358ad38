"""A TensorRT-RTX engine compiled ahead of time, then run by TensorRTRunner and compared with ONNX Runtime.

TensorRT-RTX engines run only on GPUs of compute capability 7.5, 8.0, 8.6, 8.9, 12.0 or 12.1: on
any other GPU (the H200 is 9.0, and TensorRT-RTX refuses it: "The engine cannot run on this GPU,
which has compute capability 9.0") the run is skipped, saying so, and only the engine.json guard
is checked. Skipped too where CUDA or tensorrt_rtx_bindings is missing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (tensorrt-rtx-cu13-bindings)")

from quantkit.errors import InputError  # noqa: E402
from quantkit.runtime.tensorrt import RTX_COMPUTE_CAPABILITIES, TensorRTRunner, build_from_output_dir  # noqa: E402
from quantkit.runtime.tensorrt.profiles import parse_profile_specs  # noqa: E402
from quantkit.runtime.tensorrt.targets import CompileTarget, parse_target  # noqa: E402


def _gpu() -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _int8_mlp(out) -> None:
    """y = relu(dq(q(x)) @ W): an INT8 Q/DQ graph every TensorRT-RTX target compiles."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [64, 32], rng.standard_normal((64, 32)).astype(np.float32).ravel()),
             helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]), helper.make_tensor("zp", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="x_dq"),
             helper.make_node("MatMul", ["xdq", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])
    out.mkdir()
    onnx.save(model, out / "model.onnx")


def test_guard_refuses_an_engine_built_for_another_compute_capability(tmp_path):
    name, cc = _gpu()
    other = "8.6" if cc != "8.6" else "8.9"
    out = tmp_path / "out"
    _int8_mlp(out)
    build_from_output_dir(out, parse_profile_specs(["x:1x64,4x64,8x64"]), targets=[CompileTarget(other)],
                          backend_name="tensorrt-rtx")
    with pytest.raises(InputError) as info:
        TensorRTRunner(out / "model.engine")
    msg = str(info.value)
    assert f"compute capability {other}" in msg and f"has compute capability {cc}" in msg and name in msg


def test_engine_runs_and_matches_onnxruntime_in_each_profile(tmp_path):
    name, cc = _gpu()
    if cc not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"TensorRT-RTX engines run on compute capability {', '.join(RTX_COMPUTE_CAPABILITIES)} only; "
                    f"this GPU ({name}) has {cc} (the H200, 9.0, refuses them: \"The engine cannot run on this GPU\")")
    import onnxruntime as ort

    out = tmp_path / "out"
    _int8_mlp(out)
    sets = parse_profile_specs(["x:1x64,2x64,4x64;16x64,32x64,64x64"])
    result = build_from_output_dir(out, sets, targets=parse_target(f"sm{cc.replace('.', '')}"), backend_name="tensorrt-rtx")
    assert result.metadata.backend == "tensorrt-rtx" and len(result.metadata.profiles) == 2
    runner = TensorRTRunner(out / "model.engine")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (3, 40):  # one in each profile
        x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
        got = runner.run({"x": x})["y"]
        want = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0).item()
        assert got.shape == (batch, 32) and cos >= 0.999, f"batch {batch}: cosine {cos}"
    with pytest.raises(InputError, match="fit none of the engine's 2 optimization profiles"):
        runner.run({"x": torch.randn(100, 64)})
