"""NVFP4 fake quantization in plain PyTorch, and the patch that lets ModelOpt 0.47 use it on CPU.

ModelOpt's NVFP4 paths only run on CUDA: the dynamic one (Triton `fp4_fake_quant_block`) asserts
"amax must be a CUDA tensor" on CPU, the static blockwise one that the NVFP4 weight algorithms use
(four-over-six, MSE / FP8 scale sweep, local Hessian, GPTQ) says "static_blockwise_fp4_fake_quant
requires triton". `nvfp4_fake_quantize` and `nvfp4_static_fake_quantize` reproduce those kernels'
arithmetic step by step; `install()` routes CPU tensors to them, CUDA tensors keep ModelOpt's path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from quantkit.errors import QuantkitError

#: The ModelOpt release whose kernel this module reproduces and whose internals `install()` patches;
#: `install()` accepts the releases quantkit.compat.SUPPORTED names (the pin, 0.47.*).
MODELOPT_VERSION_CHECKED = "0.47.0"

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# The kernel's per-tensor scale is `global_amax.float() / (6.0 * 448.0)` evaluated by PyTorch on
# CUDA, which divides by a Python scalar as a multiplication with the scalar's FP32 reciprocal
# (taken in double, then rounded). Plain division on CPU can differ in the last bit.
_INV_E2M1_E4M3 = float(torch.tensor(1.0 / (E2M1_MAX * E4M3_MAX), dtype=torch.float32))

# The kernel's two FP32 divisions (block amax / (6 * global scale), |x| / block scale) compile to
# PTX div.full.f32, which on an H100 is exactly a * (Triton's 1 / b), the hardware reciprocal, and
# not IEEE a / b. We compute a * (correctly rounded 1 / b). The hardware reciprocal is one ulp off
# that for 13% of mantissas, so where a / b lies within an ulp of an E2M1 rounding boundary an
# element can land one E2M1 step away from the GPU's: 168 of 154M elements in the parity tests
# (IEEE division: 8284); with the GPU's reciprocals plugged in, the same arithmetic is bit-exact.
_GLOBAL_SCALE_FLOOR = 1e-12  # the kernel's stand-in for a zero per-tensor scale
_BLOCK_SCALE_FLOOR = 1e-5  # block scales below this become 1.0 (zero and tiny blocks)

_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CHUNK_ELEMENTS = 1 << 18  # work in cache-sized slices: several times faster than whole-tensor passes


def _e2m1_round_(a: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Round finite non-negative FP32 `a` in place to E2M1 magnitudes; `work` is scratch of a's shape.

    (a + C) - C rounds a to a multiple of ulp(C) with the FPU's round-half-even. C = 2^22, 2^23,
    2^24 gives steps 0.5, 1, 2: E2M1's spacing on [0, 2), [2, 4), [4, 6]. Clamping at 6 first
    makes it saturate. Ties land where the kernel's comparison chain puts them (<= 0.25, < 0.75,
    <= 1.25, < 1.75, <= 2.5, < 3.5, <= 5.0): 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    """
    a.clamp_max_(E2M1_MAX)
    # C's exponent is (the exponent of clamp(a, 1, 4)) + 22, its mantissa zero.
    torch.clamp(a, 1.0, 4.0, out=work)
    bits = work.view(torch.int32)
    bits.bitwise_and_(0x7F800000).add_(22 << 23)
    return a.add_(work).sub_(work)


def e2m1_round(magnitude: torch.Tensor) -> torch.Tensor:
    """Round non-negative values to the nearest E2M1 magnitude {0, .5, 1, 1.5, 2, 3, 4, 6} (FP32).

    Round-half-even, saturating at 6 (infinity too), as ModelOpt's kernel; NaN gives 6 as there.
    """
    a = magnitude.detach().to(torch.float32, copy=True).nan_to_num_(nan=E2M1_MAX, posinf=E2M1_MAX)
    return _e2m1_round_(a, torch.empty_like(a))


def nvfp4_global_scale(global_amax: torch.Tensor | float) -> torch.Tensor:
    """The second-level (per-tensor) FP32 scale, `global_amax / (6 * 448)` as ModelOpt computes it."""
    amax = torch.as_tensor(global_amax, dtype=torch.float32)
    if amax.numel() != 1:
        amax = amax.amax()
    return amax.reshape(()).to(torch.float32) * _INV_E2M1_E4M3


def nvfp4_block_scales(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Per-block scales: `block_amax / 6` stored in FP8 E4M3 relative to `global_scale`, in FP32.

    A non-positive global scale is replaced by 1e-12 and a block scale below 1e-5 (all-zero and
    tiny blocks) by 1.0, as in ModelOpt's kernel.
    """
    gs = global_scale.to(torch.float32)
    gs = torch.where(gs > 0.0, gs, torch.full_like(gs, _GLOBAL_SCALE_FLOOR))
    # fmin, not clamp: like the kernel's tl.minimum (PTX min.f32) it maps NaN to 448.
    in_fp8_range = torch.fmin(block_amax * torch.reciprocal(gs * E2M1_MAX), torch.tensor(E4M3_MAX, device=gs.device))
    scale = in_fp8_range.to(torch.float8_e4m3fn).to(torch.float32) * gs
    return torch.where(scale >= _BLOCK_SCALE_FLOOR, scale, torch.ones_like(scale))


def nvfp4_fake_quantize(
    x: torch.Tensor,
    global_amax: torch.Tensor | float | None = None,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """NVFP4 quantize-dequantize `x` as ModelOpt 0.47's `fp4_fake_quant_block` does on a GPU.

    Blocks of `block_size` (16) consecutive elements along the last axis, per row; a last block
    shorter than that is quantized on its own elements (as if zero-padded). Each block's scale is
    its absolute maximum / 6, rounded to FP8 E4M3 relative to the per-tensor scale
    `global_amax / (6 * 448)`; elements are rounded to E2M1 and scaled back. `global_amax`
    defaults to `x.abs().max()` (a non-scalar one is reduced to its maximum, as ModelOpt does).
    Arithmetic is FP32; the result has `x`'s shape, dtype and device.

    Bit-identical to the GPU kernel except for rare elements on an E2M1 rounding boundary, which
    may come out one E2M1 step apart (the GPU divides with an approximate reciprocal; see above).
    """
    if not x.is_floating_point():
        raise TypeError(f"nvfp4_fake_quantize needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("nvfp4_fake_quantize needs at least one dimension (blocks run along the last)")
    if x.numel() == 0:
        return x.clone()
    if global_amax is None:
        global_amax = x.detach().abs().amax()
    global_scale = nvfp4_global_scale(global_amax).to(x.device)
    finite_global_scale = bool(torch.isfinite(global_scale))

    shape, n = x.shape, x.shape[-1]
    x2d = x.detach().reshape(-1, n)
    rows_total = x2d.shape[0]
    n_pad = -(-n // block_size) * block_size
    n_blocks = n_pad // block_size
    direct = x.dtype == torch.float32 and n_pad == n  # write straight into the result
    out = torch.empty((rows_total, n), dtype=x.dtype, device=x.device)

    rows = max(1, min(rows_total, _CHUNK_ELEMENTS // n_pad))
    xs_buf = torch.zeros((rows, n_pad), dtype=torch.float32, device=x.device)  # pad columns stay 0
    mag_buf = torch.empty((rows, n_blocks, block_size), dtype=torch.float32, device=x.device)
    work_buf = torch.empty_like(mag_buf)
    res_buf = None if direct else torch.empty_like(mag_buf)
    with torch.no_grad():
        for r0 in range(0, rows_total, rows):
            r1 = min(r0 + rows, rows_total)
            m = r1 - r0
            xs = xs_buf[:m]
            # + 0.0 turns -0.0 into +0.0, so copysign below gives the kernel's sign (x >= 0 -> +).
            if direct:
                torch.add(x2d[r0:r1], 0.0, out=xs)
            else:
                xs[:, :n].copy_(x2d[r0:r1])
                xs.add_(0.0)
            blocks = xs.view(m, n_blocks, block_size)
            a = torch.abs(blocks, out=mag_buf[:m])
            # max_pool1d is the fastest block max on CPU (3x amax(-1) over a last dim of 16).
            block_amax = F.max_pool1d(a.view(1, 1, -1), block_size).view(m, n_blocks, 1)
            has_nan = bool(block_amax.isnan().any())
            if has_nan:
                # The kernel's max reduction (PTX max.f32) skips NaN unless the whole block is NaN.
                nan = a.isnan()
                block_amax = torch.where(nan, 0.0, a).amax(dim=-1, keepdim=True)
                block_amax = torch.where(nan.all(dim=-1, keepdim=True), float("nan"), block_amax)
            scale = nvfp4_block_scales(block_amax, global_scale)
            a.mul_(torch.reciprocal(scale))  # the kernel's |x| / scale, as div.full.f32 computes it
            if has_nan or not finite_global_scale:
                a.nan_to_num_(nan=E2M1_MAX)  # NaN (also inf/inf) rounds to 6 in the kernel's chain
            _e2m1_round_(a, work_buf[:m]).mul_(scale)
            res = out[r0:r1].view(m, n_blocks, block_size) if direct else res_buf[:m]
            torch.copysign(a, blocks, out=res)
            if has_nan:
                res.copy_(torch.where(blocks.isnan(), -E2M1_MAX * scale, res))  # NaN >= 0 is false
            if not direct:
                out[r0:r1].copy_(res.view(m, n_pad)[:, :n])
    return out.reshape(shape)


# The static kernel's `amax / 6.0` runs in PyTorch on the device: on CUDA a product with the FP32
# reciprocal of 6 (see _INV_E2M1_E4M3), which CPU division can miss by one ulp.
_INV_E2M1 = float(torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32))
_FP8_AMAX_FLOOR = 1.0 / (1 << 24)  # fake_e4m3fy's epsilon: an amax at or below it counts as 1


def _fake_e4m3fy(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 fake quantization of FP32 `x` against one scalar `amax`, as ModelOpt's CUDA extension.

    `fake_e4m3fy` (modelopt_cuda_ext_fp8, which `scaled_e4m3_impl` calls for CUDA tensors) takes
    `scale = 448.f / amax` and `inv_scale = 1.f / scale` as ATen tensor divisions (correctly rounded),
    then `float(fp8(x * scale)) * inv_scale` with a saturating cast. ModelOpt's eager fallback
    (`fp8_eager`, its CPU path) computes `448.0 / amax` as `amax.reciprocal() * 448`, two roundings:
    where that lands one ulp off, so does inv_scale, and then every block scale of the tensor can
    differ in its last bit (226 of 514 block scales in one parity case).
    """
    amax = amax.reshape(-1).to(torch.float32)
    safe = torch.where(amax <= _FP8_AMAX_FLOOR, torch.ones_like(amax), amax)
    scale = torch.full_like(safe, E4M3_MAX).div_(safe)
    inv_scale = torch.ones_like(scale).div_(scale)
    # clamp then cast = the CUDA cast's __NV_SATFINITE (NaN stays NaN in both)
    return (x * scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * inv_scale


def nvfp4_static_block_scales(amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                              quantize_block_scales: bool = True,
                              fp8_max_for_normalization: float = E4M3_MAX) -> torch.Tensor:
    """Per-block scales of ModelOpt's static NVFP4 path (`compute_fp4_scales` on CUDA), in FP32.

    `amax / 6`, rounded to FP8 E4M3 against `global_amax * (448 / fp8_max) / 6` (fp8_max 448, or
    256 for four-over-six) as the CUDA extension's `fake_e4m3fy` rounds (see `_fake_e4m3fy`).
    """
    amax = amax.float()
    scale = amax * _INV_E2M1
    if quantize_block_scales:
        if global_amax is None:
            global_amax = amax.abs().amax()
        fp8_amax = global_amax.float() * float(torch.tensor(E4M3_MAX / fp8_max_for_normalization,
                                                            dtype=torch.float32)) * _INV_E2M1
        scale = _fake_e4m3fy(scale, fp8_amax.to(scale.device))
    return scale


def nvfp4_static_fake_quantize(
    x: torch.Tensor,
    amax: torch.Tensor,
    global_amax: torch.Tensor | None = None,
    quantize_block_scales: bool = True,
    fp8_max_for_normalization: float = E4M3_MAX,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Static blockwise NVFP4 quantize-dequantize as ModelOpt 0.47's `static_blockwise_fp4_fake_quant`.

    `amax` holds one calibrated absolute maximum per block (its size sets the block length:
    `x.numel() // amax.numel()` consecutive elements, as the kernel reads them); scales come from
    `nvfp4_static_block_scales`. Each element is |x| / scale rounded to E2M1 (ties as the kernel's
    comparison chain), times the scale, with x's sign (x >= 0 is +, so NaN comes out -6 * scale);
    a zero scale gives 0, a NaN/inf scale is replaced by 1. The division is a product with the
    correctly rounded reciprocal, as in `nvfp4_fake_quantize` (the GPU's differs by an ulp at times).
    """
    if not x.is_floating_point():
        raise TypeError(f"nvfp4_static_fake_quantize needs a floating-point tensor, got {x.dtype}")
    n_blocks = amax.numel()
    if n_blocks == 0 or x.numel() % n_blocks:
        raise ValueError(f"x.numel() ({x.numel()}) is not a multiple of amax.numel() ({n_blocks})")
    out_dtype = out_dtype or x.dtype
    scale = nvfp4_static_block_scales(amax.to(x.device), None if global_amax is None else global_amax.to(x.device),
                                      quantize_block_scales, fp8_max_for_normalization).reshape(n_blocks, 1)
    with torch.no_grad():
        xs = x.detach().reshape(n_blocks, -1).to(torch.float32)
        zero = scale == 0.0
        safe = torch.where(zero | scale.isnan() | scale.isinf(), torch.ones_like(scale), scale)
        a = xs.abs().mul_(torch.reciprocal(safe)).nan_to_num_(nan=E2M1_MAX)  # NaN falls through to 6
        y = _e2m1_round_(a, torch.empty_like(a)).mul_(safe)
        y = torch.where(xs >= 0, y, -y)
        y = torch.where(zero, torch.zeros_like(y), y)
    return y.reshape(x.shape).to(out_dtype)


# --- ModelOpt integration ------------------------------------------------------------------------
#
# ModelOpt 0.47 fake-quantizes dynamic block formats through
# DynamicBlockQuantizationFunction.forward -> tensor_quant._dynamic_block_quantize_forward, which
# calls the module global `tensor_quant.dynamic_block_quantize_op` (the torch.library op
# tensorrt::dynamic_block_quantize_op, whose CPU and CUDA kernel is _dynamic_block_quantize_impl).
# That global is the only thing replaced: the library op, its registrations and every other
# caller stay untouched, and only NVFP4 (E2M1 data, E4M3 scales) on CPU takes the new route.

_MARK = "__quantkit_nvfp4_cpu__"


def _modelopt_version() -> str:
    try:
        import modelopt
    except ImportError as e:  # pragma: no cover - modelopt is a hard dependency
        raise QuantkitError(f"NVFP4 on CPU needs nvidia-modelopt {MODELOPT_VERSION_CHECKED}: {e}") from e
    return str(getattr(modelopt, "__version__", "unknown"))


def _tensor_quant_module():
    from quantkit.compat.modelopt import tensor_quant_module

    return tensor_quant_module()


def _is_nvfp4(num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) -> bool:
    # The op's integer encoding of (2, 1) data bits and (4, 3) scale bits.
    return (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)


@contextlib.contextmanager
def _untraced():
    """Run without the TorchScript tracer that ModelOpt's ONNX export uses.

    The op runs inside DynamicBlockQuantizationFunction, whose ONNX `symbolic` replaces whatever
    forward computed, so the tracer never needs these ops; recording them breaks the export
    (the traced autograd function's subgraph fails alias analysis: "INTERNAL ASSERT FAILED ...
    We don't have an op for aten::view" for the int32 view, "unordered_map::at" for bucketize).
    """
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _make_cpu_route(original):
    def dynamic_block_quantize_op(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    ):
        if (
            inputs.device.type == "cpu"
            and amax is not None
            and _is_nvfp4(num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
            and not torch.compiler.is_compiling()  # torch.export / dynamo keep the library op
        ):
            if block_size != BLOCK_SIZE:
                # ModelOpt's GPU kernel ignores the configured block size and always uses 16;
                # rather than pick one of two different answers, refuse.
                raise QuantkitError(
                    f"NVFP4 with block size {block_size} on CPU: ModelOpt {MODELOPT_VERSION_CHECKED}'s "
                    f"GPU kernel always uses blocks of {BLOCK_SIZE}; use block size {BLOCK_SIZE}"
                )
            with _untraced():
                return nvfp4_fake_quantize(inputs, amax, BLOCK_SIZE)
        return original(
            inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
        )

    setattr(dynamic_block_quantize_op, _MARK, True)
    dynamic_block_quantize_op.__wrapped__ = original
    return dynamic_block_quantize_op


def _quantizer_module():
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    return tensor_quantizer


def _make_static_cpu_route(original):
    # StaticBlockScaleQuantizer._fake_quantize calls the module global
    # tensor_quantizer.static_blockwise_fp4_fake_quant(x, amax, global_amax, quantize_block_scales,
    # fp8_max_for_normalization, out_dtype, pass_through_bwd); only that name is replaced.
    def static_blockwise_fp4_fake_quant(x, amax, global_amax=None, quantize_block_scales=True,
                                        fp8_max_for_normalization=E4M3_MAX, out_dtype=None,
                                        pass_through_bwd=False):
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            with _untraced():
                return nvfp4_static_fake_quantize(x, amax, global_amax, quantize_block_scales,
                                                  fp8_max_for_normalization, out_dtype)
        return original(x, amax, global_amax, quantize_block_scales, fp8_max_for_normalization, out_dtype,
                        pass_through_bwd)

    setattr(static_blockwise_fp4_fake_quant, _MARK, True)
    static_blockwise_fp4_fake_quant.__wrapped__ = original
    return static_blockwise_fp4_fake_quant


def is_installed() -> bool:
    """Whether `install()` has routed ModelOpt's CPU NVFP4 fake quantization (dynamic and static) here."""
    try:
        tq, qm = _tensor_quant_module(), _quantizer_module()
    except ImportError:
        return False
    return (getattr(getattr(tq, "dynamic_block_quantize_op", None), _MARK, False)
            and getattr(getattr(qm, "static_blockwise_fp4_fake_quant", None), _MARK, False))


def install(changes=None) -> None:
    """Make ModelOpt's NVFP4 fake quantization (and so mtq.quantize and ONNX export) run on CPU.

    Idempotent. Replaces `modelopt.torch.quantization.tensor_quant.dynamic_block_quantize_op`
    by a function that sends CPU tensors in NVFP4 format to `nvfp4_fake_quantize`, and
    `...nn.modules.tensor_quantizer.static_blockwise_fp4_fake_quant` by one that sends CPU tensors
    to `nvfp4_static_fake_quantize`; everything else (CUDA tensors, other formats) goes to
    ModelOpt's own code unchanged. Checked against ModelOpt 0.47.0 and supported for the pin's releases
    (0.47.*): any other version raises QuantkitError instead of patching. With `changes` (a
    quantkit.patches.Patches) the routes are held by that model and taken out when the last model
    holding them is released; without, they stay until `uninstall()`.
    """
    from quantkit.compat import SUPPORTED, supports

    version = _modelopt_version()
    if not supports("nvidia-modelopt", version):
        raise QuantkitError(
            f"NVFP4 on CPU is checked against nvidia-modelopt {MODELOPT_VERSION_CHECKED} (quantkit supports "
            f"{SUPPORTED['nvidia-modelopt']}), found {version}: its internal dynamic_block_quantize_op may differ; "
            "re-check quantkit/nvfp4_cpu.py against this version (and tests/gpu/test_nvfp4_parity.py on a GPU) "
            "before widening the pin, or run NVFP4 on a CUDA device"
        )
    if changes is not None:
        def apply():
            was = is_installed()
            install()
            return (lambda: None) if was else uninstall
        changes.hold(("nvfp4-cpu-route",), apply)
        return
    tq, qm = _tensor_quant_module(), _quantizer_module()
    current = getattr(tq, "dynamic_block_quantize_op", None)
    static = getattr(qm, "static_blockwise_fp4_fake_quant", None)
    if current is None or not callable(static):
        raise QuantkitError(
            f"nvidia-modelopt {version} has no tensor_quant.dynamic_block_quantize_op / "
            "_dynamic_block_quantize_forward / tensor_quantizer.static_blockwise_fp4_fake_quant: the installed "
            "package is not the one quantkit/nvfp4_cpu.py was checked against"
        )
    if not getattr(current, _MARK, False):
        tq.dynamic_block_quantize_op = _make_cpu_route(current)
    if not getattr(static, _MARK, False):
        qm.static_blockwise_fp4_fake_quant = _make_static_cpu_route(static)


def uninstall() -> None:
    """Undo `install()` (for tests); a no-op when it was not installed."""
    tq, qm = _tensor_quant_module(), _quantizer_module()
    current = getattr(tq, "dynamic_block_quantize_op", None)
    if getattr(current, _MARK, False):
        tq.dynamic_block_quantize_op = current.__wrapped__
    static = getattr(qm, "static_blockwise_fp4_fake_quant", None)
    if getattr(static, _MARK, False):
        qm.static_blockwise_fp4_fake_quant = static.__wrapped__
