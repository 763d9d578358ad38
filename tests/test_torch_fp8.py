"""The PyTorch FP8 runtime on the CPU: which linears convert, FP8Linear against ModelOpt's fake quant, NaN safety.

torch 2.13's CPU build has torch._scaled_mm, so FP8Linear runs the same call as on a GPU here; the
explicit reference path (dequantize, FP32 matmul) is checked against it too. That the module really
calls torch._scaled_mm on CUDA is asserted in tests/gpu/test_torch_fp8.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt")

from quantkit.errors import InputError  # noqa: E402
from quantkit.models import LoadedModel  # noqa: E402
from quantkit.modelopt_config import build_quant_config  # noqa: E402
from quantkit.plan import make_plan  # noqa: E402
from quantkit.recipe import recipe_from_dict  # noqa: E402
from quantkit.runtime import Runner  # noqa: E402
from quantkit.runtime import torch_fp8  # noqa: E402
from quantkit.runtime.torch_fp8 import (  # noqa: E402
    FP8_DTYPE,
    FP8Linear,
    TorchFP8Runner,
    convert_to_fp8,
    fp8_conversion_plan,
    fp8_matmul_reference,
    quantize_e4m3,
    repeated_blocks,
)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    """Four FP8 linears in two blocks, one INT8 linear, one with in_features 20 (not a multiple of 16)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.int8_proj = nn.Linear(d, d)
        self.odd = nn.Linear(d, 20)
        self.head = nn.Linear(20, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.odd(self.int8_proj(x)))


RECIPE = recipe_from_dict({
    "name": "fp8-test", "default": "skip",
    "rules": [{"types": ["Linear"], "precision": "fp8"},
              {"match": "int8_proj", "precision": "int8"},
              {"match": "head", "precision": "skip"}],
    "protect": {"softmax": False}, "attention": {"precision": "skip"},
})


def _data(n: int = 8, d: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 5, d, generator=g) for _ in range(n)]


def _quantized(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    data = [x.to(dtype) for x in _data()]

    def loop(m):
        for x in data:
            m(x)

    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), loop)
    return model


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_converts_exactly_the_per_tensor_fp8_linears():
    model = _quantized()
    plan = dict(fp8_conversion_plan(model))
    assert plan["blocks.0.up"] is None and plan["blocks.1.down"] is None
    assert "not FP8" in plan["int8_proj"], plan["int8_proj"]
    assert "divisible by 16" in plan["odd"], plan["odd"]
    assert "disabled" in plan["head"], plan["head"]

    assert convert_to_fp8(model) == 4
    assert [n for n, m in model.named_modules() if isinstance(m, FP8Linear)] == [
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert not isinstance(model.int8_proj, FP8Linear) and hasattr(model.int8_proj, "weight_quantizer")
    assert convert_to_fp8(model) == 0, "a second conversion must find nothing left"


def test_fp8linear_matches_modelopt_fake_quant():
    model = _quantized()
    reference = copy.deepcopy(model)
    convert_to_fp8(model)
    x = _data(1, seed=1)[0]
    with torch.no_grad():
        for name in ("blocks.0.up", "blocks.1.down"):
            fake, real = reference.get_submodule(name), model.get_submodule(name)
            inp = x if name.endswith("up") else torch.randn(4, 5, 128, generator=torch.Generator().manual_seed(2))
            want, got = fake(inp), real(inp)
            assert got.shape == want.shape == (4, 5, real.out_features)
            assert got.dtype == torch.float32
            err = (got - want).abs().max().item()
            scale = want.abs().max().item()
            # Same FP8 values on both sides; only the FP32 summation order differs.
            assert err <= 1e-5 * scale, f"{name}: max abs error {err} vs output scale {scale}"
        want, got = reference(x), model(x)
    assert _cos(got, want) >= 0.99999, f"model cosine {_cos(got, want)}"


def test_weight_stored_once_in_fp8_with_modelopt_scales():
    model = _quantized()
    q = model.blocks[0].up
    w_amax, x_amax = q.weight_quantizer.amax.float(), q.input_quantizer.amax.float()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    assert lin.weight.dtype == FP8_DTYPE and lin.weight.shape == (128, 32) and lin.weight.is_contiguous()
    assert torch.equal(lin.weight_scale, (w_amax / 448).reshape(()))
    assert torch.equal(lin.input_scale, (x_amax / 448).reshape(()))
    assert torch.equal(lin.input_inv_scale, (448 / x_amax).reshape(()))
    assert not any(isinstance(p, nn.Parameter) for p in lin.parameters()), "FP8Linear holds buffers, no weights to train"
    assert lin.weight_bytes() == 128 * 32 + 128 * 4 + 3 * 4
    # a model-wide cast leaves the FP8 weight and FP32 scales alone
    model.to(torch.bfloat16)
    assert lin.weight.dtype == FP8_DTYPE and lin.input_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.float32
    keys = model.state_dict()
    assert keys["blocks.0.up.weight"].dtype == FP8_DTYPE


def test_bf16_output_with_fused_bias_matches_reference_path():
    model = _quantized(torch.bfloat16)
    convert_to_fp8(model)
    lin = model.blocks[0].up
    x = _data(1, seed=3)[0].to(torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
        x_fp8 = quantize_e4m3(x.reshape(-1, 32), lin.input_inv_scale)
        want = fp8_matmul_reference(x_fp8, lin.weight, lin.input_scale, lin.weight_scale, lin.bias, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert _cos(got, want.reshape(got.shape)) >= 0.9999


def test_reference_path_is_what_scaled_mm_computes(monkeypatch):
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    x = _data(1, seed=4)[0]
    with torch.no_grad():
        fast = lin(x)
        monkeypatch.setattr(torch_fp8, "CPU_SCALED_MM", False)
        explicit = lin(x)
    assert (fast - explicit).abs().max().item() <= 1e-5 * explicit.abs().max().item()


def test_inputs_beyond_fp8_range_saturate_instead_of_nan():
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    limit = 448 * lin.input_scale.item()  # the largest input the static scale represents
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([10 * limit, -1e6 * limit, 3.0e38, -3.0e38])
    x[1, :] = limit * 2
    with torch.no_grad():
        out = lin(x)
        clamped = lin(x.clamp(-limit, limit))
    assert torch.isfinite(out).all(), "inputs beyond ±448·scale must saturate, not become NaN/inf"
    assert torch.equal(out, clamped)
    q = quantize_e4m3(torch.tensor([1e30, -1e30, 5.0]), torch.tensor(1.0))
    assert q.float().tolist() == [448.0, -448.0, 5.0]


def test_zero_amax_uses_unit_scale_like_modelopt():
    w = torch.randn(16, 16)
    lin = FP8Linear.from_amax(w, torch.tensor(0.0), torch.tensor(0.0))
    assert lin.weight_scale.item() == pytest.approx(1 / 448) and lin.input_scale.item() == pytest.approx(1 / 448)


def _loaded(model: nn.Module) -> LoadedModel:
    return LoadedModel(spec="net", model=model, input_names=["x"], output_names=["output"],
                       example_inputs={"x": torch.randn(2, 3, 32)})


def test_runner_interface_on_cpu():
    model = _quantized()
    reference = copy.deepcopy(model)
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    assert isinstance(runner, Runner) and runner.name == "torch-fp8"
    assert runner.converted == 4
    assert {n for n, _ in runner.skipped} == {"int8_proj", "odd", "head"}
    x = _data(1, seed=5)[0]
    out = runner.run({"x": x})
    assert set(out) == {"output"} and out["output"].device.type == "cpu" and out["output"].shape == (4, 5, 16)
    with torch.no_grad():
        want = reference(x)
    assert _cos(out["output"], want) >= 0.99999


def test_runner_refuses_a_model_without_fp8_layers():
    with pytest.raises(InputError, match="no static per-tensor FP8"):
        TorchFP8Runner(_loaded(Net()), compile=False, device="cpu")


def test_repeated_blocks_are_the_transformer_layers():
    model = Net()
    assert repeated_blocks(model) == list(model.blocks)
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4))) == []
