"""A real TensorRT build and run: an FP8 MLP exported by ModelOpt, compared with ONNX Runtime.

Skipped, with the reason, where `tensorrt` does not import (it is not installable from the package
registries these machines reach) or the GPU has no FP8 (compute capability < 8.9).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here; install TensorRT >= 10.2 to run this")

from quantkit.runtime.tensorrt import (  # noqa: E402
    ShapeProfile,
    TensorRTRunner,
    build_from_output_dir,
    load_runner_or_fallback,
)

IN_FEATURES, BATCH_MIN, BATCH_OPT, BATCH_MAX = 64, 1, 8, 32


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = pytest.mark.skipif(not _fp8_capable(), reason="FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell)")


def _export_fp8_mlp(out: Path) -> None:
    """mtq.quantize an MLP with FP8_DEFAULT_CFG on the CPU and export it with a dynamic batch."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata
    except ImportError as e:
        pytest.skip(f"ModelOpt's ONNX export does not import ({e}); it needs nvidia-modelopt's [onnx] extras")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, 128), torch.nn.GELU(), torch.nn.Linear(128, 16)
    ).eval()
    calib = torch.randn(64, IN_FEATURES)
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop=lambda m: m(calib))
    onnx_bytes, _ = get_onnx_bytes_and_metadata(
        model, (calib[:BATCH_OPT],), model_name="mlp", dynamic_axes={"input": {0: "batch"}}
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(OnnxBytes.from_bytes(onnx_bytes).get_onnx_model_file_bytes())
    (out / "export.json").write_text(json.dumps({"recipe_name": "fp8-test"}))


def _onnxruntime_reference(onnx_path: Path):
    """ONNX Runtime session on a copy of the graph that ORT accepts (see quantkit/verify/ort_copy.py):
    Q/DQ moved from domain 'trt' to the standard one, the stale UINT8 value_info dropped, graph
    optimizations off (ORT's extended optimizations gave wrong Q/DQ results)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    qdq_outputs = set()
    for node in model.graph.node:
        if node.domain == "trt" and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.domain = ""
            qdq_outputs.update(node.output)
    kept = [v for v in model.graph.value_info if v.name not in qdq_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "out"
    _export_fp8_mlp(out)
    profile = ShapeProfile("input", (BATCH_MIN, IN_FEATURES), (BATCH_OPT, IN_FEATURES), (BATCH_MAX, IN_FEATURES))
    result = build_from_output_dir(out, [profile], workspace_gib=1, opt_level=3)
    return out, result


def test_engine_and_metadata_are_written(built):
    out, result = built
    assert result.engine_path == out / "model.engine" and result.engine_path.stat().st_size > 0
    meta = json.loads((out / "engine.json").read_text())
    assert meta["gpu_name"] == torch.cuda.get_device_name()
    assert meta["compute_capability"] == "%d.%d" % torch.cuda.get_device_capability()
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["min_tensorrt_version"] == "10.2"
    assert meta["recipe_name"] == "fp8-test" and meta["engine_bytes"] == result.engine_path.stat().st_size
    assert (out / "timing.cache").stat().st_size > 0
    assert (out / "build_engine.sh").exists()


@pytest.mark.parametrize("batch", [BATCH_OPT, 3, BATCH_MAX])
def test_tensorrt_matches_onnxruntime(built, batch):
    out, result = built
    session = _onnxruntime_reference(out / "model.onnx")
    runner = TensorRTRunner(result.engine_path)
    x = torch.randn(batch, IN_FEATURES, generator=torch.Generator().manual_seed(batch))
    (name,) = runner.output_names
    got = runner.run({"input": x})[name]
    want = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert got.shape == want.shape == (batch, 16)
    cos = _cosine(got.float(), want)
    assert cos >= 0.999, f"cosine {cos} at batch {batch}"


def test_cuda_graph_replay_matches_plain_run(built):
    out, result = built
    plain = TensorRTRunner(result.engine_path)
    graphed = TensorRTRunner(result.engine_path, use_cuda_graph=True)
    (name,) = plain.output_names
    for seed in (1, 2, 3):  # capture on the first call, replay after
        x = torch.randn(BATCH_OPT, IN_FEATURES, generator=torch.Generator().manual_seed(seed))
        a, b = plain.run({"input": x})[name], graphed.run({"input": x})[name]
        assert torch.equal(a, b), f"max abs diff {float((a - b).abs().max())}"
    assert graphed._graph is not None, "CUDA graph was not captured"


def test_engine_for_another_gpu_falls_back(built, tmp_path):
    out, result = built
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.engine").write_bytes(result.engine_path.read_bytes())
    meta = json.loads((out / "engine.json").read_text())
    meta["gpu_name"] = "NVIDIA Jetson AGX Thor"
    (moved / "engine.json").write_text(json.dumps(meta))

    class Fallback:
        name = "onnxruntime"

        def run(self, inputs):
            return {}

    fallback = Fallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = load_runner_or_fallback(moved / "model.engine", fallback)
    assert runner is fallback
    assert any("NVIDIA Jetson AGX Thor" in str(w.message) for w in caught)
