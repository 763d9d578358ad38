"""scripts/bench_gpu.py's torchao float8 rows, on the CPU without the GPU or torchao: the row a torchao
variant gets in the runtime table, and torchao_float8's handling of a missing torchao, a quantize_
that raises, and which linears it converts (a stand-in torchao module, so the test runs anywhere)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ), mock.patch.object(sys, "path", list(sys.path)):  # its import-time setdefaults
        spec.loader.exec_module(module)
    return module


def _timing(ms: float) -> dict:
    return {"median_ms": ms, "p10_ms": ms - 1, "p90_ms": ms + 1, "runs": 30}


def test_pair_row_of_a_torchao_variant(bench):
    t = {"bf16": _timing(120.0), "fp8": _timing(75.0), "torchao PerRow": _timing(80.0)}
    reference = torch.tensor([[1.0, 2.0, 3.0]])  # cosine with [1, 2, 3.5]: 15.5 / sqrt(14 x 17.25)
    outputs = {"bf16": reference, "fp8": reference, "torchao PerRow": torch.tensor([[1.0, 2.0, 3.5]])}
    row = bench.pair_row("compiled, torchao PerRow", (8, 2048), t, "bf16", "torchao PerRow", outputs, versus="fp8")
    assert row == {"mode": "compiled, torchao PerRow", "shape": [8, 2048], "tokens": 16384, "bf16_ms": 120.0,
                   "fp8_ms": 80.0, "bf16_p10_p90": [119.0, 121.0], "fp8_p10_p90": [79.0, 81.0], "runs": 30,
                   "speedup": 1.5, "fp8_runtime": "torchao PerRow", "vs_quantkit_fp8": 0.938,
                   "cosine_vs_bf16": 0.997409, "finite": True}
    # quantkit's own rows: no runtime tag, no comparison, and the eager ones no cosine
    row = bench.pair_row("eager", (1, 2048), t, "bf16", "fp8")
    assert row["speedup"] == 1.6 and row["tokens"] == 2048
    assert not {"fp8_runtime", "vs_quantkit_fp8", "cosine_vs_bf16", "finite"} & row.keys()


def test_pair_row_cosine_is_against_the_reference(bench):
    t = {"bf16": _timing(10.0), "bf16 fused": _timing(9.0), "fp8 fused": _timing(6.0)}
    # a fused row times against the fused BF16 model, but its cosine is against the plain BF16 output
    outputs = {"bf16": torch.tensor([1.0, 0.0]), "bf16 fused": torch.tensor([0.0, 1.0]),
               "fp8 fused": torch.tensor([2.0, 0.0])}
    row = bench.pair_row("compiled, fused", (1, 8), t, "bf16 fused", "fp8 fused", outputs)
    assert (row["speedup"], row["cosine_vs_bf16"], row["finite"]) == (1.5, 1.0, True)
    outputs["fp8 fused"] = torch.tensor([1.0, float("inf")])
    assert bench.pair_row("compiled, fused", (1, 8), t, "bf16 fused", "fp8 fused", outputs)["finite"] is False


def test_torchao_not_installed(bench):
    with mock.patch.dict(sys.modules, {"torchao": None}):
        models, info = bench.torchao_float8(lambda: pytest.fail("no copy without torchao"))
    assert models == {} and info == {"torchao": "not installed"}
    # torchao there but a module it imports missing: not "not installed"
    stand_in = types.ModuleType("torchao")
    with mock.patch.dict(sys.modules, {"torchao": stand_in, "torchao.quantization": None}):
        models, info = bench.torchao_float8(lambda: pytest.fail("no copy without torchao"))
    assert models == {} and info["torchao"].startswith("import failed: ModuleNotFoundError: ")


class _Granularity:
    def __repr__(self):
        return f"{type(self).__name__}()"


class PerRow(_Granularity):
    pass


class PerTensor(_Granularity):
    pass


def _stand_in_torchao(converted: list[str]) -> dict[str, types.ModuleType]:
    """torchao and torchao.quantization with the names bench_gpu imports: PerRow converts the linears
    filter_fn accepts (a float8 `qdata` and a scale on the weight), PerTensor raises."""

    class Float8DynamicActivationFloat8WeightConfig:
        def __init__(self, granularity, set_inductor_config=True):
            self.granularity, self.set_inductor_config = granularity, set_inductor_config

    def quantize_(model, config, filter_fn):
        assert config.set_inductor_config is False  # every variant compiled with the same inductor config
        if isinstance(config.granularity, PerTensor):
            raise RuntimeError("no kernel for this")
        for fqn, m in model.named_modules():
            if filter_fn(m, fqn):
                converted.append(fqn)
                m.weight.qdata = torch.zeros(m.weight.shape, dtype=torch.float8_e4m3fn)
                m.weight.scale = torch.ones(m.weight.shape[0], 1)

    torchao = types.ModuleType("torchao")
    torchao.__version__ = "0.18.0"
    quantization = types.ModuleType("torchao.quantization")
    quantization.Float8DynamicActivationFloat8WeightConfig = Float8DynamicActivationFloat8WeightConfig
    quantization.PerRow, quantization.PerTensor, quantization.quantize_ = PerRow, PerTensor, quantize_
    torchao.quantization = quantization
    return {"torchao": torchao, "torchao.quantization": quantization}


def _decoder() -> torch.nn.Module:
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layer = torch.nn.Module()
    model.model.layer.q_proj = torch.nn.Linear(32, 16, bias=False)
    model.model.norm = torch.nn.LayerNorm(16)
    model.lm_head = torch.nn.Linear(16, 64, bias=False)
    return model.to(torch.bfloat16)


def test_torchao_float8_records_each_variant(bench):
    converted: list[str] = []
    with mock.patch.dict(sys.modules, _stand_in_torchao(converted)):
        models, info = bench.torchao_float8(_decoder)
    assert list(models) == ["torchao PerRow"]
    assert converted == ["model.layer.q_proj"]  # every linear but lm_head, as quantkit's runtime converts them
    assert info["torchao"] == "0.18.0"
    row, failed = info["torchao_variants"]["torchao PerRow"], info["torchao_variants"]["torchao PerTensor"]
    assert row["float8_linears"] == 1
    # q_proj as 16x32 float8 bytes and 16 FP32 scales; LayerNorm's 2x16 and lm_head's 64x16 in BF16
    assert row["weight_bytes"] == 16 * 32 + 16 * 4 + 2 * 16 * 2 + 64 * 16 * 2
    assert row["config"] == "Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)"
    assert failed["error"] == "quantize_: RuntimeError: no kernel for this" and "float8_linears" not in failed
    line = bench.torchao_summary(info)
    assert line.startswith("0.18.0; torchao PerRow: 1 float8 linears, ")
    assert line.endswith("torchao PerTensor failed (quantize_: RuntimeError: no kernel for this)")
