"""The CUDA path of quantize: NVFP4 through ModelOpt's own GPU kernel, FP8, BF16, save/restore."""

import warnings

import pytest
import torch

from quantkit import ptq
from quantkit.calib import builtin_set
from quantkit.models import load_model
from quantkit.plan import make_plan
from quantkit.recipe import Precision, load_recipe

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def calib():
    return builtin_set(load_model("llama-tiny"), "text-en", max_samples=96)


@pytest.mark.parametrize("recipe_name,dtype,cos_min", [("balanced", "bf16", 0.98), ("fp8", "bf16", 0.99),
                                                       ("balanced", "fp32", 0.98)])
def test_quantize_llama_tiny_on_cuda(tmp_path, calib, recipe_name, dtype, cos_min):
    loaded = load_model("llama-tiny")
    recipe = load_recipe(recipe_name)
    result = ptq.quantize(loaded, recipe, calib, dtype=dtype, device="cuda", batch_size=16)
    report = result.report
    cov = report["coverage"]["by_precision"]
    if recipe_name == "balanced":
        assert cov["nvfp4"]["layers"] == 12, cov  # 4 layers x gate/up/down
        assert not any("simulated on the CPU" in w for w in report["warnings"])
    assert cov["fp8"]["layers"] >= 16
    cos = report["metrics"]["fake-quant"]["logits"]["cosine"]
    print(f"\n{recipe_name} {dtype} cuda: held-out logits cosine {cos:.6f}, quantizers {report['quantizers']}")
    assert cos >= cos_min, f"cosine {cos}"
    assert report["quantizers"]["bmm"] >= 4 * 3
    protected_ops = {p["op"] for p in report["protections"]}
    assert {"softmax", "rmsnorm", "rope"} <= protected_ops

    # save, rebuild, restore: same outputs without calibration data
    ptq.save_run(result, tmp_path, "llama-tiny", dtype)
    batch_args, batch_kwargs = next(iter(calib.batches(4, device="cuda", dtype=ptq.DTYPES[dtype])))
    with torch.no_grad():
        before = loaded.run(batch_kwargs)["logits"]
        run = ptq.load_quantized(tmp_path, device="cuda")
        after = run.loaded.run(batch_kwargs)["logits"]
    assert torch.equal(before, after)


def test_nvfp4_weights_match_cpu_reference_on_cuda(calib):
    """A planned NVFP4 layer's fake-quantized weight on CUDA equals quantkit's CPU kernel (within one E2M1 step)."""
    from quantkit.nvfp4_cpu import nvfp4_fake_quantize

    loaded = load_model("llama-tiny")
    ptq.quantize_model(loaded, load_recipe("balanced"), calib.subset(range(16)), dtype="fp32", device=torch.device("cuda"),
                       batch_size=8)
    plan = make_plan(loaded.model, load_recipe("balanced"))
    row = next(r for r in plan.layers if r.precision == Precision.NVFP4)
    layer = dict(loaded.model.named_modules())[row.name]
    with torch.no_grad():
        gpu = layer.weight_quantizer(layer.weight).cpu()
        cpu = nvfp4_fake_quantize(layer.weight.detach().cpu(), global_amax=layer.weight.detach().abs().amax().cpu())
    mismatch = (gpu != cpu).float().mean().item()
    print(f"\n{row.name}: CUDA vs CPU NVFP4 weight mismatch fraction {mismatch:.2e}")
    assert mismatch < 1e-3
