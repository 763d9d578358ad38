"""FP8 amax snapped so that a FP16/BF16 graph holds exactly the scale the PyTorch model quantizes with.

In a FP16/BF16 model ModelOpt keeps each quantizer's amax in the model's dtype; its fake quant
computes the FP8 step as amax / 448 in FP32, while its ONNX export writes dtype(amax / 448) into the
graph. Unless amax / 448 is itself a FP16/BF16 number, the two steps differ by up to half an ulp and
the dequantized values of the two runtimes differ (10 % of the first quantizer's outputs in a FP16
MiniLM, by one ulp each), which then flips FP8 roundings further on. After calibration each FP8
amax moves to the nearest value of its dtype whose amax / 448 is exact in the graph's dtype: at most
a few ulps (FP16: 3 bits of 11; BF16: 3 of 8), the clipping range changing by < 0.2 % (FP16) or
< 1.6 % (BF16) — the graph then holds what PyTorch computes with, and the reference run compares
like with like. INT8 is left alone: a scale exact in 16 bits times 127 leaves too coarse a grid
(up to 3 % of amax). FP32 models are untouched (their scales are exact already).
"""

from __future__ import annotations

import torch
from torch import nn

FP8_MAX = 448.0
_SEARCH_ULPS = 32  # exact values are every 2^3 ulps apart in the amax's own dtype; this is ample


def snap_amax(amax: torch.Tensor, graph_dtype: torch.dtype, maxbound: float = FP8_MAX) -> torch.Tensor:
    """The value of amax's dtype nearest `amax` with amax / maxbound exact in `graph_dtype` (per element);
    elements with no such value within the search, zeros and non-finite values keep theirs."""
    if amax.dtype == torch.float32:  # wider than the graph: the exact value is one rounding away
        snapped = (amax.double() / maxbound).to(graph_dtype).double() * maxbound
        return torch.where(torch.isfinite(amax) & (amax > 0), snapped.float(), amax)
    best = amax.clone()
    best_err = torch.full(amax.shape, float("inf"), dtype=torch.float64, device=amax.device)
    up, down = amax.clone(), amax.clone()
    candidates = [amax]
    for _ in range(_SEARCH_ULPS):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        candidates += [up, down]
    usable = torch.isfinite(amax) & (amax > 0)
    for c in candidates:
        scale = c.double() / maxbound
        exact = scale.to(graph_dtype).double() == scale
        err = (c.double() - amax.double()).abs()
        take = usable & exact & (err < best_err)
        best = torch.where(take, c, best)
        best_err = torch.where(take, err, best_err)
    return best


@torch.no_grad()
def snap_fp8_amax(model: nn.Module, graph_dtype: torch.dtype) -> dict[str, int]:
    """Snap every enabled per-tensor/per-channel FP8 quantizer's amax for a `graph_dtype` graph, in place.

    Returns {"quantizers": snapped, "moved": amax values that changed}. No-op for FP32."""
    counts = {"quantizers": 0, "moved": 0}
    if graph_dtype not in (torch.float16, torch.bfloat16):
        return counts
    for module in model.modules():
        amax = getattr(module, "_amax", None)
        if (getattr(module, "num_bits", None) != (4, 3) or not getattr(module, "is_enabled", False)
                or getattr(module, "block_sizes", None) or not torch.is_tensor(amax)):
            continue
        # on the CPU: a handful of values, and nextafter's 16-bit kernels are not on every device
        snapped = snap_amax(amax.detach().cpu(), graph_dtype).to(amax.device)
        counts["moved"] += int((snapped != amax).sum().item())
        counts["quantizers"] += 1
        amax.copy_(snapped)
    return counts
