"""NVFP4 weight algorithms per recipe rule: validation (exit 2), the ModelOpt config they become,
the CPU static blockwise kernel they need, and a quantize run with per-rule algorithms on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_export import tiny_model

from quantkit import nvfp4_cpu
from quantkit.cli import main
from quantkit.errors import RecipeError
from quantkit.recipe import WEIGHT_ALGORITHMS, load_recipe, recipe_from_dict

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


@pytest.mark.parametrize("rule,expected", [
    ("{types: [Linear], precision: fp8, algorithm: four_over_six}",
     "rules[0].algorithm: four_over_six is an algorithm for nvfp4 weights, and this rule's weights are fp8"),
    ("{types: [Linear], precision: int8, algorithm: gptq}", "algorithm: gptq is an algorithm for nvfp4 weights"),
    ("{types: [Linear], precision: nvfp4, algorithm: hqq}", "rules[0].algorithm: 'hqq' is not one of four_over_six"),
    ("{types: [Linear], precision: nvfp4, algorithm: awq_lite, calibrator: smoothquant}",
     "algorithm: awq_lite and calibrator: smoothquant both rewrite the weights"),
])
def test_an_algorithm_that_does_not_fit_is_a_recipe_error_exit_2(tmp_path, capsys, rule, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nrules:\n  - {rule}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert expected in str(e.value) and str(path) in str(e.value)
    assert main(["plan", "--recipe", str(path), "--model", "tests/test_export.py:tiny_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("RecipeError: ") and expected in err and "Traceback" not in err


def _recipe(algorithm: str | None, down_algorithm: str | None = None):
    up = {"match": ["*.up"], "types": ["Linear"], "precision": "nvfp4"}
    down = {"match": ["*.down"], "types": ["Linear"], "precision": "nvfp4"}
    if algorithm:
        up["algorithm"] = algorithm
    if down_algorithm:
        down["algorithm"] = down_algorithm
    return recipe_from_dict({"name": "algo", "default": "skip", "rules": [up, down], "attention": {"precision": "skip"}})


def test_plan_and_modelopt_config_carry_the_rule_algorithm():
    from quantkit import ptq
    from quantkit.modelopt_config import build_quant_config, weight_algorithm_passes

    plan = ptq.prepare(tiny_model(), _recipe("four_over_six", "awq_lite"))
    rows = {r.name: r for r in plan.layers}
    assert rows["blocks.0.up"].algorithm == "four_over_six" and rows["blocks.1.down"].algorithm == "awq_lite"
    assert rows["blocks.0.q_proj"].algorithm is None
    entries = {e["quantizer_name"]: e for e in build_quant_config(plan)["quant_cfg"]}
    up_w = entries["blocks.0.up.weight_quantizer"]["cfg"]["block_sizes"]
    assert up_w == {-1: 16, "type": "static", "scale_bits": (4, 3), "four_over_six": True}
    assert entries["blocks.0.down.weight_quantizer"]["cfg"]["block_sizes"]["type"] == "dynamic"
    assert entries["blocks.0.up.input_quantizer"]["cfg"]["block_sizes"]["type"] == "dynamic"
    passes = weight_algorithm_passes(plan)
    assert [(name, algo["method"], layers) for name, algo, layers in passes] == [
        ("four_over_six", "mse", ["blocks.0.up", "blocks.1.up"]),
        ("awq_lite", "awq_lite", ["blocks.0.down", "blocks.1.down"])]
    assert set(WEIGHT_ALGORITHMS) == {"four_over_six", "mse_fp8_sweep", "local_hessian", "awq_lite", "awq_clip",
                                      "awq_full", "gptq"}


def test_static_kernel_rounds_to_e2m1_times_its_fp8_block_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * 3
    x[0, :16] = 0.0  # a zero block: scale 0 -> zeros
    x[1, 5] = float("nan")
    amax = x.nan_to_num(0.0).abs().reshape(-1, 16).amax(-1)
    gamax = amax.max()
    y = nvfp4_cpu.nvfp4_static_fake_quantize(x, amax, gamax)
    assert y.shape == x.shape and y.dtype == x.dtype
    scale = nvfp4_cpu.nvfp4_static_block_scales(amax, gamax).reshape(-1, 1)
    # the scales are FP8 E4M3 values times the per-tensor FP8 scale global_amax / (6 * 448)
    fp8_step = gamax / 6.0 / 448.0
    assert torch.allclose((scale / fp8_step).to(torch.float8_e4m3fn).float() * fp8_step, scale, rtol=1e-6)
    q = (y.reshape(-1, 16) / torch.where(scale == 0, 1.0, scale)).abs()
    finite = ~x.reshape(-1, 16).isnan()
    nearest = (q[finite].unsqueeze(-1) - E2M1).abs().min(-1).values
    assert float(nearest.max()) < 1e-5, "every element is an E2M1 value times its block scale"
    assert torch.equal(y[0, :16], torch.zeros(16))
    assert y[1, 5] == -6.0 * scale[(1 * 64 + 5) // 16]  # NaN is not >= 0: the kernel's -6 * scale
    # the nearest E2M1 value: no element is further from x than half an E2M1 step (1 x scale at the top)
    err = (y - x).abs().reshape(-1, 16)[finite]
    assert bool((err <= scale.expand(-1, 16)[finite] + 1e-6).all())
    # four-over-six normalizes block scales by 256 instead of 448: other scales, same grid
    y46 = nvfp4_cpu.nvfp4_static_fake_quantize(x, amax, gamax, fp8_max_for_normalization=256.0)
    assert not torch.equal(y46.nan_to_num(), y.nan_to_num())
    with pytest.raises(ValueError, match="not a multiple"):
        nvfp4_cpu.nvfp4_static_fake_quantize(x, amax[:5])


def test_static_block_scales_round_as_modelopts_cuda_extension_not_its_eager_fallback():
    """compute_fp4_scales on CUDA rounds block scales with the CUDA extension's fake_e4m3fy: scale =
    448 / amax and 1 / scale as IEEE FP32 divisions. ModelOpt's CPU fallback (fp8_eager) takes
    448 / amax as amax.reciprocal() * 448; for this global amax that is one ulp off, and so is
    every non-zero block scale (the 12 failing GPU parity cases had this cause)."""
    import numpy as np
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl

    amax = torch.rand(512, generator=torch.Generator().manual_seed(0)) * 1.1
    amax[::7] = 0.0
    global_amax = torch.tensor(1.1)
    fp8_amax = np.float32(1.1) * np.float32(1 / 6)
    scale = np.float32(448.0) / fp8_amax
    inv_scale = np.float32(1.0) / scale
    block = amax.numpy() * np.float32(1 / 6)
    expected = torch.from_numpy(block * scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * float(inv_scale)
    got = nvfp4_cpu.nvfp4_static_block_scales(amax, global_amax)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    eager = scaled_e4m3_impl(amax * nvfp4_cpu._INV_E2M1, torch.tensor(fp8_amax))
    assert int((eager != got).sum()) == int((amax > 0).sum()) == 438
    assert float((eager - got).abs().max()) < 1e-6 * float(got.max())


STATIC = ("four_over_six", "mse_fp8_sweep", "local_hessian", "gptq")  # StaticBlockScaleQuantizer weights


def _per_layer_recipe(algorithms):
    """The tiny model's four NVFP4 linears, one rule (and one algorithm, None = max) each."""
    layers = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    rules = [{"match": [name], "types": ["Linear"], "precision": "nvfp4", **({"algorithm": a} if a else {})}
             for name, a in zip(layers, algorithms)]
    return recipe_from_dict({"name": "algos", "default": "skip", "rules": rules, "attention": {"precision": "skip"}})


@pytest.mark.parametrize("algorithms", [STATIC, ("awq_lite", "awq_clip", "awq_full", None)], ids=("static", "awq"))
def test_every_algorithm_quantizes_on_cpu_one_layer_each(algorithms):
    """Every rule algorithm runs on the CPU, four per quantize run (one layer each, each its own
    calibration pass); the static ones quantize through quantkit's kernel bit for bit; the other
    layers' quantizers are back on afterwards; the error stays that of NVFP4."""
    from quantkit import calib, ptq

    assert set(STATIC) | {"awq_lite", "awq_clip", "awq_full"} == set(WEIGHT_ALGORITHMS)
    loaded = tiny_model()
    reference_model = copy.deepcopy(loaded.model)
    cs = calib.synthetic_set(loaded, n=8, seed=0)
    plan = ptq.quantize_model(loaded, _per_layer_recipe(algorithms), cs, dtype="fp32", device=torch.device("cpu"),
                              batch_size=4)
    rows = {r.name: r.algorithm for r in plan.layers if r.algorithm}
    assert sorted(rows.values()) == sorted(a for a in algorithms if a)
    modules = dict(loaded.model.named_modules())
    for name, algorithm in zip(["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"], algorithms):
        layer = modules[name]
        wq = layer.weight_quantizer
        assert wq.is_enabled and layer.input_quantizer.is_enabled, name
        if algorithm in STATIC:
            assert type(wq).__name__ == "StaticBlockScaleQuantizer" and wq.amax.numel() == layer.weight.numel() // 16
            with torch.no_grad():
                expected = nvfp4_cpu.nvfp4_static_fake_quantize(
                    layer.weight, wq.amax, wq.global_amax,
                    fp8_max_for_normalization=256.0 if algorithm == "four_over_six" else 448.0)
                assert torch.equal(wq(layer.weight), expected), algorithm
    assert loaded.model.blocks[0].q_proj.weight_quantizer.is_enabled is False  # skip in this recipe
    with torch.no_grad():
        args, kwargs = next(iter(cs.batches(4)))
        ref, out = reference_model(*args, **kwargs), loaded.model(*args, **kwargs)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0).item()
    assert 0.97 < cos < 1.0, f"{algorithms}: cosine {cos}"


def test_saved_run_with_static_algorithm_reloads_bit_for_bit(tmp_path):
    from quantkit import calib, ptq

    loaded = tiny_model()
    recipe = _recipe("four_over_six")
    cs = calib.synthetic_set(loaded, n=8, seed=0)
    result = ptq.quantize(loaded, recipe, cs, device="cpu", batch_size=4, per_layer=False)
    out = tmp_path / "run"
    out.mkdir()
    ptq.save_run(result, out, loaded.spec, "fp32")
    again = ptq.load_quantized(out, trust_model_code=True)
    args, kwargs = next(iter(cs.batches(4)))
    with torch.no_grad():
        assert torch.equal(loaded.model(*args, **kwargs), again.loaded.model(*args, **kwargs))
