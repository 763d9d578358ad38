"""The gated MLP of the FP8 runtime: down(act(gate(x)) · up(x)) with act · up and the FP8 quantization of
down's input in one kernel (quantkit.runtime.fp8_kernels on CUDA, the same arithmetic in torch elsewhere).

Found by what the model does, not by its class or names: after q/k/v and gate/up have been joined
(quantkit.runtime.fusion), one probe forward checks, for each module holding a joined pair of FP8
linears, that the module was called once with the pair's input x as its only argument, that its output
*is* the output of a sibling FP8 linear ("down"), and that down's input is, to the last bit, act(a) · b
of the pair's outputs for one known activation and order. Such a module is replaced by `FP8GatedMLP`,
which computes the same thing in three kernels (gate/up GEMM, act · up · quantize, down GEMM), or, on
Hopper from GEMM_EPILOGUE_MIN_ROWS rows, in two: the gate/up GEMM with act · up · quantize in its
epilogue (fp8_kernels.gated_gemm_quant, on the gate/up weight interleaved once); the same FP8 bytes
either way but for a rare one-step rounding apart (another FP32 accumulation order than cuBLAS's;
tests/gpu/test_torch_fp8.py). This is the MLP of Llama, Gemma (tanh-GELU), Qwen, Mistral, PaliGemma's
Gemma and the LLM backbones of GR00T; an MLP that does anything else (dropout, a residual, another
activation) fails a check and stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.runtime.fusion import FusedMember, FusedSiblings, probe

# activation name (the kernel's) -> the torch function the eager module computes
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu": F.gelu,
}


# From this many rows (tokens) the gated GEMM runs: on an H200 it was level with cuBLAS + the gated kernel at
# 16 rows and 1.02-1.25x faster from 64 to 16384 (GPU time; scripts/bench_fp8_kernels.py --only gemm,
# BENCHMARKS.md); fewer rows were not measured, and keep the two kernels.
GEMM_EPILOGUE_MIN_ROWS = 16


@dataclass(frozen=True)
class GatedMLPSite:
    name: str  # the module replaced
    down: str  # its FP8 down projection's name, relative to it
    act: str
    gate_index: int  # which of the joined pair is act's input (0 or 1)


def _kernels():
    """quantkit.runtime.fp8_kernels, or None where Triton is not installed (CPU builds of torch)."""
    from quantkit.runtime import fp8_kernels

    return fp8_kernels if fp8_kernels.AVAILABLE else None


def interleave_gate_up(joined: torch.Tensor, gate_index: int, half: int) -> torch.Tensor:
    """The rows (or entries) of a joined [gate; up] (or [up; gate]: gate_index 1) tensor reordered in
    blocks of `half`: gate rows 0..half-1, up rows 0..half-1, gate rows half..2·half-1, ... FP8 tensors
    are moved as bytes (torch.stack has no float8 kernels on every device)."""
    as_bytes = joined.dtype == torch.float8_e4m3fn
    t = joined.view(torch.uint8) if as_bytes else joined
    f = t.shape[0] // 2
    gate, up = t[gate_index * f:(gate_index + 1) * f], t[(1 - gate_index) * f:(2 - gate_index) * f]
    rest = t.shape[1:]
    out = torch.stack([gate.reshape(f // half, half, *rest), up.reshape(f // half, half, *rest)], dim=1)
    out = out.reshape(2 * f, *rest).contiguous()
    return out.view(torch.float8_e4m3fn) if as_bytes else out


def interleave_gate_up_linear(gate_up: nn.Module, gate_index: int, half: int) -> nn.Module:
    """A joined gate/up FP8Linear with its weight rows, weight scales and bias interleaved in blocks of
    `half` (interleave_gate_up): the layout fp8_kernels.gated_gemm_quant reads. A new module of the same
    class (an FP8Linear, named by its class: torch_fp8 imports this module, so this one does not import it)."""
    w_scale = gate_up.weight_scale
    scale = w_scale.expand(gate_up.out_features) if w_scale.dim() == 0 else w_scale
    bias = None if gate_up.bias is None else interleave_gate_up(gate_up.bias, gate_index, half)
    new = type(gate_up)(interleave_gate_up(gate_up.weight, gate_index, half),
                        interleave_gate_up(scale, gate_index, half), gate_up.input_scale, bias,
                        gate_up.use_fast_accum, input_inv_scale=gate_up.input_inv_scale)
    new.rowwise_native = gate_up.rowwise_native
    return new


def gemm_epilogue_reason(gate_up: nn.Module, half: int) -> str | None:
    """Why the gated GEMM cannot run this gate/up FP8Linear (None when it can)."""
    from quantkit.runtime import fp8_kernels

    weight = gate_up.weight
    if not fp8_kernels.GATED_GEMM_AVAILABLE:
        return "Triton with host TMA descriptors is not installed"
    if weight.device.type != "cuda" or torch.cuda.get_device_capability(weight.device)[0] != 9:
        return "the gated GEMM is tuned and tested on Hopper (SM 9.x) only"
    if gate_up.in_features % 16 or (gate_up.out_features // 2) % half:
        return f"shape {gate_up.out_features}x{gate_up.in_features}: needs K % 16 == 0 and FFN % {half} == 0"
    return None


class FP8GatedMLP(nn.Module):
    """down(act(gate(x)) · up(x)) with gate and up one FP8 GEMM and act · up quantized in one pass (in the
    GEMM's epilogue where `use_gemm_epilogue` has interleaved the gate/up weight)."""

    def __init__(self, gate_up: nn.Module, sizes: list[int], down: nn.Module, act: str, gate_index: int,
                 original_class: str):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        self.sizes, self.act, self.gate_index = list(sizes), act, gate_index
        self.original_class = original_class
        self.interleave = 0  # > 0: gate_up's rows come interleaved in blocks of this many (interleave_gate_up)

    @torch.no_grad()
    def use_gemm_epilogue(self, half: int) -> None:
        """Interleave gate_up's weight rows, weight scales and bias in blocks of `half`, once, in place of
        the joined ones (no second copy of the weight): the layout fp8_kernels.gated_gemm_quant reads."""
        if not self.interleave:
            self.gate_up, self.interleave = interleave_gate_up_linear(self.gate_up, self.gate_index, half), half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        gu, inv = self.gate_up, self.down.input_inv_scale
        if self.interleave and x2.is_cuda and x2.shape[0] >= GEMM_EPILOGUE_MIN_ROWS:
            h8 = torch.ops.quantkit.gated_gemm_quant(gu.quantize_input(x2), gu.weight, gu.input_scale, gu.weight_scale,
                                                     gu.bias, inv, self.act, x.dtype, self.interleave)
        elif self.interleave and x2.is_cuda:
            h8 = torch.ops.quantkit.gated_act_quant_blocks(gu(x2), inv, self.act, self.interleave)
        else:
            pair = gu(x2)
            if self.interleave:  # blocks of [gate | up] (a model moved off the GPU after interleaving)
                blocks = pair.view(pair.shape[0], -1, 2, self.interleave)
                gate, up = blocks[:, :, 0].reshape(pair.shape[0], -1), blocks[:, :, 1].reshape(pair.shape[0], -1)
            else:
                halves = pair.split(self.sizes, dim=-1)
                gate, up = halves[self.gate_index], halves[1 - self.gate_index]
            if _kernels() is not None and gate.is_cuda:
                h8 = torch.ops.quantkit.gated_act_quant(gate, up, inv, self.act)
            else:  # the eager ops themselves: the same roundings (act, product, quantization)
                h8 = self.down.quantize_input(ACTIVATIONS[self.act](gate) * up)
        return self.down.matmul_fp8(h8, x.dtype).reshape(*lead, self.down.out_features)

    def extra_repr(self) -> str:
        where = (f"in the gate/up GEMM's epilogue from {GEMM_EPILOGUE_MIN_ROWS} rows" if self.interleave
                 else "in one kernel")
        return f"{self.original_class}: {self.act}(gate) * up quantized {where}"


def _pairs(model: nn.Module, is_fp8: Callable[[nn.Module], bool]) -> dict[str, tuple[FusedSiblings, list[str]]]:
    """{parent name: (joined pair, [down candidates])}: parents holding the two members of one joined
    pair of equal halves, and their FP8 children that read a half (in_features = the half's size)."""
    found: dict[str, tuple[FusedSiblings, list[str]]] = {}
    for name, parent in model.named_modules():
        if not name:
            continue  # the model itself is never replaced
        members = [m for m in parent.children() if isinstance(m, FusedMember)]
        groups = {id(m.group): m.group for m in members}
        if len(members) != 2 or len(groups) != 1:
            continue
        group = next(iter(groups.values()))
        if len(group.sizes) != 2 or group.sizes[0] != group.sizes[1] or not is_fp8(group.fused):
            continue
        downs = [child for child, m in parent.named_children()
                 if is_fp8(m) and getattr(m, "in_features", None) == group.sizes[0]]
        if downs:
            found[name] = (group, downs)
    return found


def gated_mlp_sites(model: nn.Module, run: Callable[[], Any], is_fp8: Callable[[nn.Module], bool]) -> list[GatedMLPSite]:
    """The modules of `model` that compute down(act(gate(x)) · up(x)) in `run`'s forward (see the module
    docstring for the checks). Holds one module's activations at a time."""
    pairs = _pairs(model, is_fp8)
    state: dict[str, dict[str, Any]] = {name: {"calls": 0, "ok": False} for name in pairs}
    handles = []

    def watch(name: str, group: FusedSiblings, downs: list[str]) -> None:
        parent = model.get_submodule(name)
        st = state[name]

        def before(module, args, kwargs):
            st["calls"] += 1
            st["x"] = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
            st["outputs"], st["match"], st["down_out"] = None, None, None

        def pair_out(module, args, output):
            if st.get("x") is not None and args and args[0] is st["x"]:
                st["outputs"] = output

        def down_in(down: str):
            def check(module, args):
                outs = st.get("outputs")
                if outs is None or st.get("match") is not None or not args:
                    return
                h = args[0]
                for act, fn in ACTIVATIONS.items():
                    for gate_index in (0, 1):
                        a, b = outs[gate_index], outs[1 - gate_index]
                        if a.shape == h.shape and torch.equal(fn(a) * b, h):
                            st["match"] = (down, act, gate_index)
                            st["down_module"] = module
                            return
            return check

        def down_out(module, args, output):
            if st.get("down_module") is module:
                st["down_out"] = output

        def after(module, args, kwargs, output):
            st["ok"] = (st["calls"] == 1 and st.get("match") is not None and output is st.get("down_out"))
            st["site"] = st.get("match")
            for key in ("x", "outputs", "down_out", "down_module", "match"):
                st.pop(key, None)

        handles.append(parent.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(parent.register_forward_hook(after, with_kwargs=True))
        handles.append(group.register_forward_hook(pair_out))
        for down in downs:
            m = parent.get_submodule(down)
            handles.append(m.register_forward_pre_hook(down_in(down)))
            handles.append(m.register_forward_hook(down_out))

    for name, (group, downs) in pairs.items():
        watch(name, group, downs)
    probe(run, handles)
    sites = []
    for name, st in state.items():
        if st["ok"] and st.get("site"):
            down, act, gate_index = st["site"]
            sites.append(GatedMLPSite(name, down, act, gate_index))
    return sites


@torch.no_grad()
def fuse_gated_mlps(model: nn.Module, run: Callable[[], Any], is_fp8: Callable[[nn.Module], bool],
                    gemm_epilogue: bool = True) -> list[GatedMLPSite]:
    """Replace every gated MLP `gated_mlp_sites` finds by an FP8GatedMLP, in place; returns the sites.
    With `gemm_epilogue`, each one whose gate/up GEMM the gated GEMM can run (gemm_epilogue_reason)
    gets its weight interleaved for it."""
    from quantkit.runtime import fp8_kernels

    sites = gated_mlp_sites(model, run, is_fp8)
    half = fp8_kernels.GATED_GEMM_HALF
    for site in sites:
        old = model.get_submodule(site.name)
        member = next(m for m in old.children() if isinstance(m, FusedMember))
        new = FP8GatedMLP(member.group.fused, member.group.sizes, old.get_submodule(site.down), site.act,
                          site.gate_index, type(old).__name__)
        if gemm_epilogue and gemm_epilogue_reason(new.gate_up, half) is None:
            new.use_gemm_epilogue(half)
        model.set_submodule(site.name, new)
    return sites
