"""Real FP8 execution in PyTorch: ModelOpt's FP8 fake-quant linears become FP8 GEMMs (torch._scaled_mm).

`convert_to_fp8(model)` replaces each per-tensor FP8 QuantLinear (weights and inputs E4M3, calibrated
static amax) by an `FP8Linear` that holds the weight once in float8_e4m3fn and quantizes its input with
the calibrated scale; `TorchFP8Runner` runs such a model behind the Runner interface, compiled by
default so that the input scaling fuses into the ops before it (in eager mode it costs more than the
FP8 GEMM saves). The runtime for Hopper/Ada GPUs where TensorRT is absent; ModelOpt is imported lazily.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from quantkit.errors import InputError
from quantkit.model_structure import repeated_blocks
from quantkit.runtime.fp8_format import (FP8_DTYPE, FP8_MAX, fp8_per_tensor_reason, quantize_e4m3,  # noqa: F401
                                         quantizer_amax, safe_amax)

_GEMM_ALIGN = 16  # torch._scaled_mm: K and N must be multiples of 16 (ScaledBlas.cpp)
_SCALED_MM_OUT = (torch.bfloat16, torch.float16)  # output dtypes _scaled_mm can add a bias in
FP8_MIN_CAPABILITY = (8, 9)  # Ada (SM89) and Hopper (SM90) and later have FP8 tensor cores


def _cpu_scaled_mm_runs(rowwise: bool = False) -> bool:
    """Whether this torch build's CPU _scaled_mm runs per-tensor scales (FP32 out) or row-wise ones (BF16 out)."""
    try:
        a = torch.zeros(16, 16, dtype=FP8_DTYPE)
        if rowwise:
            torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        else:
            one = torch.ones((), dtype=torch.float32)
            torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False


# Decided once at import, outside any compiled region: what this torch build's CPU _scaled_mm runs.
CPU_SCALED_MM = _cpu_scaled_mm_runs()
CPU_SCALED_MM_ROWWISE = CPU_SCALED_MM and _cpu_scaled_mm_runs(rowwise=True)


def _rowwise_native(device: torch.device) -> bool:
    """Whether _scaled_mm's row-wise scales (BF16 out) run on `device`: Hopper and later on CUDA (the
    SM90 kernel; Ada has none), and a CPU build that accepts them (probed at import)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return CPU_SCALED_MM_ROWWISE


def fp8_matmul_reference(x_fp8: torch.Tensor, w_fp8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What torch._scaled_mm computes, written out: (x_fp8·scale_a) @ (w_fp8·scale_b)ᵀ + bias in FP32.

    scale_a is a scalar or (M, 1), scale_b a scalar or one scale per output row of w_fp8 ((N,) or (1, N))."""
    w_scale = scale_b.reshape(-1, 1) if scale_b.numel() > 1 else scale_b
    out = (x_fp8.float() * scale_a) @ (w_fp8.float() * w_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class FP8Linear(nn.Module):
    """y = x Wᵀ + b with W stored once in float8_e4m3fn and x quantized to FP8 with a static scale.

    weight: (out, in) float8_e4m3fn, row-major, so `weight.t()` is the column-major operand that
    torch._scaled_mm needs on Hopper; weight_scale = amax_w / 448 and input_scale = amax_x / 448
    (FP32, from ModelOpt's calibration). weight_scale is one scalar, or one scale per output row when
    the layer is several linears joined (`concat`: q/k/v in one GEMM, each keeping its own weight
    scale), which runs _scaled_mm's row-wise mode. Outputs come back in the input's dtype. Moving the
    module (`.to(device)`) works; casts (`.to(dtype)`, `.half()`) leave its tensors' dtypes alone.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, use_fast_accum: bool = True,
                 input_inv_scale: torch.Tensor | None = None):
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
            raise ValueError(f"FP8Linear needs a 2-D {FP8_DTYPE} weight, got {weight_fp8.dtype} {tuple(weight_fp8.shape)}")
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight", weight_fp8.contiguous())
        weight_scale = weight_scale.detach().float()
        if weight_scale.numel() not in (1, self.out_features):
            raise ValueError(f"FP8Linear: {weight_scale.numel()} weight scales for {self.out_features} output rows")
        self.register_buffer("weight_scale", weight_scale.reshape(() if weight_scale.numel() == 1 else (-1,)).clone())
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        inv = 1.0 / self.input_scale if input_inv_scale is None else input_inv_scale.detach().float().reshape(())
        self.register_buffer("input_inv_scale", inv.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # Fast accumulation (the FP8 tensor cores' own accumulator, as torchao's inference default):
        # faster, and within the FP8 quantization error at the K of transformer layers.
        self.use_fast_accum = use_fast_accum
        self.rowwise_native = False  # set by concat: whether _scaled_mm's row-wise mode runs here

    @classmethod
    def from_amax(cls, weight: torch.Tensor, weight_amax: torch.Tensor, input_amax: torch.Tensor,
                  bias: torch.Tensor | None = None, use_fast_accum: bool = True) -> "FP8Linear":
        """Quantize a (out, in) weight with its calibrated amax, exactly as ModelOpt's FP8 fake quant does."""
        w_amax, x_amax = safe_amax(weight_amax), safe_amax(input_amax)
        weight_fp8 = quantize_e4m3(weight.detach(), (FP8_MAX / w_amax).to(weight.device))
        # 448 / amax, not 1 / (amax / 448): the multiplier ModelOpt's fake quant uses, to the last bit.
        return cls(weight_fp8, w_amax / FP8_MAX, x_amax / FP8_MAX, bias, use_fast_accum,
                   input_inv_scale=FP8_MAX / x_amax)

    @classmethod
    def concat(cls, layers: list["FP8Linear"]) -> "FP8Linear | None":
        """One FP8Linear computing all of `layers` (outputs concatenated), or None when they cannot share
        one GEMM: it quantizes its input once, so their input scales must be equal (ModelOpt's max
        calibration gives equal amax to quantizers that see one tensor); each keeps its weight scale."""
        first = layers[0]
        if any(not isinstance(m, FP8Linear) for m in layers):
            return None
        if any(m.in_features != first.in_features or not torch.equal(m.input_scale, first.input_scale)
               or m.weight.device != first.weight.device or m.use_fast_accum != first.use_fast_accum
               or (m.bias is None) != (first.bias is None)
               or (m.bias is not None and m.bias.dtype != first.bias.dtype) for m in layers):
            return None
        scales = torch.cat([m.weight_scale.expand(m.out_features) for m in layers])
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        joined = cls(torch.cat([m.weight for m in layers]), scales, first.input_scale, bias, first.use_fast_accum,
                     input_inv_scale=first.input_inv_scale)
        joined.rowwise_native = _rowwise_native(first.weight.device)
        return joined

    def _apply(self, fn, recurse=True):
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_fp8 = self.quantize_input(x.reshape(-1, self.in_features))
        return self.matmul_fp8(x_fp8, x.dtype).reshape(*lead, self.out_features)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in float8_e4m3fn with this layer's calibrated input scale (saturated, as ModelOpt's fake quant)."""
        return quantize_e4m3(x, self.input_inv_scale)

    def matmul_fp8(self, x_fp8: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer on an input already quantized with its input scale: (M, in) float8 -> (M, out)."""
        bias, scale_a, scale_b = self.bias, self.input_scale, self.weight_scale
        if scale_b.dim() == 0:
            return self._gemm(x_fp8, scale_a, scale_b, bias, out_dtype)
        if self.rowwise_native and out_dtype == torch.bfloat16 and bias is None:
            # _scaled_mm's row-wise mode: one FP32 scale per row of x, one per column of the output
            return self._gemm(x_fp8, scale_a.expand(x_fp8.shape[0], 1).contiguous(), scale_b.reshape(1, -1), None,
                              out_dtype)
        # Row-wise mode gives BF16 only (and needs Hopper+ on CUDA), and a bias added after its BF16
        # rounding would round twice: one per-tensor FP8 GEMM into FP32, each output column times
        # its weight scale, the bias, one rounding.
        one = torch.ones((), dtype=torch.float32, device=x_fp8.device)
        out = self._gemm(x_fp8, scale_a, one, None, torch.float32) * scale_b
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)

    def _gemm(self, x_fp8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
        """torch._scaled_mm where this build runs it (the bias fused where the output dtype allows),
        else the same arithmetic written out."""
        if not (x_fp8.is_cuda or CPU_SCALED_MM):
            return fp8_matmul_reference(x_fp8, self.weight, scale_a, scale_b, bias, out_dtype)
        fused_bias = bias is not None and out_dtype in _SCALED_MM_OUT
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a, scale_b,
                               bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype,
                               use_fast_accum=self.use_fast_accum and x_fp8.is_cuda)
        if bias is not None and not fused_bias:
            out = out + bias.to(out_dtype)
        return out

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_scale={self._scale_repr()}, input_scale={self.input_scale.item():.3e}")

    def _scale_repr(self) -> str:
        w = self.weight_scale
        return f"{w.item():.3e}" if w.dim() == 0 else f"{w.numel()} row scales {w.min().item():.3e}..{w.max().item():.3e}"


# ---------------------------------------------------------------------------------------------
# Conversion of a ModelOpt-quantized model


def fp8_conversion_reason(module: nn.Module) -> str | None:
    """Why `module` cannot become an FP8Linear (None when it can)."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not a Linear layer"
    if getattr(module, "weight_quantizer", None) is None and getattr(module, "input_quantizer", None) is None:
        return "not quantized (no ModelOpt quantizers)"
    for role in ("weight", "input"):
        reason = fp8_per_tensor_reason(getattr(module, f"{role}_quantizer", None), role)
        if reason:
            return reason
    out_q = getattr(module, "output_quantizer", None)
    if out_q is not None and getattr(out_q, "is_enabled", False):
        return "output quantizer enabled"
    if module.in_features % _GEMM_ALIGN or module.out_features % _GEMM_ALIGN:
        return (f"shape {module.out_features}x{module.in_features}: torch._scaled_mm needs in and out features "
                f"divisible by {_GEMM_ALIGN}")
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks that an FP8Linear would drop"
    return None


def fp8_conversion_plan(model: nn.Module) -> list[tuple[str, str | None]]:
    """(name, reason it stays as it is, or None if it converts) for every ModelOpt-quantized Linear."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module, "weight_quantizer"):
            rows.append((name, fp8_conversion_reason(module)))
    return rows


@torch.no_grad()
def convert_to_fp8(model: nn.Module, use_fast_accum: bool = True) -> int:
    """Replace every static per-tensor FP8 QuantLinear of `model` by an FP8Linear, in place.

    Returns how many were replaced. Linears quantized otherwise (INT8, NVFP4, per-channel,
    SmoothQuant) or not at all are left as they are: `fp8_conversion_plan` says why for each."""
    count = 0
    for name, reason in fp8_conversion_plan(model):
        if reason is not None or not name:
            continue
        module = model.get_submodule(name)
        new = FP8Linear.from_amax(module.weight, quantizer_amax(module.weight_quantizer),
                                  quantizer_amax(module.input_quantizer), module.bias, use_fast_accum=use_fast_accum)
        model.set_submodule(name, new.to(module.weight.device))
        count += 1
    return count


def fp8_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's parameters and buffers take now: FP8Linears and everything else."""
    fp8 = sum(m.weight_bytes() for m in model.modules() if isinstance(m, FP8Linear))
    inside = {id(t) for m in model.modules() if isinstance(m, FP8Linear) for t in m.buffers()}
    rest = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if id(t) not in inside)
    return {"fp8_linear_bytes": fp8, "other_bytes": rest, "total_bytes": fp8 + rest}


# ---------------------------------------------------------------------------------------------
# Compilation, shared by the runner and by BF16 baselines so that both are compiled the same way


def compile_model(model: nn.Module, regional: bool = True, **compile_kwargs: Any) -> nn.Module:
    """torch.compile the model: each repeated block in place (one graph reused for all layers, fast to
    compile) when `regional` and the model has them, else the whole model. Returns what to call.

    A transformers model's KV cache is switched off (config.use_cache): runners run single forwards,
    and a cache whose per-layer state the graphs guard on would recompile every layer."""
    compile_kwargs.setdefault("dynamic", False)
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False
    blocks = repeated_blocks(model) if regional else []
    if blocks:
        for block in blocks:
            block.compile(**compile_kwargs)
        return model
    return torch.compile(model, **compile_kwargs)


def _majority_float_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


# ---------------------------------------------------------------------------------------------
# Runner


class TorchFP8Runner:
    """A ModelOpt FP8-quantized model run with real FP8 GEMMs in PyTorch: named inputs -> named CPU outputs.

    `loaded.model` is converted in place (see convert_to_fp8) and moved to `device` (default: the GPU).
    With fuse (default), the first batch is also a probe: FP8 linears that read one tensor (q/k/v,
    gate/up) are joined into one GEMM each (quantkit/runtime/fusion.py), and with fuse_mlp (default)
    each gated MLP then runs act(gate) · up and its FP8 quantization in one kernel
    (quantkit/runtime/gated_mlp.py) - on Hopper, with gemm_epilogue (default), in the gate/up GEMM's
    epilogue (from gated_mlp.GEMM_EPILOGUE_MIN_ROWS tokens). With compile (default) the repeated blocks are then
    torch.compile'd, which fuses each layer's input quantization into the op before it. Attention
    whose Q, K, V and P the recipe quantized to FP8 runs in an FP8 flash-attention kernel on CUDA with
    fp8_attention (default; quantkit/runtime/fp8_attention.py says where it applies), else as ModelOpt
    fake quant (correct numerics, no speed-up); unquantized attention stays with the SDPA kernel.
    Floating inputs are cast to the model's dtype. After compile(cuda_graph=True) each input signature's
    whole forward runs as one CUDA graph, and forward's outputs are that graph's buffers (run copies them);
    a transformers model's all-ones attention_mask is then left out, as transformers' sdpa path does.
    """

    name = "torch-fp8"

    def __init__(self, loaded, compile: bool = True, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, use_fast_accum: bool = True, regional: bool = True,
                 fuse: bool = True, fuse_mlp: bool = True, fp8_attention: bool = True, gemm_epilogue: bool = True):
        self.loaded = loaded
        model = loaded.model
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            cap = torch.cuda.get_device_capability(self.device)
            if cap < FP8_MIN_CAPABILITY:
                raise InputError(f"--runtime torch-fp8: {torch.cuda.get_device_name(self.device)} (SM {cap[0]}{cap[1]}) "
                                 "has no FP8 tensor cores (needs SM 89+: Ada, Hopper, Blackwell); use --runtime torch")
        self.dtype = dtype or _majority_float_dtype(model.parameters())
        model.to(self.device)
        model.eval()
        self.converted = convert_to_fp8(model, use_fast_accum=use_fast_accum)
        if self.converted == 0:
            reasons = sorted({r for _, r in fp8_conversion_plan(model) if r})
            raise InputError("--runtime torch-fp8: the model has no static per-tensor FP8 linear layers to run in FP8 "
                             f"({'; '.join(reasons[:3]) or 'no ModelOpt-quantized Linear layers'}); quantize it with an "
                             "FP8 recipe (e.g. --recipe fp8) first")
        self.skipped = [(n, r) for n, r in fp8_conversion_plan(model) if r]
        # attention modules whose Q·Kᵀ and P·V run in the FP8 attention kernel where a call allows it
        self.fp8_attention: list[str] = []
        if fp8_attention:
            from quantkit.runtime.fp8_attention import enable_fp8_attention

            self.fp8_attention = enable_fp8_attention(model)
        self.model: nn.Module = model
        self.fused: list[list[str]] | None = None if fuse else []
        self.fuse_mlp = fuse and fuse_mlp
        self.gemm_epilogue = gemm_epilogue
        self.gated_mlps: list = []  # GatedMLPSite of each MLP run as FP8GatedMLP (found when fusing)
        self.compiled = False
        self.graphed = None  # the whole forward as CUDA graphs, after compile(cuda_graph=True)
        self._compile_pending = {"regional": regional} if compile else None

    def fuse(self, inputs: Mapping[str, torch.Tensor]) -> list[list[str]]:
        """Join FP8 linears that read one tensor into one GEMM each, found by one eager forward of
        `inputs`; returns the fused groups. Must come before compile (the graphs would be traced twice)."""
        from quantkit.runtime.fusion import fuse_shared_input_linears
        from quantkit.runtime.gated_mlp import fuse_gated_mlps

        if self.fused is None:
            if self.compiled:
                raise RuntimeError("TorchFP8Runner.fuse: fuse before compiling")
            prepared = self._prepare(inputs)
            is_fp8 = lambda m: isinstance(m, FP8Linear)  # noqa: E731
            self.fused = fuse_shared_input_linears(self.model, lambda: self.model(**prepared), fusable=is_fp8,
                                                   concat=FP8Linear.concat)
            if self.fuse_mlp:
                self.gated_mlps = fuse_gated_mlps(self.model, lambda: self.model(**prepared), is_fp8,
                                                  gemm_epilogue=self.gemm_epilogue)
        return self.fused

    def compile(self, regional: bool = True, cuda_graph: bool = False, **compile_kwargs: Any) -> None:
        """torch.compile the converted model (see compile_model); the first run of each shape compiles.
        With cuda_graph, each input signature's whole forward is then recorded as one CUDA graph on its
        first run and replayed after (quantkit/runtime/cuda_graph.py; not with mode="reduce-overhead",
        whose per-region graphs it replaces). Before the first batch has been fused, this only asks
        for compilation after fusing."""
        own_graphs = (compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune")
                      or (compile_kwargs.get("options") or {}).get("triton.cudagraphs"))
        if cuda_graph and own_graphs:
            raise ValueError(f"TorchFP8Runner.compile: cuda_graph records the whole forward; mode="
                             f"{compile_kwargs.get('mode')!r} / options {compile_kwargs.get('options')} record "
                             "graphs of their own inside it: use mode='default' or 'max-autotune-no-cudagraphs'")
        if self.fused is None:
            self._compile_pending = {"regional": regional, "cuda_graph": cuda_graph, **compile_kwargs}
            return
        if not self.compiled:
            self.model = compile_model(self.model, regional=regional, **compile_kwargs)
            self.compiled = True
        if cuda_graph and self.graphed is None:
            from quantkit.runtime.cuda_graph import CUDAGraphForward

            self.graphed = CUDAGraphForward(self.model)
        self._compile_pending = None

    def _prepare(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor):
                t = t.to(self.device, dtype=self.dtype if t.is_floating_point() else None, non_blocking=True)
            out[name] = t
        return out

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One batch, outputs left on the device (for timing). The first one fuses and compiles."""
        if self.fused is None:
            self.fuse(inputs)  # outside inference mode: the joined weights are ordinary tensors
        if self._compile_pending is not None:
            self.compile(**self._compile_pending)
        with torch.inference_mode():
            if self.graphed is None:
                return self.loaded.named_outputs(self.model(**self._prepare(inputs)))
            return self.loaded.named_outputs(self.graphed(**self._prepare(self._without_full_mask(inputs))))

    def _without_full_mask(self, inputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """A transformers model's attention_mask of all ones left out, as transformers' eager sdpa path
        leaves it out: the graph then records the causal kernel (and FP8 attention) instead of building
        a mask. Read only from a CPU tensor (no GPU sync); a mask already on the GPU is kept."""
        from quantkit.compat.transformers import has_attn_implementation

        mask = inputs.get("attention_mask")
        if (isinstance(mask, torch.Tensor) and mask.device.type == "cpu"
                and has_attn_implementation(getattr(self.model, "config", None)) and bool(mask.all())):
            return {k: v for k, v in inputs.items() if k != "attention_mask"}
        return inputs

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.forward(inputs).items()}
