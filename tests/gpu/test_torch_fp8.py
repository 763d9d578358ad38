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
    # in float64: over millions of values a float32 cosine of a tensor with itself is 1 ± 2e-4
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


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
    cmp = compare(out, against="fake-quant", runtimes=["torch-fp8"], device="cuda",
                  trust_model_code=True)  # the test made this folder
    assert cmp.runtimes["torch-fp8"].ran, cmp.runtimes["torch-fp8"].describe()
    assert cmp.runtimes["torch-fp8"].samples == 2
    for name, m in cmp.metrics["torch-fp8"].items():
        assert m.finite and m.cosine >= 0.999, (name, m.cosine)


class QKV(nn.Module):
    """Three projections of one tensor (a GQA attention's q/k/v shapes, no bias as in Llama: the
    row-wise BF16 path) and an output projection."""

    def __init__(self, d: int = 256, kv: int = 64):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, n, bias=False) for n in (d, kv, kv))
        self.o = nn.Linear(d + 2 * kv, d)

    def forward(self, x):
        return x + self.o(torch.cat([self.q(x), self.k(x), F.gelu(self.v(x))], dim=-1))


def test_fused_qkv_runs_one_rowwise_scaled_mm_matching_the_separate_layers(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(QKV(), QKV()).cuda().to(torch.bfloat16).eval()
    data = [torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), lambda m: [m(x) for x in data])
    separate, quantized = copy.deepcopy(model), copy.deepcopy(model)
    convert_to_fp8(separate)
    loaded = LoadedModel(spec="qkv", model=model, input_names=["input"], output_names=["y"])
    runner = TorchFP8Runner(loaded, compile=False)
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16)
    assert runner.fuse({"input": x}) == [["0.q", "0.k", "0.v"], ["1.q", "1.k", "1.v"]]
    calls = []
    original = torch._scaled_mm

    def recording(a, b, scale_a, scale_b, **kwargs):
        calls.append((tuple(b.shape), tuple(scale_a.shape), tuple(scale_b.shape)))
        return original(a, b, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    with torch.no_grad():
        got = model(x)
        monkeypatch.setattr(torch, "_scaled_mm", original)
        want = separate(x)
    # per block: one row-wise GEMM for q/k/v (256 + 64 + 64 outputs), one per-tensor GEMM for o
    assert calls[:2] == [((256, 384), (256, 1), (1, 384)), ((384, 256), (), ())], calls
    assert len(calls) == 4
    assert torch.isfinite(got).all() and _cos(got, want) >= 0.9999, f"cosine {_cos(got, want)}"
    compiled = TorchFP8Runner(LoadedModel(spec="qkv", model=quantized, input_names=["input"], output_names=["y"]))
    got_compiled = compiled.run({"input": x})["y"]  # the first batch fuses, then compiles
    assert len(compiled.fused) == 2 and compiled.compiled
    assert _cos(got_compiled, want.cpu()) >= 0.9999, f"compiled cosine {_cos(got_compiled, want.cpu())}"


# ---------------------------------------------------------------------------------------------
# The gated MLP kernel (quantkit/runtime/fp8_kernels.py) and the runner's use of it


def _eager_gated(gate, up, inv, act):
    from quantkit.runtime.gated_mlp import ACTIVATIONS

    return quantize_e4m3(ACTIVATIONS[act](gate) * up, inv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "gelu"])
def test_gated_act_quant_kernel_gives_the_eager_bytes(act, dtype):
    pytest.importorskip("triton")
    from quantkit.runtime import fp8_kernels  # noqa: F401  (registers the op)

    g = torch.Generator(device="cuda").manual_seed(0)
    # the two halves of one GEMM output, 3000 columns: not a multiple of the kernel's block
    pair = (torch.randn(37, 6000, device="cuda", generator=g) * 3).to(dtype)
    gate, up = pair.split(3000, dim=-1)
    inv = torch.tensor(448 / 6.0, device="cuda")
    got = torch.ops.quantkit.gated_act_quant(gate, up, inv, act)
    want = _eager_gated(gate, up, inv, act)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (37, 3000) and got.is_contiguous()
    same = (got.view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
    if act == "silu":
        assert same == 1.0, same
    else:  # libdevice's tanh / erf against torch's: an FP32 ulp can move a rounding, rarely
        assert same >= 0.999, same
        assert (got.float() - want.float()).abs().max().item() <= want.float().abs().max().item() / 8


def test_gated_act_quant_takes_strided_and_empty_inputs():
    pytest.importorskip("triton")
    from quantkit.runtime import fp8_kernels  # noqa: F401

    inv = torch.tensor(448 / 6.0, device="cuda")
    gate = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16).t()  # last dimension not contiguous
    up = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.quantkit.gated_act_quant(gate, up, inv, "silu")
    assert torch.equal(got.view(torch.uint8), _eager_gated(gate, up, inv, "silu").view(torch.uint8))
    empty = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.ops.quantkit.gated_act_quant(empty, empty, inv, "silu").shape == (0, 64)


def test_gated_act_quant_saturates_and_keeps_nan():
    pytest.importorskip("triton")
    from quantkit.runtime import fp8_kernels  # noqa: F401

    gate = torch.tensor([[100.0, -100.0, float("nan"), 1.0]], device="cuda", dtype=torch.bfloat16)
    up = torch.tensor([[100.0, 100.0, 1.0, float("inf")]], device="cuda", dtype=torch.bfloat16)
    got = torch.ops.quantkit.gated_act_quant(gate, up, torch.tensor(1.0, device="cuda"), "silu").float()
    # silu(100) * 100 saturates, silu(-100) * 100 is ~0, NaN stays NaN, 1 * inf saturates
    assert got[0, 0].item() == 448.0 and got[0, 1].item() == 0.0
    assert torch.isnan(got[0, 2]) and got[0, 3].item() == 448.0


# The gate/up GEMM with the gated activation in its epilogue (fp8_kernels.gated_gemm_quant), Hopper only

hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                            reason="the gated GEMM is tuned and tested on Hopper (SM 9.x) only")


def _gate_up(k: int, ffn: int, bias: bool, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(2 * ffn, k, device="cuda", generator=g) * 0.02
    b = (torch.randn(2 * ffn, device="cuda", generator=g) * 0.1).to(dtype) if bias else None
    biases = b.split(ffn) if bias else (None, None)
    return FP8Linear.concat([FP8Linear.from_amax(h, h.abs().amax(), torch.tensor(4.0, device="cuda"), hb)
                             for h, hb in zip(w.split(ffn), biases)])


def _fp8_steps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in E4M3 steps (one step: 2^(exponent - 3), subnormals' at the smallest)."""
    step = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(2 ** -6))) - 3)
    return ((got.float() - want.float()).abs() / step).max().item()


@hopper
@pytest.mark.parametrize("act, dtype, gate_index, bias, rows, k", [
    ("silu", torch.bfloat16, 0, False, 2048, 512),
    ("gelu_tanh", torch.bfloat16, 1, False, 777, 272),   # rows and K not multiples of the tiles
    ("silu", torch.float16, 0, True, 1000, 512),
    ("gelu", torch.bfloat16, 1, True, 129, 2048),
    ("silu", torch.bfloat16, 0, False, 16, 512),     # GEMM_EPILOGUE_MIN_ROWS
    ("silu", torch.bfloat16, 1, True, 1, 512),       # one row: the kernel runs, the runtime would not pick it
])
def test_gated_gemm_gives_the_bytes_of_the_gemm_and_the_gated_kernel(act, dtype, gate_index, bias, rows, k):
    from quantkit.runtime import fp8_kernels
    from quantkit.runtime.gated_mlp import ACTIVATIONS, interleave_gate_up

    ffn, half = 1024, fp8_kernels.GATED_GEMM_HALF
    gu = _gate_up(k, ffn, bias, dtype)
    g = torch.Generator(device="cuda").manual_seed(2)
    x8 = gu.quantize_input((torch.randn(rows, k, device="cuda", generator=g) * 2).to(dtype))
    pair = gu.matmul_fp8(x8, dtype)
    gate, up = pair[:, gate_index * ffn:(gate_index + 1) * ffn], pair[:, (1 - gate_index) * ffn:(2 - gate_index) * ffn]
    inv = 448 / (ACTIVATIONS[act](gate) * up).float().abs().amax()  # the calibrated scale: no saturation
    want = torch.ops.quantkit.gated_act_quant(gate, up, inv, act)
    wi = interleave_gate_up(gu.weight, gate_index, half)
    si = interleave_gate_up(gu.weight_scale, gate_index, half)
    bi = None if gu.bias is None else interleave_gate_up(gu.bias, gate_index, half)
    got = torch.ops.quantkit.gated_gemm_quant(x8, wi, gu.input_scale, si, bi, inv, act, dtype, half)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (rows, ffn) and got.is_contiguous()
    same = (got.view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
    steps = _fp8_steps(got, want)
    print(f"gated GEMM {act} {dtype} gate_index {gate_index} bias {bias} {rows}x{k}: bytes equal {same:.6f}, "
          f"max {steps} FP8 steps apart")
    # one FP32 accumulation order against cuBLAS's: a BF16 rounding can move, rarely, by one step
    assert same >= 0.999 and steps <= 1.0
    assert torch.isfinite(want.float()).all() and (want.float().abs() > 1.0).float().mean().item() > 0.5
    # the same interleaved weight through cuBLAS and the block-layout gated kernel: the bytes of `want`
    blocks = torch.ops.quantkit.gated_act_quant_blocks(
        FP8Linear(wi, si, gu.input_scale, bi, input_inv_scale=gu.input_inv_scale).matmul_fp8(x8, dtype), inv, act, half)
    assert (blocks.view(torch.uint8) == want.view(torch.uint8)).float().mean().item() >= 0.9999


@hopper
def test_gated_gemm_refuses_shapes_it_cannot_tile():
    from quantkit.runtime import fp8_kernels  # noqa: F401

    x8 = torch.zeros(4, 24, device="cuda").to(torch.float8_e4m3fn)
    w8 = torch.zeros(512, 24, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    with pytest.raises(ValueError, match="K % 16"):
        torch.ops.quantkit.gated_gemm_quant(x8, w8, one, one, None, one, "silu", torch.bfloat16, 128)
    empty = torch.ops.quantkit.gated_gemm_quant(x8[:0, :16], w8[:, :16], one, one, None, one, "silu",
                                                torch.bfloat16, 128)
    assert empty.shape == (0, 256) and empty.dtype == torch.float8_e4m3fn


class GatedMLP(nn.Module):
    def __init__(self, d: int = 256, ffn: int = 1024):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GatedStack(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.mlps = nn.ModuleList([GatedMLP() for _ in range(n)])

    def forward(self, x):
        for m in self.mlps:
            x = x + m(x)
        return x


def test_runner_runs_gated_mlps_through_the_kernel_eager_and_compiled():
    """The MLP found, its output the same bytes as the separate FP8 ops eagerly, and compiled (where
    Inductor keeps the op: the kernel runs in the graph) within rounding of it."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = GatedStack().cuda().to(torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randn(4, 64, 256, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), lambda m: [m(x) for x in data])
    x = torch.randn(8, 128, 256, device="cuda", generator=g).to(torch.bfloat16)  # 1024 rows
    small = torch.randn(1, 8, 256, device="cuda", generator=g).to(torch.bfloat16)  # below GEMM_EPILOGUE_MIN_ROWS
    runners = {}
    for name, kw in (("plain", {"fuse_mlp": False, "compile": False}),
                     ("two kernels", {"compile": False, "gemm_epilogue": False}), ("eager", {"compile": False}),
                     ("compiled", {"compile": True}), ("graphs", {"compile": False})):
        loaded = LoadedModel(spec="net", model=copy.deepcopy(model), input_names=["x"], output_names=["y"])
        runners[name] = TorchFP8Runner(loaded, **kw)
    runners["graphs"].fuse({"x": x})
    runners["graphs"].compile(mode="reduce-overhead")
    out = {name: r.run({"x": x})["y"] for name, r in runners.items()}
    out["graphs again"] = runners["graphs"].run({"x": x})["y"]
    assert [s.name for s in runners["eager"].gated_mlps] == ["mlps.0", "mlps.1"]
    assert runners["compiled"].compiled and len(runners["compiled"].gated_mlps) == 2
    assert torch.equal(out["two kernels"], out["plain"])
    assert runners["two kernels"].model.mlps[0].interleave == 0
    on_hopper = torch.cuda.get_device_capability()[0] == 9
    assert runners["eager"].model.mlps[0].interleave == (128 if on_hopper else 0)
    for name in ("eager", "compiled", "graphs", "graphs again"):
        cos = _cos(out[name], out["plain"])
        print(f"gated MLP runner {name}: cosine {cos:.7f} against the separate FP8 ops")
        assert torch.isfinite(out[name]).all() and cos >= 0.99999, (name, cos)
    # (not asserted: one FP8 byte of act · up that moves changes a whole row of down's output)
    print(f"gated MLP runner eager: outputs equal {(out['eager'] == out['plain']).float().mean().item():.6f}")
    # below the row threshold: the interleaved weight through cuBLAS and the block-layout kernel
    got_small, want_small = runners["eager"].run({"x": small})["y"], runners["plain"].run({"x": small})["y"]
    assert got_small.shape == (1, 8, 256) and _cos(got_small, want_small) >= 0.99999


# ---------------------------------------------------------------------------------------------
# FP8 attention (quantkit/runtime/fp8_attention.py, the kernel in fp8_kernels.py)


@pytest.mark.parametrize("batch, heads, kv_heads, length, head_dim, causal", [
    (2, 4, 2, 100, 64, True),   # grouped heads, a length not a multiple of the tile
    (2, 4, 2, 100, 64, False),
    (1, 8, 1, 256, 256, True),  # the bench decoder's attention (Gemma-2B dimensions)
    (3, 2, 2, 1, 32, False),    # one query (a decode step)
])
def test_fp8_attention_kernel_matches_attention_over_the_dequantized_inputs(batch, heads, kv_heads, length,
                                                                             head_dim, causal):
    pytest.importorskip("triton")
    from quantkit.runtime import fp8_kernels  # noqa: F401

    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, h, length, head_dim, device="cuda", generator=g).to(torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    scales = [t.abs().amax().float() / 448 for t in (q, k, v)]
    q8, k8, v8 = (quantize_e4m3(t, 1 / s) for t, s in zip((q, k, v), scales))
    v8t = v8.transpose(-1, -2).contiguous().transpose(-1, -2)
    got = torch.ops.quantkit.fp8_attention(q8, k8, v8t, *scales, causal, head_dim ** -0.5, torch.bfloat16)
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q8.float() * scales[0], (k8.float() * scales[1]).repeat_interleave(rep, 1),
                                          (v8.float() * scales[2]).repeat_interleave(rep, 1), is_causal=causal)
    assert got.shape == (batch, heads, length, head_dim) and got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    # what remains is P in FP8 (3 mantissa bits) and the BF16 output
    print("fp8 attention kernel vs dequantized", (batch, heads, kv_heads, length, head_dim, causal), _cos(got, want))
    assert _cos(got, want) >= 0.998, _cos(got, want)
    # V in its plain layout is laid out by the op itself
    plain = torch.ops.quantkit.fp8_attention(q8, k8, v8, *scales, causal, head_dim ** -0.5, torch.bfloat16)
    assert _cos(plain, got) >= 0.99999


def test_runner_runs_the_fp8_recipes_attention_in_the_kernel_eager_and_compiled():
    pytest.importorskip("triton")
    import dataclasses

    import quantkit
    from quantkit.calib import builtin_set
    from quantkit.models import load_model

    llama = load_model("llama-tiny")
    with quantkit.quantize(llama, "fp8", calibration=builtin_set(llama).subset(range(6)), per_layer=False,
                           device="cuda", dtype="bf16") as qm:
        copies = [dataclasses.replace(qm.loaded, model=copy.deepcopy(qm.model)) for _ in range(2)]
        fake = TorchFP8Runner(copies[0], compile=False, fp8_attention=False)
        eager = TorchFP8Runner(copies[1], compile=False)
        compiled = TorchFP8Runner(qm.loaded, compile=True)
        ids = torch.randint(0, 1000, (2, 96), generator=torch.Generator().manual_seed(0))
        out = {name: r.run({"input_ids": ids})["logits"] for name, r in
               (("fake", fake), ("eager", eager), ("compiled", compiled))}
        names = [f"model.layers.{i}.self_attn" for i in range(4)]
        assert eager.fp8_attention == compiled.fp8_attention == names and fake.fp8_attention == []
        from quantkit.attention_math import ATTENTION_KERNEL

        calls = [getattr(r.model.get_submodule(n), ATTENTION_KERNEL).calls for r in (eager,) for n in names]
        assert calls == [3] * 4, calls  # the two probe forwards of the first batch and the batch itself
        assert all(torch.isfinite(o).all() for o in out.values())
        # Held to the fake-quant model's own distance from BF16, not to the fake-quant output: any two FP8
        # evaluations of this small model (eager and compiled fake quant included) land ~0.998 apart,
        # because a BF16 rounding difference before a quantization moves values across FP8 rounding edges.
        ref = load_model("llama-tiny").model.to("cuda", torch.bfloat16)
        with torch.inference_mode():
            want = ref(input_ids=ids.cuda()).logits.float().cpu()
        to_bf16 = {name: _cos(o, want) for name, o in out.items()}
        print("cosine vs BF16", to_bf16, "fp8 attention vs fake quant", _cos(out["eager"], out["fake"]))
        for name in ("eager", "compiled"):
            assert to_bf16[name] >= to_bf16["fake"] - 0.001, to_bf16
        # the compiled model runs the kernel, one launch per layer, and later batches compile nothing new
        from torch._dynamo.utils import counters
        from torch.profiler import ProfilerActivity, profile

        graphs = counters["stats"]["unique_graphs"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                compiled.run({"input_ids": ids})
        launches = sum(e.count for e in prof.key_averages() if "fp8_attention_kernel" in e.key)
        assert launches == 2 * 4, launches
        assert counters["stats"]["unique_graphs"] == graphs
