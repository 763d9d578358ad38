"""TensorRT build without TensorRT: the script, the profiles, engine.json checks, version floors.

TensorRT is not installable on these machines. What needs it for real is in
tests/gpu/test_tensorrt_build.py; here `build_engine`'s control flow runs against a small
stand-in module (FakeTRT) that records the calls, which checks our code, not TensorRT.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.errors import ExportError, InputError, TensorRTUnavailable
from quantkit import trt_requirements as req
from quantkit.runtime import tensorrt as qtrt
from quantkit.runtime.tensorrt import EngineMetadata, ShapeProfile, parse_shape_spec, parse_shape_specs


# ---------------------------------------------------------------------------------------------
# small graphs


def _mlp_graph(batch="batch", nodes=None, initializers=(), extra_outputs_info=(), inputs=None):
    """y = x @ W, with x [batch, 4]; `nodes` replace the MatMul when given."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    nodes = nodes or [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", inputs or [x], [y], [w, *initializers], value_info=list(extra_outputs_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _qdq_graph(zero_point_type, zp_value):
    zp = helper.make_tensor("zp", zero_point_type, [], [zp_value])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="x_dq"),
        helper.make_node("MatMul", ["xdq", "W"], ["y"], name="mm"),
    ]
    return _mlp_graph(nodes=nodes, initializers=[zp, s])


def _write_out_dir(tmp_path: Path, model: onnx.ModelProto, export: dict | None = None, recipe: str | None = None) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    onnx.save(model, out / "model.onnx")
    if export is not None:
        (out / "export.json").write_text(json.dumps(export))
    if recipe is not None:
        (out / "recipe.yaml").write_text(recipe)
    return out


@pytest.fixture
def no_tensorrt(monkeypatch):
    # Neither TensorRT nor TensorRT-RTX: a None entry makes the import raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)


def _trtexec_argv(script: Path) -> list[str]:
    text = script.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith('"$TRTEXEC"'))
    return shlex.split(line)[1:]


# ---------------------------------------------------------------------------------------------
# build without TensorRT


def test_build_without_tensorrt_writes_script_and_no_engine(tmp_path, no_tensorrt):
    out = _write_out_dir(tmp_path, _qdq_graph(TensorProto.FLOAT8E4M3FN, 0), recipe="name: fp8\nrules: []\n")
    profiles = parse_shape_specs(["x:1x4,4x4,8x4"])

    with pytest.raises(TensorRTUnavailable) as info:
        qtrt.build_from_output_dir(out, profiles, workspace_gib=2, opt_level=4)

    msg = str(info.value)
    script = out / "build_engine.sh"
    assert "TensorRT is not installed here" in msg
    assert str(script) in msg and "bash build_engine.sh" in msg and "TensorRT >= 10.2" in msg
    assert "No engine was built" in msg
    assert not (out / "model.engine").exists() and not (out / "engine.json").exists()
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail\n" in text and 'cd "$(dirname "$0")"\n' in text
    assert "# This graph needs TensorRT >= 10.2:" in text
    assert "FP8 Q/DQ (FLOAT8E4M3FN) (node 'x_q' in graph) needs TensorRT >= 10.2" in text
    assert _trtexec_argv(script) == [
        "--onnx=model.onnx",
        "--stronglyTyped",
        "--saveEngine=model.engine.partial",
        "--minShapes=x:1x4",
        "--optShapes=x:4x4",
        "--maxShapes=x:8x4",
        "--timingCacheFile=timing.cache",
        "--builderOptimizationLevel=4",
        "--memPoolSize=workspace:2048M",
        "--skipInference",
    ]
    assert "mv -f model.engine.partial model.engine\n" in text


def test_build_script_runs_with_a_stand_in_trtexec(tmp_path, no_tensorrt):
    """The script finds trtexec, runs from its own folder, renames the engine, drops a stale engine.json."""
    out = _write_out_dir(tmp_path, _mlp_graph(batch=2))
    with pytest.raises(TensorRTUnavailable):
        qtrt.build_from_output_dir(out, None)
    (out / "engine.json").write_text("{}")  # left from an engine built elsewhere
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > args.txt\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}

    done = subprocess.run(["bash", str(out / "build_engine.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)

    assert done.returncode == 0, done.stderr
    assert (out / "model.engine").read_text() == "engine\n"
    assert not (out / "model.engine.partial").exists() and not (out / "engine.json").exists()
    args = (out / "args.txt").read_text().split()
    assert args[:3] == ["--onnx=model.onnx", "--stronglyTyped", "--saveEngine=model.engine.partial"]
    assert not any(a.startswith("--minShapes") for a in args)  # static graph: no profile flags


def test_build_script_says_when_trtexec_is_missing(tmp_path, no_tensorrt):
    out = _write_out_dir(tmp_path, _mlp_graph(batch=2))
    with pytest.raises(TensorRTUnavailable):
        qtrt.build_from_output_dir(out, None)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": ""}
    done = subprocess.run(["bash", str(out / "build_engine.sh")], env=env, capture_output=True, text=True, timeout=30)
    if Path("/usr/src/tensorrt/bin/trtexec").exists() or any(
            Path(p, "trtexec").exists() for p in env["PATH"].split(":")):
        pytest.skip("a real trtexec is installed here")
    assert done.returncode == 1
    assert "trtexec not found; install TensorRT >= 9.0 or set TRTEXEC" in done.stderr
    assert not (out / "model.engine").exists()


def test_dynamic_input_without_shape_is_refused_before_anything_is_written(tmp_path, no_tensorrt):
    out = _write_out_dir(tmp_path, _mlp_graph())
    with pytest.raises(InputError) as info:
        qtrt.build_from_output_dir(out, [])
    assert not isinstance(info.value, TensorRTUnavailable)
    assert "inputs with dynamic dimensions need build shapes: x ?x4" in str(info.value)
    assert "--shape NAME:DIMS" in str(info.value)
    assert not (out / "build_engine.sh").exists()


@pytest.mark.parametrize("spec, message", [
    ("y:1x4", "--shape names y, which the graph does not take as input (its inputs: x)"),
    ("x:1x4x1", "input x has rank 2 (?x4) but --shape gives rank 3 (1x4x1)"),
    ("x:1x4,2x5,4x6", "input x dimension 1 is fixed at 4 (?x4); --shape gives min/opt/max 4/5/6"),
])
def test_shapes_that_do_not_fit_the_graph(tmp_path, no_tensorrt, spec, message):
    out = _write_out_dir(tmp_path, _mlp_graph())
    with pytest.raises(InputError, match=r".*") as info:
        qtrt.build_from_output_dir(out, [parse_shape_spec(spec)])
    assert message in str(info.value)


def test_missing_onnx_and_bad_settings(tmp_path, no_tensorrt):
    with pytest.raises(InputError, match="model.onnx: not found; run `quantkit export`"):
        qtrt.build_from_output_dir(tmp_path, None)
    out = _write_out_dir(tmp_path, _mlp_graph(batch=2))
    with pytest.raises(InputError, match="optimization level must be an integer 0..5, got 6"):
        qtrt.build_from_output_dir(out, None, opt_level=6)
    with pytest.raises(InputError, match="workspace must be a positive number of GiB, got 0"):
        qtrt.build_from_output_dir(out, None, workspace_gib=0)


def test_export_json_can_raise_the_version_floor(tmp_path, no_tensorrt):
    out = _write_out_dir(tmp_path, _mlp_graph(batch=2), export={"min_tensorrt_version": "10.12"})
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT >= 10\.12"):
        qtrt.build_from_output_dir(out, None)
    text = (out / "build_engine.sh").read_text()
    assert "# This graph needs TensorRT >= 10.12:" in text
    assert "export.json says TensorRT >= 10.12" in text


# ---------------------------------------------------------------------------------------------
# shape profiles


def test_parse_shape_spec_forms():
    assert parse_shape_spec("input_ids:1x128,4x128,8x128") == ShapeProfile("input_ids", (1, 128), (4, 128), (8, 128))
    static = parse_shape_spec(" pixel_values:2x3x224x224 ")
    assert static == ShapeProfile.static("pixel_values", (2, 3, 224, 224)) and static.is_static
    assert parse_shape_spec("input:0:1x3,2x3,4x3").name == "input:0"  # name ends at the last ':'
    assert ShapeProfile.from_dict(static.to_dict()) == static


@pytest.mark.parametrize("spec, message", [
    ("x", "expected NAME:DIMS"),
    (":1x4", "expected NAME:DIMS"),
    ("x:", "expected NAME:DIMS"),
    ("x:1x4,8x4", "gave 2 shapes"),
    ("x:1x4,2x4,3x4,4x4", "gave 4 shapes"),
    ("x:1xNx4", "'1xNx4' is not a shape like 4x128"),
    ("x:1x-4", "'1x-4' is not a shape like 4x128"),
    ("x:0x4", "min shape 0x4 must have dimensions >= 1"),
    ("x:4x128,2x128,8x128", "dimension 0 must satisfy min <= opt <= max, got 4, 2, 8"),
    ("x:1x128,4x128,2x128", "dimension 0 must satisfy min <= opt <= max, got 1, 4, 2"),
    ("x:1x128,4x128x1,8x128", "must have the same rank"),
])
def test_parse_shape_spec_errors(spec, message):
    with pytest.raises(InputError) as info:
        parse_shape_spec(spec)
    assert message in str(info.value)


def test_duplicate_shape_names_are_refused():
    with pytest.raises(InputError, match="input 'x' is given more than once"):
        parse_shape_specs(["x:1x4", "x:2x4"])


# ---------------------------------------------------------------------------------------------
# engine metadata


def _meta(**changes) -> EngineMetadata:
    base = dict(
        engine_file="model.engine", engine_sha256="ab" * 32, engine_bytes=1234,
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.3.0.26",
        onnx_file="model.onnx", onnx_sha256="cd" * 32, recipe_name="fp8", recipe_sha256="ef" * 32,
        profiles=[ShapeProfile("x", (1, 4), (4, 4), (8, 4))],
        builder={"strongly_typed": True, "builder_optimization_level": 3},
        build_time_s=12.5, built_at="2026-11-23T10:00:00+00:00", quantkit_version="0.1.0",
        min_tensorrt_version="10.2",
    )
    base.update(changes)
    return EngineMetadata(**base)


def test_metadata_round_trip(tmp_path):
    meta = _meta()
    path = meta.save(tmp_path / "engine.json")
    data = json.loads(path.read_text())
    assert data["profiles"] == [[{"name": "x", "min": [1, 4], "opt": [4, 4], "max": [8, 4]}]]  # one profile
    assert data["gpu_name"] == "NVIDIA H100 80GB HBM3" and data["schema"] == 2
    assert data["backend"] == "tensorrt" and data["target_compute_capabilities"] == ["9.0"]
    assert EngineMetadata.load(path) == meta


def test_metadata_accepts_the_same_gpu_and_tensorrt_release():
    qtrt.check_engine_compatible(_meta(), "NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26")
    qtrt.check_engine_compatible(_meta(), "NVIDIA H100 80GB HBM3", (9, 0), "10.3.0.30")  # same release


@pytest.mark.parametrize("gpu, cc, trt_version, expected", [
    ("NVIDIA H200", "9.0", "10.3.0.26", "GPU 'NVIDIA H100 80GB HBM3', this machine has 'NVIDIA H200'"),
    ("NVIDIA H100 80GB HBM3", "9.0", "10.4.0.26", "TensorRT 10.3.0.26, this machine has TensorRT 10.4.0.26"),
    ("NVIDIA H100 80GB HBM3", "9.0", "11.0.0.1", "TensorRT 10.3.0.26, this machine has TensorRT 11.0.0.1"),
    ("Orin", "8.7", "10.3.0.26", "compute capability 9.0, this GPU has 8.7"),
])
def test_metadata_refuses_another_gpu_or_tensorrt(gpu, cc, trt_version, expected):
    with pytest.raises(InputError) as info:
        qtrt.check_engine_compatible(_meta(), gpu, cc, trt_version)
    msg = str(info.value)
    assert msg.startswith("model.engine was built for ")
    assert expected in msg
    assert "rebuild it here" in msg and "bash build_engine.sh" in msg


def test_metadata_file_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "engine.json"
    data = _meta().to_dict()
    del data["gpu_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"engine\.json: missing gpu_name; rebuild"):
        EngineMetadata.load(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"engine\.json: not valid JSON"):
        EngineMetadata.load(path)


# ---------------------------------------------------------------------------------------------
# fallback


class _EchoRunner:
    name = "onnxruntime"

    def run(self, inputs):
        return dict(inputs)


def test_fallback_when_tensorrt_is_missing(tmp_path, no_tensorrt, caplog):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    fallback = _EchoRunner()
    with pytest.warns(RuntimeWarning, match=r"not used \(TensorRTUnavailable: TensorRT is not installed here"):
        runner = qtrt.load_runner_or_fallback(engine, fallback)
    assert runner is fallback
    assert "running onnxruntime instead" in caplog.text


def test_fallback_when_engine_is_missing(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"engine not found; build it with `quantkit build --from DIR`"):
        assert qtrt.load_runner_or_fallback(tmp_path / "none.engine", _EchoRunner()).name == "onnxruntime"


# ---------------------------------------------------------------------------------------------
# min_tensorrt_version


def test_plain_graph_needs_the_baseline():
    version, reasons = req.min_tensorrt_version(_mlp_graph())
    assert version == req.BASELINE == (9, 0)
    assert reasons == ["strongly-typed ONNX build needs TensorRT >= 9.0"]


def test_int8_qdq_needs_9_2():
    version, reasons = req.min_tensorrt_version(_qdq_graph(TensorProto.INT8, 0))
    assert version == (9, 2)
    assert reasons[1] == "INT8 Q/DQ (node 'x_q' in graph) needs TensorRT >= 9.2"


def test_fp8_qdq_needs_10_2_even_with_modelopt_trt_domain_and_stale_uint8_value_info():
    # ModelOpt's FP8 export: Q/DQ in domain 'trt' with a UINT8 value_info left on the Q output.
    model = _qdq_graph(TensorProto.FLOAT8E4M3FN, 0)
    for node in model.graph.node[:2]:
        node.domain = "trt"
    model.graph.value_info.append(helper.make_tensor_value_info("xq", TensorProto.UINT8, ["batch", 4]))
    version, reasons = req.min_tensorrt_version(model)
    assert version == (10, 2)
    assert reasons[1] == "FP8 Q/DQ (FLOAT8E4M3FN) (node 'x_q' in graph) needs TensorRT >= 10.2"
    assert len(reasons) == 2  # one reason per feature, the first place it was seen


def test_dynamic_nvfp4_needs_11_0_and_lists_every_feature_newest_first():
    w4 = helper.make_tensor("w_fp4", TensorProto.FLOAT4E2M1, [4, 3], [0.5] * 12)
    nodes = [
        helper.make_node("TRT_FP4DynamicQuantize", ["x", "gs"], ["xq", "xs"], name="act_fp4", domain="trt"),
        helper.make_node("DequantizeLinear", ["w_fp4", "ws"], ["wdq"], name="w_dq"),
        helper.make_node("MatMul", ["x", "wdq"], ["y"], name="mm"),
    ]
    gs = helper.make_tensor("gs", TensorProto.FLOAT, [], [1.0])
    ws = helper.make_tensor("ws", TensorProto.FLOAT, [], [1.0])
    model = _mlp_graph(nodes=nodes, initializers=[w4, gs, ws])
    version, reasons = req.min_tensorrt_version(model)
    assert version == (11, 0)
    assert reasons[1] == "dynamic NVFP4 (TRT_FP4DynamicQuantize) (node 'act_fp4' in graph) needs TensorRT >= 11.0"
    assert reasons[2] == "static FP4 Q/DQ (FLOAT4E2M1) (node 'w_dq' in graph) needs TensorRT >= 10.8"


def test_features_inside_subgraphs_and_functions_count():
    inner = helper.make_graph(
        [helper.make_node("TRT_FP4DynamicQuantize", ["a", "b"], ["c", "d"], name="inner_fp4", domain="trt")],
        "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=inner, else_branch=inner)]
    version, reasons = req.min_tensorrt_version(_mlp_graph(nodes=nodes, initializers=[cond]))
    assert version == (11, 0)
    assert "node 'inner_fp4' in graph/branch." in reasons[1]

    func = helper.make_function("local", "quant", ["a", "s", "z"], ["q"],
                                [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"], name="fq",
                                                  output_dtype=TensorProto.INT8)],
                                opset_imports=[helper.make_opsetid("", 21)])
    model = _mlp_graph()
    model.functions.append(func)
    assert req.min_tensorrt_version(model)[0] == (9, 2)


def test_reads_the_graph_without_its_external_data(tmp_path):
    model = _qdq_graph(TensorProto.FLOAT8E4M3FN, 0)
    # Only raw_data tensors go to external data.
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 3), 0.1, np.float32), "W"))
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size == 48
    (tmp_path / "model.onnx.data").unlink()  # the weights are not needed to read types and ops
    assert req.min_tensorrt_version(path)[0] == (10, 2)


def test_version_helpers():
    assert req.parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert req.parse_version("11.0rc1") == (11,)
    assert req.version_at_least((10, 3, 0, 26), (10, 2))
    assert req.version_at_least((10, 2), (10, 2))
    assert not req.version_at_least((10, 1, 9), (10, 2))
    assert not req.version_at_least((10,), (10, 2))
    with pytest.raises(ValueError):
        req.parse_version("trt")


# ---------------------------------------------------------------------------------------------
# build_engine's control flow against a stand-in TensorRT


class FakeTRT(types.ModuleType):
    """Just enough of the TensorRT 10 Python API for build_engine; records what it was asked."""

    def __init__(self, version="10.3.0.26", parse_ok=True, inputs=(("x", (-1, 4)),)):
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.calls: dict = {"profiles": [], "timing_cache_in": None}

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            def __init__(self):
                pass

        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            num_inputs = len(inputs)

            def get_input(self, i):
                return Tensor(*inputs[i])

        class ParserError:
            def node_name(self):
                return "/0/Gemm"

            def node_operator(self):
                return "Gemm"

            def node(self):
                return 3

            def desc(self):
                return "unsupported data type"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                fake.calls["parsed"] = path
                return parse_ok

            def get_error(self, i):
                return ParserError()

        class Profile:
            def set_shape(self, name, lo, mid, hi):
                fake.calls["profiles"].append((name, lo, mid, hi))

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timed"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = (pool, size)

            def add_optimization_profile(self, profile):
                return 0

            def create_timing_cache(self, data):
                fake.calls["timing_cache_in"] = bytes(data)
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                fake.calls["config"] = Config()
                return fake.calls["config"]

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls["opt_level"] = config.builder_optimization_level
                return b"ENGINE-BYTES"

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kwargs):
        fake = FakeTRT(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setattr(qtrt.backend, "gpu_identity", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
        return fake
    return install


def test_build_engine_flow_with_stand_in(tmp_path, fake_trt):
    fake = fake_trt()
    out = _write_out_dir(tmp_path, _qdq_graph(TensorProto.FLOAT8E4M3FN, 0), recipe="name: fp8\n")
    (out / "timing.cache").write_bytes(b"old")

    result = qtrt.build_from_output_dir(out, [parse_shape_spec("x:1x4,4x4,8x4")], workspace_gib=1.5, opt_level=5)

    assert fake.calls["network_flags"] == 1  # 1 << STRONGLY_TYPED
    assert fake.calls["parsed"] == str(out / "model.onnx")  # a path, so model.onnx.data is found
    assert fake.calls["profiles"] == [("x", (1, 4), (4, 4), (8, 4))]
    assert fake.calls["workspace"] == ("workspace", int(1.5 * 2**30))
    assert fake.calls["opt_level"] == 5
    assert fake.calls["timing_cache_in"] == b"old"
    assert (out / "timing.cache").read_bytes() == b"old+timed"
    assert (out / "model.engine").read_bytes() == b"ENGINE-BYTES"
    assert result.script_path == out / "build_engine.sh" and result.script_path.exists()
    meta = EngineMetadata.load(out / "engine.json")
    assert meta == result.metadata
    assert (meta.gpu_name, meta.compute_capability, meta.tensorrt_version) == ("NVIDIA H100 80GB HBM3", "9.0", "10.3.0.26")
    assert meta.engine_bytes == 12 and meta.recipe_name == "fp8" and len(meta.recipe_sha256) == 64
    assert meta.min_tensorrt_version == "10.2" and meta.profiles == [[ShapeProfile("x", (1, 4), (4, 4), (8, 4))]]
    assert meta.builder["builder_optimization_level"] == 5 and meta.builder["strongly_typed"] is True


def test_build_engine_refuses_an_old_tensorrt_before_building(tmp_path, fake_trt):
    fake = fake_trt(version="10.1.0.27")
    out = _write_out_dir(tmp_path, _qdq_graph(TensorProto.FLOAT8E4M3FN, 0))
    with pytest.raises(TensorRTUnavailable) as info:
        qtrt.build_from_output_dir(out, [parse_shape_spec("x:4x4")])
    msg = str(info.value)
    assert "model.onnx needs TensorRT >= 10.2" in msg and "this machine has TensorRT 10.1.0.27" in msg
    assert "bash build_engine.sh" in msg
    assert "parsed" not in fake.calls and not (out / "model.engine").exists()


def test_parser_errors_name_the_node(tmp_path, fake_trt):
    fake_trt(parse_ok=False)
    out = _write_out_dir(tmp_path, _mlp_graph(batch=2))
    with pytest.raises(ExportError) as info:
        qtrt.build_from_output_dir(out, None)
    assert "TensorRT's ONNX parser refused the graph: node /0/Gemm (Gemm): unsupported data type" in str(info.value)
    assert not (out / "model.engine").exists() and not (out / "engine.json").exists()


# ---------------------------------------------------------------------------------------------
# several optimization profiles


def test_profile_specs_make_one_profile_per_entry():
    from quantkit.runtime.tensorrt import parse_profile_specs

    sets = parse_profile_specs(["x:1x4,2x4,4x4;8x4,16x4,32x4;64x4", "mask:1x4,4x4,64x4"])
    assert [[p.name for p in s] for s in sets] == [["x", "mask"]] * 3
    assert [s[0].max for s in sets] == [(4, 4), (32, 4), (64, 4)] and sets[2][0].is_static
    assert all(s[1] == ShapeProfile("mask", (1, 4), (4, 4), (64, 4)) for s in sets)  # one entry: in every profile
    with pytest.raises(InputError, match=r"x has 3, y has 2; the most is 3"):
        parse_profile_specs(["x:1x4;2x4;3x4", "y:1x4;2x4"])
    with pytest.raises(InputError, match=r"input 'x' is given more than once \(several profiles go in one --shape"):
        parse_profile_specs(["x:1x4", "x:2x4"])


def test_schema_1_engine_json_reads_as_one_profile(tmp_path):
    data = _meta().to_dict()
    data["schema"], data["profiles"] = 1, [{"name": "x", "min": [1, 4], "opt": [4, 4], "max": [8, 4]}]
    for key in ("backend", "targets", "note", "target_compute_capabilities"):
        data.pop(key)
    (tmp_path / "engine.json").write_text(json.dumps(data))
    meta = EngineMetadata.load(tmp_path / "engine.json")
    assert meta.profiles == [[ShapeProfile("x", (1, 4), (4, 4), (8, 4))]] and meta.backend == "tensorrt"


def test_build_script_has_one_shape_triple_per_profile(tmp_path):
    from quantkit.runtime.tensorrt import parse_profile_specs, write_build_script

    script = write_build_script(tmp_path, "model.onnx", "model.engine", parse_profile_specs(["x:1x4,2x4,4x4;8x4,16x4,32x4"]))
    argv = _trtexec_argv(script)
    assert [a for a in argv if a.startswith("--minShapes")] == ["--minShapes=x:1x4", "--minShapes=x:8x4"]
    assert [a for a in argv if a.startswith("--maxShapes")] == ["--maxShapes=x:4x4", "--maxShapes=x:32x4"]
    # trtexec refuses repeated triples without --profile=N in front of each (TensorRT 10's sampleOptions.cpp).
    shape_args = [a for a in argv if a.startswith(("--profile", "--minShapes", "--optShapes", "--maxShapes"))]
    assert shape_args == ["--profile=0", "--minShapes=x:1x4", "--optShapes=x:2x4", "--maxShapes=x:4x4",
                          "--profile=1", "--minShapes=x:8x4", "--optShapes=x:16x4", "--maxShapes=x:32x4"]
    assert "2 optimization profiles in one engine" in script.read_text()


def test_recipe_build_profiles_may_be_a_list(tmp_path):
    from quantkit.errors import RecipeError
    from quantkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nbuild:\n  profiles:\n    - {x: {min: [1, 4], opt: [1, 4], max: [1, 4]}}\n"
                    "    - {x: {min: [2, 4], opt: [8, 4], max: [16, 4]}}\n")
    build = load_recipe(path).build
    assert [p["x"].max for p in build.profile_list()] == [[1, 4], [16, 4]]
    assert build.envelope()["x"].min == [1, 4] and build.envelope()["x"].max == [16, 4]
    path.write_text("name: r\nbuild:\n  profiles:\n    - {x: {min: [1], opt: [1], max: [1]}}\n"
                    "    - {y: {min: [1], opt: [1], max: [1]}}\n")
    with pytest.raises(RecipeError, match=r"profiles\[1\] names inputs \['y'\], profiles\[0\] names \['x'\]"):
        load_recipe(path)
