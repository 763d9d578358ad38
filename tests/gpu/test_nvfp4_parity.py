"""quantkit.nvfp4_cpu on the CPU against ModelOpt 0.47's own NVFP4 path on CUDA, bit for bit.

ModelOpt's CUDA path for dynamic NVFP4 is the Triton kernel `fp4_fake_quant_block` (compute
capability >= 8.9). Each case runs the same tensor through both and compares with torch.equal.
Triton compiles the kernel's two FP32 divisions to PTX div.full.f32, which is a times the
hardware's approximate reciprocal of b (MUFU.RCP); the CPU code multiplies by the correctly
rounded reciprocal, which the hardware's misses by one ulp for some mantissas. So each case also
checks that the kernel's arithmetic done on the CPU with the GPU's own reciprocals IS bit-exact,
i.e. that the reciprocal is the only difference, and that no element differs by more than one
E2M1 step of its block scale. Every case prints one summary line (run with -s to see them).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

tensor_quant = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
triton_gemm = pytest.importorskip("modelopt.torch.kernels.quantization.gemm")
triton = pytest.importorskip("triton")
import triton.language as tl

from quantkit import nvfp4_cpu


def _triton_nvfp4() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 9)
        and triton_gemm.IS_AVAILABLE
        and hasattr(triton_gemm, "fp4_fake_quant_block")
    )


pytestmark = pytest.mark.skipif(
    not _triton_nvfp4(), reason="ModelOpt's NVFP4 Triton kernel needs CUDA, Triton and compute capability >= 8.9"
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((4096, 4096), (1, 16), (33, 20), (5, 7), (3, 4, 48), (2, 100003), (257, 1), (64, 1000))


def modelopt_cuda(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's own NVFP4 fake quantization of x on the GPU (the path TensorQuantizer takes)."""
    out = tensor_quant.dynamic_block_quant(
        x.cuda(), 16, amax.cuda(), None, (2, 1), (4, 3), None, "dynamic", True
    )
    torch.cuda.synchronize()
    return out.cpu()


@triton.jit
def _div_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, a / b, mask=mask)


def triton_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b as Triton computes FP32 `/` in a kernel (PTX div.full.f32), back on the CPU."""
    a, b = a.float().cuda().contiguous(), b.float().cuda().contiguous()
    out = torch.empty_like(a)
    _div_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), BLOCK=1024)
    return out.cpu()


def gpu_reciprocal(b: torch.Tensor) -> torch.Tensor:
    """The GPU's reciprocal of each element of b, as div.full.f32 uses it (Triton's 1 / b)."""
    values, index = torch.unique(b, return_inverse=True)
    return triton_div(torch.ones_like(values), values)[index]


def kernel_transliteration(x, amax, reciprocal=torch.reciprocal, ieee_division=False):
    """fp4_fake_quant_kernel written out line by line in PyTorch (FP32 on the CPU).

    The kernel's `a / b` is computed as a * reciprocal(b), or as IEEE a / b with `ieee_division`.
    """
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n).float()
    tile = F.pad(x2, (0, (-n) % 16)).reshape(x2.shape[0], -1, 16)
    gs = amax.float().reshape(()) * torch.tensor(1.0 / 2688.0, dtype=torch.float32)
    gs = torch.where(gs > 0.0, gs, torch.tensor(1e-12))

    def div(a, b):
        return a / b if ieee_division else a * reciprocal(b)

    x_abs = tile.abs()
    block_max = x_abs.amax(-1, keepdim=True)
    s = torch.fmin(div(block_max, (6.0 * gs).reshape(1)), torch.tensor(448.0))
    bq = s.to(torch.float8_e4m3fn).float() * gs
    bq = torch.where(bq >= 1e-5, bq, 1.0)
    a = div(x_abs, bq)
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    y = q * bq
    y = torch.where(tile >= 0, y, -y)
    return y.reshape(x2.shape[0], -1)[:, :n].reshape(shape).to(x.dtype), bq


def _case(dtype, shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4
    flat = x.view(-1)
    if kind == "ties":
        # multiples of 1/4 up to 6 with a per-tensor scale of exactly 1: blocks whose maximum is 6
        # get scale 1, so |x| / scale lands exactly on the E2M1 midpoints 0.25, 0.75, 1.25, ...
        flat.copy_(torch.randint(-24, 25, flat.shape, generator=g).float() * 0.25)
    x = x.to(dtype)
    if shape[-1] >= 32:
        x[..., 16:32] = 0  # an all-zero block in every row
    x.view(-1)[::13] = -0.0
    amax = x.abs().amax().float()
    if kind == "ties":
        amax = torch.tensor(6.0 * 448.0)
    elif kind == "saturate":
        amax = amax * 0.25  # block scales clamp at 448: values above 6 * scale saturate
    elif kind == "tiny-amax":
        amax = torch.tensor(1e-3)
    elif kind == "zero-amax":
        amax = torch.tensor(0.0)
    return x, amax


CASES = [
    (dt, shape, kind)
    for dt in DTYPES
    for shape in SHAPES
    for kind in ("data", "ties", "saturate")
] + [(dt, (64, 1000), kind) for dt in DTYPES for kind in ("tiny-amax", "zero-amax")]


@pytest.mark.parametrize("dtype,shape,kind", CASES, ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_cpu_matches_modelopt_cuda(dtype, shape, kind):
    x, amax = _case(dtype, shape, kind, seed=zlib.crc32(repr((dtype, shape, kind)).encode()))
    gpu = modelopt_cuda(x, amax)
    cpu = nvfp4_cpu.nvfp4_fake_quantize(x, amax)
    assert cpu.dtype == gpu.dtype == dtype and cpu.shape == gpu.shape == x.shape
    with_gpu_reciprocals, bq = kernel_transliteration(x, amax, reciprocal=gpu_reciprocal)
    ieee, _ = kernel_transliteration(x, amax, ieee_division=True)
    mismatches = int((cpu != gpu).sum())
    diff = (cpu.float() - gpu.float()).abs()
    step = 2.0 * bq.expand(-1, -1, 16).reshape(bq.shape[0], -1)[:, : x.shape[-1]].reshape(x.shape)
    print(
        f"\nNVFP4PARITY {str(dtype)[6:]:8s} {tuple(shape)!s:14s} {kind:9s} n={x.numel():9d} "
        f"mismatches={mismatches} max_abs_diff={diff.max().item():.6g} "
        f"max_diff_in_block_scales={(diff / (step / 2)).max().item():.3g} | "
        f"IEEE-division variant: {int((ieee != gpu).sum())} | with the GPU's reciprocals: "
        f"{int((with_gpu_reciprocals != gpu).sum())}"
    )
    # the kernel's arithmetic with the GPU's reciprocals is the GPU's result, bit for bit
    assert torch.equal(with_gpu_reciprocals, gpu)
    # so any CPU/GPU difference comes from the reciprocal alone: at most one E2M1 step (2 x scale)
    assert bool((diff <= step).all()), "a CPU/GPU difference exceeds one E2M1 step of its block scale"
    assert mismatches <= max(1, x.numel() // 100), f"{mismatches} mismatches of {x.numel()}"


def test_nan_and_inf_follow_the_kernel():
    x = torch.randn(8, 48)
    x[0, 3] = float("nan")
    x[1, :16] = float("nan")
    x[2, 5] = float("inf")
    x[3, 7] = float("-inf")
    amax = torch.tensor(3.0)
    gpu, cpu = modelopt_cuda(x, amax), nvfp4_cpu.nvfp4_fake_quantize(x, amax)
    print(f"\nNVFP4PARITY nan/inf: gpu={gpu[:4, :8].tolist()}\n  cpu={cpu[:4, :8].tolist()}")
    assert torch.equal(gpu.isnan(), cpu.isnan())
    assert torch.equal(gpu.nan_to_num(0.0), cpu.nan_to_num(0.0))


def test_global_scale_is_the_cuda_reciprocal_product():
    """torch on CUDA divides by a Python scalar as a product with its FP32 reciprocal."""
    amax = torch.rand(100000) * 1000
    on_cuda = (amax.cuda() / (6.0 * 448.0)).cpu()
    ours = torch.stack([nvfp4_cpu.nvfp4_global_scale(a) for a in amax[:2000]])
    assert torch.equal(ours, on_cuda[:2000])
    cpu_division = amax / (6.0 * 448.0)
    print(f"\nNVFP4PARITY global scale: CPU true division differs from CUDA on {int((cpu_division != on_cuda).sum())} of 100000")


def test_triton_fp32_division_is_a_times_the_hardware_reciprocal():
    """Triton's FP32 `/` (PTX div.full.f32) is a * rcp(b) with rcp(b) = Triton's 1 / b, not IEEE a / b."""
    g = torch.Generator().manual_seed(0)
    b_all = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)  # all of [1, 2)
    rcp = triton_div(torch.ones_like(b_all), b_all)
    rcp_ulps = (rcp.view(torch.int32) - (1.0 / b_all).view(torch.int32)).abs()
    a = torch.rand(1 << 23, generator=g) * 8
    b = torch.rand(1 << 23, generator=g) * 2 + 1e-3
    q = triton_div(a, b)
    with_gpu_rcp = a * triton_div(torch.ones_like(b), b)
    print(
        f"\nNVFP4PARITY triton fp32 '/': 1/b is not the correctly rounded reciprocal for "
        f"{int((rcp_ulps != 0).sum())} of {1 << 23} b in [1,2) (max {rcp_ulps.max().item()} ulp); "
        f"a/b differs from IEEE a/b on {int((q != a / b).sum())}, from a*(1/b) on "
        f"{int((q != a * (1.0 / b)).sum())}, from a*(GPU 1/b) on {int((q != with_gpu_rcp).sum())} of {1 << 23}"
    )
    assert rcp_ulps.max().item() <= 1
    assert torch.equal(q, with_gpu_rcp)


def test_install_leaves_cuda_to_modelopt(monkeypatch):
    """After install(), CUDA tensors still reach ModelOpt's Triton kernel and give its result."""
    nvfp4_cpu.install()
    calls = []
    original = triton_gemm.fp4_fake_quant_block

    def spy(*args, **kwargs):
        calls.append(args[0].device.type)
        return original(*args, **kwargs)

    monkeypatch.setattr(tensor_quant.triton_kernel, "fp4_fake_quant_block", spy)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    amax = x.abs().amax().float()
    via_patch = modelopt_cuda(x, amax)
    direct = torch.ops.tensorrt.dynamic_block_quantize_op(x.cuda(), 16, amax.cuda(), 4, 2, 8, 4).cpu()
    assert calls == ["cuda", "cuda"]
    assert torch.equal(via_patch, direct)
    # and the CPU route through ModelOpt's own function gives the CPU implementation's result
    on_cpu = tensor_quant.dynamic_block_quant(x, 16, amax, None, (2, 1), (4, 3), None, "dynamic", True)
    assert calls == ["cuda", "cuda"]
    assert torch.equal(on_cpu, nvfp4_cpu.nvfp4_fake_quantize(x, amax))


def test_model_quantized_on_cpu_fake_quantizes_like_cuda():
    """mtq.quantize on the CPU (after install), then the same quantizers on CUDA: same weights/activations."""
    import copy

    import modelopt.torch.quantization as mtq
    from torch import nn

    nvfp4_cpu.install()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 256, generator=g) for _ in range(4)]
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), forward_loop=lambda m: [m(b) for b in batches])
    with torch.no_grad():
        h = model[1](model[0](batches[0]))
        pairs = [(layer.weight_quantizer, layer.weight) for layer in (model[0], model[2])]
        pairs += [(model[0].input_quantizer, batches[0]), (model[2].input_quantizer, h)]
        on_cpu = [qz(t) for qz, t in pairs]
        model.cuda()
        on_cuda = [qz(t.cuda()).cpu() for qz, t in pairs]
    for i, (c, d) in enumerate(zip(on_cpu, on_cuda)):
        n = int((c != d).sum())
        print(f"\nNVFP4PARITY mtq quantizer {i}: {n} of {c.numel()} differ, max {(c - d).abs().max().item():.4g}")
        assert n <= c.numel() // 100


# --- the static blockwise path (the NVFP4 weight algorithms: four-over-six, MSE sweep, local Hessian, GPTQ)

STATIC_SHAPES = ((4096, 4096), (1, 16), (3, 4, 48), (64, 1024), (257, 32))


def modelopt_cuda_static(x, amax, global_amax, fp8_max):
    out = tensor_quant.static_blockwise_fp4_fake_quant(x.cuda(), amax.cuda(), global_amax.cuda(), True, fp8_max,
                                                        x.dtype, False)
    torch.cuda.synchronize()
    return out.cpu()


def static_transliteration(x, amax, global_amax, fp8_max, reciprocal=torch.reciprocal):
    """static_blockwise_fp4_fake_quant_kernel line by line on the CPU, block scales from quantkit."""
    scale = nvfp4_cpu.nvfp4_static_block_scales(amax, global_amax, True, fp8_max).reshape(-1, 1)
    xs = x.reshape(scale.shape[0], -1).float()
    safe = torch.where((scale == 0) | scale.isnan() | scale.isinf(), 1.0, scale)
    a = xs.abs() * reciprocal(safe)
    q = torch.where(a <= 0.25, 0.0, torch.where(a < 0.75, 0.5, torch.where(a <= 1.25, 1.0, torch.where(
        a < 1.75, 1.5, torch.where(a <= 2.5, 2.0, torch.where(a < 3.5, 3.0, torch.where(a <= 5.0, 4.0, 6.0)))))))
    y = torch.where(xs >= 0, q * safe, -(q * safe))
    return torch.where(scale == 0, 0.0, y).reshape(x.shape).to(x.dtype), safe


@pytest.mark.parametrize("fp8_max", (448.0, 256.0), ids=("mse-sweep", "four-over-six"))
@pytest.mark.parametrize("dtype,shape,kind", [(dt, s, k) for dt in DTYPES for s in STATIC_SHAPES
                                              for k in ("data", "ties", "calibrated")],
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_static_cpu_matches_modelopt_cuda(dtype, shape, kind, fp8_max):
    x, _ = _case(dtype, shape, "ties" if kind == "ties" else "data", seed=zlib.crc32(repr((dtype, shape, kind)).encode()))
    blocks = x.float().reshape(-1, 16)
    amax = blocks.abs().amax(-1)
    if kind == "calibrated":  # an MSE search moves block amax below the block maximum
        amax = amax * (0.5 + torch.rand(amax.shape, generator=torch.Generator().manual_seed(3)))
    global_amax = amax.max()
    gpu = modelopt_cuda_static(x, amax, global_amax, fp8_max)
    gpu_scales = tensor_quant.triton_kernel.compute_fp4_scales(amax.cuda(), global_amax.cuda(), True, fp8_max).cpu()
    cpu_scales = nvfp4_cpu.nvfp4_static_block_scales(amax, global_amax, True, fp8_max)
    cpu = nvfp4_cpu.nvfp4_static_fake_quantize(x, amax, global_amax, True, fp8_max, dtype)
    with_gpu_rcp, safe = static_transliteration(x, amax, global_amax, fp8_max, reciprocal=gpu_reciprocal)
    mismatches = int((cpu != gpu).sum())
    diff = (cpu.float() - gpu.float()).abs().reshape(-1, 16)
    print(f"\nNVFP4PARITY static fp8_max={fp8_max:g} {str(dtype)[6:]:8s} {tuple(shape)!s:14s} {kind:10s} "
          f"n={x.numel():9d} scale mismatches={int((cpu_scales != gpu_scales).sum())} mismatches={mismatches} "
          f"| with the GPU's reciprocals: {int((with_gpu_rcp != gpu).sum())}")
    assert torch.equal(cpu_scales, gpu_scales), "block scales: quantkit's CPU arithmetic vs compute_fp4_scales on CUDA"
    assert torch.equal(with_gpu_rcp, gpu)
    assert bool((diff <= 2 * safe + 0).all())
    assert mismatches <= max(1, x.numel() // 100)
