"""The PyTorch FP8 runtime on a GPU with FP8 tensor cores: FP8Linear calls torch._scaled_mm, saturates
instead of producing NaN, matches the explicit arithmetic and ModelOpt's fake quant, and compiles.

Skipped, with the reason, without CUDA (tests/gpu/conftest.py) or on GPUs below compute capability 8.9.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt")

from quantkit.models import LoadedModel  # noqa: E402
from quantkit.modelopt_config import build_quant_config  # noqa: E402
from quantkit.plan import make_plan  # noqa: E402
from quantkit.recipe import recipe_from_dict  # noqa: E402
from quantkit.runtime.torch_fp8 import (  # noqa: E402
    FP8Linear,
    TorchFP8Runner,
    convert_to_fp8,
    fp8_matmul_reference,
    quantize_e4m3,
)


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = pytest.mark.skipif(not _fp8_capable(), reason="FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell)")

RECIPE = recipe_from_dict({"name": "fp8-linears", "default": "skip", "rules": [{"types": ["Linear"], "precision": "fp8"}],
                           "protect": {"softmax": False}, "attention": {"precision": "skip"}})


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self, d: int = 256, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _quantized(dtype=torch.bfloat16) -> Net:
    torch.manual_seed(0)
    model = Net().cuda().to(dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randn(8, 64, 256, device="cuda", generator=g).to(dtype) for _ in range(4)]

    def loop(m):
        for x in data:
            m(x)

    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), loop)
    return model


def _cos(a, b) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_fp8linear_calls_scaled_mm_on_cuda(monkeypatch):
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    calls = []
    original = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = lin(x)
    assert calls == [torch.float8_e4m3fn], calls
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 1024)
    x_fp8 = quantize_e4m3(x.reshape(-1, 256), lin.input_inv_scale)
    want = fp8_matmul_reference(x_fp8, lin.weight, lin.input_scale, lin.weight_scale, lin.bias, torch.float32)
    assert _cos(out, want) >= 0.9999, f"cosine {_cos(out, want)} against the explicit FP8 arithmetic"


def test_saturates_where_a_plain_cast_gives_nan():
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    limit = 448 * lin.input_scale.item()
    x = torch.full((16, 256), 50.0 * limit, device="cuda", dtype=torch.bfloat16)
    x[::2] *= -1
    with torch.no_grad():
        out = lin(x)
        clamped = lin(x.clamp(-limit, limit))
    assert torch.isfinite(out).all()
    assert torch.equal(out, clamped)


def test_model_matches_modelopt_fake_quant_eager_and_compiled():
    model = _quantized()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = reference(x)
    loaded = LoadedModel(spec="net", model=model, input_names=["x"], output_names=["y"])
    runner = TorchFP8Runner(loaded, compile=True)
    assert runner.converted == 6
    assert all(isinstance(m, FP8Linear) for b in model.blocks for m in (b.up, b.down))
    got = runner.run({"x": x})["y"]
    assert got.device.type == "cpu" and torch.isfinite(got).all()
    # BF16 rounding of the fake-quant dequantization is the only difference.
    assert _cos(got, want.cpu()) >= 0.999, f"cosine {_cos(got, want.cpu())}"


def test_compare_runs_torch_fp8_like_the_other_runtimes(tmp_path):
    """`quantkit compare OUT --runtime torch-fp8 --device cuda`: the FP8 GEMMs agree with fake quant."""
    from quantkit.compare import compare
    from tests.test_export import save_tiny_run

    out = save_tiny_run(tmp_path, "fp8", samples=20, dtype="bf16", device="cuda")
    cmp = compare(out, against="fake-quant", runtimes=["torch-fp8"], device="cuda")
    assert cmp.runtimes["torch-fp8"].ran, cmp.runtimes["torch-fp8"].describe()
    assert cmp.runtimes["torch-fp8"].samples == 2
    for name, m in cmp.metrics["torch-fp8"].items():
        assert m.finite and m.cosine >= 0.999, (name, m.cosine)
