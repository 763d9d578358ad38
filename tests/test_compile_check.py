"""The compile check with TensorRT-RTX's real ONNX parser and ahead-of-time builder, on the CPU.

One export per model and recipe (module-scoped), each exported through `quantkit export` with the
targets the acceptance names, so the check that runs on every export is the one asserted here.
Engines are tens of MB: they are measured, not kept, except by the `build` tests, in tmp dirs.
No engine is run: TensorRT-RTX engines need an SM 7.5/8.x/12.x GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (the test extra installs "
                    "tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings)")

from quantkit.cli import main  # noqa: E402
from quantkit.runtime.tensorrt import EngineMetadata, check_engine_compatible  # noqa: E402
from quantkit.runtime.tensorrt.targets import parse_target, targets_for  # noqa: E402
from quantkit.verify.compile_check import check_export, compile_check  # noqa: E402

# model -> recipe -> (--target values for the export's compile check, the exit code that gives)
EXPORTS = {
    "fp8": (["sm89", "sm80"], 1),  # SM80 has no FP8: a failing target, exit 1
    "int8-smoothquant": (["sm89", "sm86"], 0),
    "balanced": (["sm120", "sm89"], 1),  # SM89 has no FP4
}


def _quantize(out: Path, model: str, recipe: str, dtype: str = "fp32") -> Path:
    from quantkit import ptq
    from quantkit.calib import builtin_set
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    loaded = load_model(model)
    result = ptq.quantize(loaded, load_recipe(recipe), builtin_set(loaded, max_samples=8), dtype=dtype,
                          device="cpu", batch_size=4, per_layer=False)
    out.mkdir(parents=True)
    ptq.save_run(result, out, loaded.spec, dtype)
    return out


def _export(tmp_path_factory, model: str, recipe: str, targets: list[str], dtype: str = "fp32"):
    out = _quantize(tmp_path_factory.mktemp(f"{model}-{recipe}") / "out", model, recipe, dtype)
    argv = ["export", "--from", str(out), "--no-reference", "-q"]
    for t in targets:
        argv += ["--target", t]
    rc = main(argv)
    report = json.loads((out / "report.json").read_text())
    return out, rc, report["compile_check"]


@pytest.fixture(scope="module", params=["minilm", "llama-tiny"])
def model(request):
    return request.param


_CACHE: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, recipe) -> (OUT, export exit code, report.json's compile_check); each exported once."""
    def get(model: str, recipe: str):
        key = (model, recipe)
        if key not in _CACHE:
            _CACHE[key] = _export(tmp_path_factory, model, recipe, EXPORTS[recipe][0])
        return _CACHE[key]
    yield get
    _CACHE.clear()


def _by_sm(check: dict) -> dict[str, dict]:
    return {r["targets"][0]["sm"]: r for r in check["targets"]}


# ---------------------------------------------------------------------------------------------
# the shipped recipes on the built-in models, through `quantkit export`


@pytest.mark.parametrize("recipe, sm, quantized_dtype", [
    ("fp8", "sm89", "fp8"), ("int8-smoothquant", "sm89", "int8"), ("int8-smoothquant", "sm86", "int8"),
    ("balanced", "sm120", "fp4"),
])
def test_shipped_recipe_parses_and_builds(exported, model, recipe, sm, quantized_dtype):
    out, rc, check = exported(model, recipe)
    assert check["backend"] == "tensorrt-rtx" and check["version"] == "1.7.1.116"
    r = _by_sm(check)[sm]
    assert r["parsed"] and r["parser_errors"] == [], r["parser_errors"]
    assert r["built"] and r["build_error"] is None, r["build_error"]
    assert r["engine_bytes"] > 1_000_000, r["engine_bytes"]  # a real engine, not a header
    assert r["layers"] > 100 and sum(r["layers_by_dtype"].values()) <= r["layers"]
    assert r["layers_by_dtype"].get(quantized_dtype, 0) > 0, r["layers_by_dtype"]  # the Q layers' output type
    assert not (out / "model.engine").exists()  # measured, never kept
    assert rc == EXPORTS[recipe][1]


def test_balanced_for_sm89_fails_naming_fp4(exported, model):
    out, rc, check = exported(model, "balanced")
    r = _by_sm(check)["sm89"]
    assert r["parsed"] and not r["built"]
    assert "fp4" in r["build_error"].lower() and "sm89" in r["build_error"], r["build_error"]
    assert rc == 1 and check["verdict"] == "failed"
    assert any("for sm89" in f and "fp4" in f.lower() for f in check["failures"]), check["failures"]
    assert "TensorRT compile check" in (out / "report.html").read_text()


def test_fp8_for_sm80_fails_naming_fp8(exported, model):
    out, rc, check = exported(model, "fp8")
    r = _by_sm(check)["sm80"]
    assert r["parsed"] and not r["built"]
    assert "Cannot compile for target(s) sm80" in r["build_error"] and "fp8" in r["build_error"], r["build_error"]
    assert rc == 1 and check["verdict"] == "failed"


def test_fp32_graph_for_gpu_targets_warns_with_the_layer_counts(exported):
    out, _, check = exported("minilm", "fp8")
    r = _by_sm(check)["sm89"]
    fp32_matmuls = r["compute_layers_by_dtype"]["matmul"]["fp32"]
    assert fp32_matmuls == 48  # 6 blocks x (q, k, v, out, fc1, fc2, Q.K^T, P.V)
    assert any(f"{fp32_matmuls} of 48 matmul layers" in w and "--dtype bf16" in w for w in check["warnings"])


# ---------------------------------------------------------------------------------------------
# broken graphs: the parser's message names the node


def _tiny_graph(zero_point: int = 0, op: str = "Relu") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [4, 3], [0.1] * 12),
             helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("zp", TensorProto.INT8, [], [zero_point])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="x_dq"),
             helper.make_node("MatMul", ["xdq", "W"], ["h"], name="mm"),
             helper.make_node(op, ["h"], ["y"], name="act")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)])


def test_nonzero_zero_point_fails_naming_the_node(tmp_path):
    onnx.save(_tiny_graph(zero_point=3), tmp_path / "model.onnx")
    check = compile_check(tmp_path / "model.onnx", parse_target("sm89"))
    (r,) = check.results
    assert not r.parsed and not r.built and r.engine_bytes == 0
    assert r.parser_errors[0].startswith("node x_q (QuantizeLinear): ") and "zero point" in r.parser_errors[0]
    assert not check and check.failures == [f"model.onnx for sm89: the ONNX parser refused the graph: {r.parser_errors[0]}"]


def test_unknown_op_fails_naming_the_node_and_is_recorded_in_the_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    onnx.save(_tiny_graph(op="NotAnOnnxOp"), out / "model.onnx")
    (out / "recipe.yaml").write_text("name: broken\ntargets: [ada]\n")
    (out / "report.json").write_text(json.dumps({"recipe": {"name": "broken"}}))
    check = check_export(out)
    assert check.verdict == "failed"
    assert check.results[0].parser_errors[0].startswith("node act (NotAnOnnxOp): "), check.results[0].parser_errors
    saved = json.loads((out / "report.json").read_text())["compile_check"]
    assert saved["targets"][0]["parsed"] is False and "node act (NotAnOnnxOp)" in saved["failures"][0]
    assert "node act (NotAnOnnxOp)" in (out / "report.html").read_text()


def test_a_clean_tiny_graph_builds_and_counts_its_layers(tmp_path):
    onnx.save(_tiny_graph(), tmp_path / "model.onnx")
    check = compile_check(tmp_path / "model.onnx", targets_for(["ada", "orin"]))
    assert [r.targets[0].sm for r in check.results] == ["sm89", "sm86"]
    assert all(r.parsed and r.built and r.engine_bytes > 0 for r in check.results)
    r = check.results[0]
    assert r.compute_layers_by_dtype["matmul"] == {"fp32": 1} and r.layers_by_dtype["int8"] == 1
    assert check.results[1].targets[0].stand_in and "not the engine to deploy on orin" in check.results[1].targets[0].note
    assert check.profiles[0][0].min == (1, 4) and check.profiles[0][0].max == (64, 4)  # the default range


def test_no_backend_skips_the_check(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    onnx.save(_tiny_graph(), tmp_path / "model.onnx")
    check = compile_check(tmp_path / "model.onnx", parse_target("sm89"))
    assert check.verdict == "skipped" and bool(check) and "neither TensorRT nor TensorRT-RTX" in check.skipped


# ---------------------------------------------------------------------------------------------
# quantkit build with TensorRT-RTX only, and with neither


SEQ = "input_ids:1x8,1x16,1x32;4x16,4x64,4x128;8x8,8x16,8x32"


def test_build_with_tensorrt_rtx_only_three_profiles(exported, monkeypatch):
    out, _, _ = exported("minilm", "fp8")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # datacenter TensorRT hidden, whatever is installed
    shapes = [SEQ, SEQ.replace("input_ids", "attention_mask"), SEQ.replace("input_ids", "token_type_ids")]
    argv = ["build", "--from", str(out), "--target", "ada", "-q"]
    for s in shapes:
        argv += ["--shape", s]
    try:
        assert main(argv) == 0
        meta = EngineMetadata.load(out / "engine.json")
        assert meta.backend == "tensorrt-rtx" and meta.tensorrt_version == "1.7.1.116"
        assert meta.target_compute_capabilities == ["8.9"] and meta.gpu_name == ""
        assert meta.engine_bytes == (out / "model.engine").stat().st_size > 1_000_000
        assert len(meta.profiles) == 3 and [p.opt for p in meta.profiles[1]] == [(4, 64)] * 3
        assert meta.recipe_name == "fp8" and len(meta.recipe_sha256) == 64
        data = json.loads((out / "engine.json").read_text())
        assert data["target_compute_capabilities"] == ["8.9"] and data["targets"][0]["sm"] == "sm89"
        script = (out / "build_engine.sh").read_text()
        assert script.count("--minShapes=") == 3 and "--optShapes=input_ids:4x64,attention_mask:4x64" in script
    finally:  # the next test's export folder must not carry a 64 MB engine around
        (out / "model.engine").unlink(missing_ok=True)


def test_build_balanced_for_sm89_is_a_clear_exit_1(exported, capsys):
    out, _, _ = exported("llama-tiny", "balanced")
    assert main(["build", "--from", str(out), "--target", "sm89", "--shape", "input_ids:1x16",
                 "--shape", "attention_mask:1x16", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("QuantkitError: TensorRT-RTX 1.7.1.116 could not build an engine from ")
    assert "for sm89" in err[-1] and "fp4" in err[-1].lower() and "Traceback" not in "\n".join(err)
    assert not (out / "model.engine").exists() and not (out / "engine.json").exists()


def test_build_with_neither_backend_exits_2_and_writes_the_script(exported, monkeypatch, capsys):
    out, _, _ = exported("llama-tiny", "balanced")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    (out / "build_engine.sh").unlink(missing_ok=True)
    assert main(["build", "--from", str(out), "--shape", "input_ids:1x16", "--shape", "attention_mask:1x16", "-q"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed here" in err and "TensorRT-RTX is not installed here" in err
    assert "No engine was built" in err and "bash build_engine.sh" in err
    assert (out / "build_engine.sh").is_file() and not (out / "model.engine").exists()


def test_build_without_a_target_says_how_to_give_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "out"
    out.mkdir()
    onnx.save(_tiny_graph(), out / "model.onnx")
    assert main(["build", "--from", str(out), "--shape", "x:2x4", "-q"]) == 2
    assert "none was given: give --target" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the engine.json guard on a GPU the engine was not built for (no GPU needed to check it)


def test_guard_names_both_compute_capabilities():
    meta = EngineMetadata(
        engine_file="model.engine", engine_sha256="ab" * 32, engine_bytes=10, gpu_name="", compute_capability="8.9",
        tensorrt_version="1.7.1.116", onnx_file="model.onnx", onnx_sha256="cd" * 32, recipe_name="fp8",
        recipe_sha256=None, profiles=[], builder={}, build_time_s=1.0, built_at="2026-12-01T00:00:00+00:00",
        quantkit_version="0.1.0", backend="tensorrt-rtx", targets=parse_target("sm89"),
    )
    check_engine_compatible(meta, "NVIDIA GeForce RTX 4090", "8.9", "1.7.1.116")  # the target it was built for
    with pytest.raises(Exception) as info:
        check_engine_compatible(meta, "NVIDIA H200", (9, 0), "1.7.1.116")
    msg = str(info.value)
    assert "compute capability 8.9 (sm89)" in msg and "NVIDIA H200" in msg and "compute capability 9.0" in msg
    assert "TensorRT-RTX does not support" in msg and "bash build_engine.sh" in msg and "--target" not in msg
    with pytest.raises(Exception, match=r"compute capability 8\.9 \(sm89\); this GPU \(RTX 3090\) has compute capability 8\.6"):
        check_engine_compatible(meta, "RTX 3090", "8.6", "1.7.1.116")
    with pytest.raises(Exception, match=r"TensorRT-RTX 1\.7\.1\.116, this machine has TensorRT-RTX 1\.8\.0\.1"):
        check_engine_compatible(meta, "RTX 4090", "8.9", "1.8.0.1")


def _nonzero_graph() -> onnx.ModelProto:
    """masked_scatter / boolean indexing as torch.onnx exports them: a NonZero over a mask."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Greater", ["x", "zero"], ["mask"], name="is_positive"),
             helper.make_node("NonZero", ["mask"], ["y"], name="where_positive")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [zero]), opset_imports=[helper.make_opsetid("", 17)])


def test_an_op_only_tensorrt_rtx_lacks_is_not_checked_for_stand_in_targets(tmp_path):
    """TensorRT-RTX has no NonZero (datacenter and Jetson TensorRT do): for thor and hopper, which it only
    stands in for, that says nothing about the graph (not checked, not failed); for ada, an RTX target,
    it is a real refusal that names the node and says where the op comes from."""
    onnx.save(_nonzero_graph(), tmp_path / "model.onnx")
    check = compile_check(tmp_path / "model.onnx", targets_for(["thor", "hopper"]))
    assert [r.targets[0].sm for r in check.results] == ["sm120", "sm89"]
    assert all(not r.parsed and r.refused_ops == ["NonZero"] for r in check.results)
    assert check and check.verdict == "not checked" and check.failures == []
    assert len(check.not_checked) == 2 and "not checked for thor: TensorRT-RTX has no NonZero" in check.not_checked[0]
    assert check.to_dict()["passed"] is True and check.to_dict()["not_checked"] == check.not_checked

    rtx = compile_check(tmp_path / "model.onnx", targets_for(["ada", "hopper"]))  # ada's own target wins sm89
    assert not rtx and rtx.verdict == "failed" and len(rtx.failures) == 1
    assert "node where_positive (NonZero)" in rtx.failures[0] and "masked_scatter" in rtx.failures[0]
