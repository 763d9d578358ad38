"""NVFP4 fake quantization on the CPU: hand-computed values, and ModelOpt running it after install().

Most cases use global amax 2688 = 6 * 448, which makes the per-tensor scale exactly 1, so a block's
scale is its maximum / 6 rounded to FP8 E4M3 and every expected value below can be checked by hand.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn

from quantkit import nvfp4_cpu
from quantkit.errors import QuantkitError
from quantkit.nvfp4_cpu import nvfp4_fake_quantize

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization import tensor_quant

UNIT = torch.tensor(6.0 * 448.0)  # per-tensor scale exactly 1


def q(values, amax=UNIT, dtype=torch.float32):
    return nvfp4_fake_quantize(torch.tensor(values, dtype=dtype), amax)


def assert_values(got, expected):
    expected = torch.tensor(expected, dtype=got.dtype)
    assert torch.equal(got, expected), f"\n got      {got.tolist()}\n expected {expected.tolist()}"


def test_per_tensor_scale_is_amax_over_2688_as_on_cuda():
    assert nvfp4_cpu.nvfp4_global_scale(UNIT).item() == 1.0
    assert nvfp4_cpu.nvfp4_global_scale(torch.tensor([1.0, 5376.0, 3.0])).item() == 2.0  # max of a vector
    # CUDA computes amax * fp32(1/2688), which is not always the correctly rounded amax / 2688
    amax = torch.rand(10000) * 100
    ours = torch.stack([nvfp4_cpu.nvfp4_global_scale(a) for a in amax])
    assert torch.equal(ours, amax * torch.tensor(1.0 / 2688.0, dtype=torch.float32))


def test_block_with_max_6_keeps_e2m1_values_and_rounds_ties_to_even():
    # max 6 -> block scale fp8(6 / 6) = 1, so the outputs are the E2M1 roundings of the inputs;
    # ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (the even code)
    x = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 5.5, 6.0]
    assert_values(q(x), [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 6.0, 6.0])


def test_just_off_the_ties():
    x = [6.0, 0.2500001, 0.7499999, 1.2500001, 1.7499999, 2.5000002, 3.4999998, 5.0000005,
         0.1, 0.6, 0.9, 1.4, 2.2, 2.8, 4.4, 5.9]
    assert_values(q(x), [6.0, 0.5, 0.5, 1.5, 1.5, 3.0, 3.0, 6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def test_negative_values_mirror_positive_ones():
    x = [-6.0, -0.25, -0.3, -0.75, -1.25, -2.6, -3.5, -5.0, -0.1, 0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0]
    got = q(x)
    assert_values(got, [-6.0, -0.0, -0.5, -1.0, -1.0, -3.0, -4.0, -4.0, -0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0])
    # like the kernel (x >= 0 ? v : -v): small negatives give -0.0, an input -0.0 gives +0.0
    assert torch.signbit(got[[1, 8]]).all() and not torch.signbit(q([-0.0] + [1.0] * 15)[0])


def test_block_scale_is_rounded_to_fp8_e4m3():
    # max 7: 7 / 6 = 1.1667 rounds to the E4M3 value 1.125, so 7 / 1.125 = 6.22 -> 6 -> 6.75
    x = [7.0, 1.0, 2.0, 3.0] + [0.0] * 12
    assert_values(q(x), [6.75, 1.125, 2.25, 3.375] + [0.0] * 12)
    # max 12: scale 2 exactly; 3 / 2 = 1.5 is an E2M1 value, -5 / 2 = -2.5 a tie (-> -2)
    assert_values(q([12.0, 3.0, -5.0, 0.4] + [0.0] * 12), [12.0, 3.0, -4.0, 0.0] + [0.0] * 12)


def test_saturation_at_6_times_the_largest_block_scale():
    # 3000 / 6 = 500 > 448: the block scale saturates at 448 and values clip at 6 * 448 = 2688
    x = [3000.0, 2000.0, -2688.0, 100.0, -5000.0] + [0.0] * 11
    assert_values(q(x), [2688.0, 1792.0, -2688.0, 0.0, -2688.0] + [0.0] * 11)


def test_zero_blocks_and_tiny_blocks_give_zero():
    x = torch.zeros(2, 32)
    x[0, 16:] = 5e-5  # block scale 5e-5 / 6 is below FP8's smallest step: scale -> 1.0 -> zeros
    x[1, :16] = 3.0
    out = nvfp4_fake_quantize(x, UNIT)
    assert torch.equal(out[0], torch.zeros(32))
    assert torch.equal(out[1, :16], torch.full((16,), 3.0)) and torch.equal(out[1, 16:], torch.zeros(16))
    # with a small global amax the FP8 scale is fine but scale * global < 1e-5: ModelOpt flushes it
    y = torch.tensor([2e-5] + [1e-5] * 15)
    assert torch.equal(nvfp4_fake_quantize(y, torch.tensor(1e-3)), torch.zeros(16))


def test_zero_global_amax_quantizes_with_unit_scale():
    # ModelOpt: per-tensor scale 0 -> 1e-12; block scale 448e-12 < 1e-5 -> 1.0: plain E2M1 rounding
    assert_values(q([0.3, 2.6, 7.0, -1.3] + [0.0] * 12, torch.tensor(0.0)), [0.5, 3.0, 6.0, -1.5] + [0.0] * 12)


def test_last_dim_20_has_a_block_of_4():
    row = [6.0] + [1.0] * 15 + [0.3, 3.0, -1.1, 0.6]
    # second block: max 3 -> scale 0.5: 0.6->0.5, 6->6, 2.2->2, 1.2->1 (times 0.5)
    out = nvfp4_fake_quantize(torch.tensor([row, [-v for v in row]]), UNIT)
    assert_values(out[0], [6.0] + [1.0] * 15 + [0.25, 3.0, -1.0, 0.5])
    assert torch.equal(out[1], -out[0])


def test_last_dim_7_is_one_short_block():
    assert_values(q([[6.0, 0.25, -0.75, 1.25, 2.5, 3.5, 5.0]]), [[6.0, 0.0, -1.0, 1.0, 2.0, 4.0, 4.0]])


def test_blocks_run_along_the_last_axis_per_row():
    x = torch.zeros(3, 2, 32)
    x[1, 1, 16] = 12.0
    x[1, 1, 17] = 3.5  # shares a block with 12: scale 2 -> 3.5 / 2 = 1.75, a tie -> 2 -> 4.0
    x[1, 1, 15] = 0.6  # the block before has max 0.6: scale 0.1 -> fp8 0.1015625 -> 0.6/0.1015625 = 5.9 -> 6
    out = nvfp4_fake_quantize(x, UNIT)
    assert out[1, 1, 16].item() == 12.0 and out[1, 1, 17].item() == 4.0
    assert out[1, 1, 15].item() == 6 * 0.1015625
    assert int((out != 0).sum()) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_in_and_out_computed_in_fp32(dtype):
    got = q([7.0, 1.0, 2.0, 3.0] + [0.0] * 12, dtype=dtype)
    assert got.dtype == dtype
    assert_values(got, [6.75, 1.125, 2.25, 3.375] + [0.0] * 12)
    # a per-tensor scale with many mantissa bits: products round once, from FP32 to the input dtype
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 48, generator=g) * 3).to(dtype)
    amax = torch.tensor(9.87654)
    out = nvfp4_fake_quantize(x, amax)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, nvfp4_fake_quantize(x.float(), amax).to(dtype))


def test_default_global_amax_is_the_tensors_absolute_max():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 40, generator=g)
    assert torch.equal(nvfp4_fake_quantize(x), nvfp4_fake_quantize(x, x.abs().max()))


def test_output_values_are_e2m1_times_the_block_scale():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 64, generator=g) * 10
    amax = x.abs().max()
    out = nvfp4_fake_quantize(x, amax)
    gs = nvfp4_cpu.nvfp4_global_scale(amax)
    scales = nvfp4_cpu.nvfp4_block_scales(x.reshape(50, 4, 16).abs().amax(-1, keepdim=True), gs)
    codes = nvfp4_cpu.e2m1_round((out.reshape(50, 4, 16) / scales).abs())
    assert torch.equal(torch.copysign(codes * scales, out.reshape(50, 4, 16)), out.reshape(50, 4, 16))
    rel = ((out - x).abs() / x.abs().clamp_min(1e-6)).median()
    assert rel < 0.15, f"median relative error {rel}"


def test_e2m1_round_saturates_and_maps_nan_like_the_kernel():
    got = nvfp4_cpu.e2m1_round(torch.tensor([0.25, 0.75, 5.0, 5.01, 100.0, float("inf"), float("nan")]))
    assert got.tolist() == [0.0, 1.0, 4.0, 6.0, 6.0, 6.0, 6.0]


def test_bad_inputs():
    with pytest.raises(TypeError):
        nvfp4_fake_quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        nvfp4_fake_quantize(torch.tensor(1.0))
    assert nvfp4_fake_quantize(torch.empty(0, 16)).shape == (0, 16)


# --- ModelOpt ------------------------------------------------------------------------------------


@pytest.fixture
def installed():
    was = nvfp4_cpu.is_installed()
    nvfp4_cpu.install()
    yield
    if not was:
        nvfp4_cpu.uninstall()


def _quantized_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 64, generator=g) * 2 for _ in range(4)]
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), forward_loop=lambda m: [m(b) for b in batches])
    return model, batches


def test_modelopt_refuses_nvfp4_on_cpu_without_install():
    was = nvfp4_cpu.is_installed()
    nvfp4_cpu.uninstall()
    try:
        x = torch.randn(4, 32)
        with pytest.raises(AssertionError, match="CUDA"):
            tensor_quant.dynamic_block_quant(x, 16, x.abs().max(), None, (2, 1), (4, 3), None, None, True)
    finally:
        if was:
            nvfp4_cpu.install()


def test_mtq_quantize_nvfp4_on_cpu_matches_the_cpu_function(installed):
    model, batches = _quantized_mlp()
    x = batches[0]
    with torch.no_grad():
        y = model(x)
        l0, l2 = model[0], model[2]
        for layer in (l0, l2):
            wq = layer.weight_quantizer
            assert wq.is_enabled and layer.input_quantizer.is_enabled
            assert torch.equal(wq(layer.weight), nvfp4_fake_quantize(layer.weight, wq.amax))
        h = torch.relu(
            nn.functional.linear(
                nvfp4_fake_quantize(x, l0.input_quantizer.amax),
                nvfp4_fake_quantize(l0.weight, l0.weight_quantizer.amax),
                l0.bias,
            )
        )
        expected = nn.functional.linear(
            nvfp4_fake_quantize(h, l2.input_quantizer.amax),
            nvfp4_fake_quantize(l2.weight, l2.weight_quantizer.amax),
            l2.bias,
        )
    assert torch.equal(y, expected)
    with torch.no_grad():
        mtq.disable_quantizer(model, "*")
        ref = model(x)
    cos = nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert cos > 0.97, f"cosine to the unquantized model {cos}"  # NVFP4 on a random MLP: 0.980


def test_install_is_idempotent_and_patches_one_global(installed):
    first = tensor_quant.dynamic_block_quantize_op
    nvfp4_cpu.install()
    assert tensor_quant.dynamic_block_quantize_op is first
    assert first.__wrapped__ is torch.ops.tensorrt.dynamic_block_quantize_op
    assert nvfp4_cpu.is_installed()


def test_install_refuses_other_modelopt_versions(monkeypatch):
    import modelopt

    was = nvfp4_cpu.is_installed()
    nvfp4_cpu.uninstall()
    try:
        monkeypatch.setattr(modelopt, "__version__", "0.48.0")
        with pytest.raises(QuantkitError, match=r"0\.47\.0.*found 0\.48\.0"):
            nvfp4_cpu.install()
        assert not nvfp4_cpu.is_installed()
    finally:
        monkeypatch.undo()
        if was:
            nvfp4_cpu.install()


def test_other_formats_and_block_sizes(installed):
    x = torch.randn(4, 64)
    with pytest.raises(QuantkitError, match="block size 32"):
        tensor_quant.dynamic_block_quant(x, 32, x.abs().max(), None, (2, 1), (4, 3), None, None, True)
    calls = []
    route = tensor_quant.dynamic_block_quantize_op
    original = route.__wrapped__
    try:
        nvfp4_cpu.uninstall()
        tensor_quant.dynamic_block_quantize_op = lambda *a: calls.append(a[3:]) or a[0]
        nvfp4_cpu.install()
        # MXFP8 (E4M3 data, E8M0 scales) on CPU is not ours: it goes to ModelOpt's op unchanged
        tensor_quant.dynamic_block_quant(x, 32, None, None, (4, 3), (8, 0), None, None, True)
        assert calls == [(8, 4, 9, 8)]
    finally:
        nvfp4_cpu.uninstall()
        tensor_quant.dynamic_block_quantize_op = original
        nvfp4_cpu.install()


def test_nvfp4_onnx_export_on_cpu(installed):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("modelopt.torch._deploy.utils", reason="ModelOpt's ONNX export needs its [onnx] extras")
    from modelopt.torch._deploy.utils import get_onnx_bytes_and_metadata
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes
    from onnx import numpy_helper

    model, batches = _quantized_mlp()
    raw, _ = get_onnx_bytes_and_metadata(model, (batches[0],), onnx_opset=23)
    graph = onnx.load_from_string(OnnxBytes.from_bytes(raw).get_onnx_model_file_bytes()).graph
    ops = collections.Counter((n.domain, n.op_type) for n in graph.node)
    assert ops[("trt", "TRT_FP4DynamicQuantize")] == 2  # one per activation quantizer
    assert ops[("", "DequantizeLinear")] == 8  # 2 per activation + 2 per weight
    inits = {i.name: i for i in graph.initializer}
    for name, layer in (("0", model[0]), ("2", model[2])):
        w4 = inits[f"{name}.weight_f4"]
        assert w4.data_type == onnx.TensorProto.FLOAT4E2M1 and list(w4.dims) == list(layer.weight.shape)
        # the exported FP4 codes and FP8 block scales are those of the CPU fake quantization
        codes = torch.from_numpy(numpy_helper.to_array(w4).astype("float32"))
        s8 = torch.from_numpy(numpy_helper.to_array(inits[f"{name}.weight_f8_scale"]).astype("float32"))
        s32 = torch.from_numpy(numpy_helper.to_array(inits[f"{name}.weight_f8_scale_f32_scale"]).astype("float32"))
        amax = layer.weight_quantizer.amax
        fake = nvfp4_fake_quantize(layer.weight.detach(), amax)
        gs = nvfp4_cpu.nvfp4_global_scale(amax)
        # (ModelOpt's exporter divides in IEEE FP32, the kernel by its hardware reciprocal: an element
        # on a rounding boundary could export one code off; none does in this model)
        assert torch.equal(codes * (s8 * gs).repeat_interleave(16, dim=1), fake)
        # ONNX's own per-tensor scale is amax / 2688 in one rounding (the fake quant's is
        # amax * fp32(1/2688)): the two agree to within one FP32 ulp
        assert abs(s32.item() - gs.item()) <= torch.finfo(torch.float32).eps * gs.item()
