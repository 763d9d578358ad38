"""Max calibration with the statistics on the device (quantkit.max_calibration) against ModelOpt's own.

The amax of every quantizer must be bitwise ModelOpt's (same samples, same batches), for per-tensor
FP8, per-channel INT8 weights and NVFP4's global amax, in FP32 and BF16; the fast path must be the
one a max-calibrated quantize takes, leave nothing behind, and step aside for SmoothQuant.
CUDA: tests/gpu/test_max_calibration_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt")

from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

from quantkit import max_calibration, ptq  # noqa: E402
from quantkit.calib import CalibrationSet  # noqa: E402
from quantkit.errors import CalibrationError  # noqa: E402
from quantkit.models import LoadedModel  # noqa: E402
from quantkit.modelopt_config import build_quant_config  # noqa: E402
from quantkit.plan import make_plan  # noqa: E402
from quantkit.recipe import recipe_from_dict  # noqa: E402
from tests.tiny import amaxes_both_ways  # noqa: E402


class Net(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.int8_proj = nn.Linear(d, d)
        self.fp4_proj = nn.Linear(d, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x):
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(self.fp4_proj(self.int8_proj(x)))


RECIPE = {
    "name": "mixed-max", "default": "skip",
    "rules": [{"match": "up", "precision": "fp8"}, {"match": "down", "precision": "fp8"},
              {"match": "int8_proj", "precision": "int8"}, {"match": "fp4_proj", "precision": "nvfp4"},
              {"match": "head", "precision": "skip"}],
    "protect": {"softmax": False}, "attention": {"precision": "skip"},
    "calibration": {"algorithm": "max"},
}


def _loaded(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return LoadedModel(spec="net", model=Net().eval(), input_names=["x"], output_names=["output"],
                       example_inputs={"x": torch.randn(1, 5, 32)})


def _calibration(n: int = 12) -> CalibrationSet:
    g = torch.Generator().manual_seed(3)
    # outliers of both signs, so that |amin| > amax in some batches
    samples = [{"x": torch.randn(1, 5, 32, generator=g) * (1 + 4 * (i % 3 == 0)) * (-1) ** i} for i in range(n)]
    return CalibrationSet.from_samples(samples, {"batching": "examples"})


@pytest.mark.parametrize("axis", [None, 0, (0, 2)])
def test_running_amax_equals_max_calibrator_collect(axis):
    """The collector alone against ModelOpt's MaxCalibrator on one sequence of tensors: signs, zeros,
    a dtype change mid-way (ModelOpt's torch.max promotes), a starting value."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 4, 3, generator=g).to(torch.bfloat16), -torch.randn(6, 4, 3, generator=g).to(torch.bfloat16) * 9,
          torch.zeros(6, 4, 3, dtype=torch.bfloat16), torch.randn(6, 4, 3, generator=g) * 3]
    theirs, ours = MaxCalibrator(axis=axis), MaxCalibrator(axis=axis)
    theirs.collect(xs[0])
    ours.collect(xs[0])
    acc = max_calibration.RunningAmax("q", ours, ours.collect)
    for x in xs[1:]:
        theirs.collect(x)
        acc(x)
    acc.finish()
    want, got = theirs.compute_amax(), ours.compute_amax()
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
    assert acc.calls == 3 and acc.fallbacks == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_amax_bitwise_equal_to_modelopt_max_calibration(dtype):
    recipe = recipe_from_dict(RECIPE)
    calib = _calibration()
    ours, theirs = amaxes_both_ways(_loaded, recipe, calib, dtype=dtype, device=torch.device("cpu"),
                                    batch_size=4)
    assert set(ours) == set(theirs)
    # weight and input quantizers of every format: per tensor (fp8), per output channel (int8 weight), NVFP4
    for name in ("up", "down", "int8_proj", "fp4_proj"):
        assert f"{name}.weight_quantizer" in ours and f"{name}.input_quantizer" in ours, sorted(ours)
    assert ours["int8_proj.weight_quantizer"].shape == (32, 1)
    assert ours["up.input_quantizer"].shape == ()
    for name, want in theirs.items():
        assert ours[name].dtype == want.dtype, name
        assert torch.equal(ours[name], want), f"{name}: {ours[name]} vs ModelOpt's {want}"


def test_device_stats_replace_collect_only_for_the_loop():
    loaded = _loaded()
    model = loaded.model
    config = build_quant_config(make_plan(model, recipe_from_dict(RECIPE)))
    calib = _calibration()
    seen = {}

    def loop(m):
        found = max_calibration.calibrating_max_quantizers(m)
        seen["replaced"] = sum("collect" in vars(cal) for _, cal in found)
        seen["quantizers"] = len(found)
        calib.forward_loop(batch_size=4, progress=False)(m)

    with torch.no_grad():
        mtq.quantize(model, config, max_calibration.device_max_calibration(loop))
    # 4 quantized linears x (weight + input) collect on the device, every one of them
    assert seen == {"replaced": 8, "quantizers": 8}
    leftovers = [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)
                 and m._calibrator is not None and "collect" in vars(m._calibrator)]
    assert leftovers == []


def test_smoothquant_keeps_modelopt_loop(monkeypatch):
    calls = []
    real = max_calibration.device_max_calibration
    monkeypatch.setattr(max_calibration, "device_max_calibration", lambda loop: calls.append(1) or real(loop))
    recipe = recipe_from_dict({**RECIPE, "name": "sq", "rules": [{"match": "int8_proj", "precision": "int8"},
                                                                 {"match": "head", "precision": "skip"}],
                               "calibration": {"algorithm": "smoothquant"}})
    ptq.quantize_model(_loaded(), recipe, _calibration(), dtype="fp32", device=torch.device("cpu"), batch_size=4)
    assert calls == []
    ptq.quantize_model(_loaded(), recipe_from_dict(RECIPE), _calibration(), dtype="fp32", device=torch.device("cpu"),
                       batch_size=4)
    assert calls == [1]


def test_non_finite_activations_name_the_quantizer():
    loaded = _loaded()
    with torch.no_grad():
        loaded.model.up.bias[3] = float("inf")
    with pytest.raises(CalibrationError, match=r"NaN or Inf values at .*up\.input_quantizer|down\.input_quantizer"):
        ptq.quantize_model(loaded, recipe_from_dict(RECIPE), _calibration(), dtype="fp32", device=torch.device("cpu"),
                           batch_size=4)
