"""The PyTorch FP8 runtime on the CPU: which linears convert, FP8Linear against ModelOpt's fake quant, NaN safety.

torch 2.13's CPU build has torch._scaled_mm, so FP8Linear runs the same call as on a GPU here; the
explicit reference path (dequantize, FP32 matmul) is checked against it too. That the module really
calls torch._scaled_mm on CUDA is asserted in tests/gpu/test_torch_fp8.py.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt")

from quantkit.errors import InputError  # noqa: E402
from quantkit.models import LoadedModel  # noqa: E402
from quantkit.modelopt_config import build_quant_config  # noqa: E402
from quantkit.plan import make_plan  # noqa: E402
from quantkit.recipe import recipe_from_dict  # noqa: E402
from quantkit.runtime import Runner  # noqa: E402
from quantkit.runtime import torch_fp8  # noqa: E402
from quantkit.runtime.torch_fp8 import (  # noqa: E402
    FP8_DTYPE,
    FP8Linear,
    TorchFP8Runner,
    convert_to_fp8,
    fp8_conversion_plan,
    fp8_matmul_reference,
    quantize_e4m3,
    repeated_blocks,
)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    """Four FP8 linears in two blocks, one INT8 linear, one with in_features 20 (not a multiple of 16)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.int8_proj = nn.Linear(d, d)
        self.odd = nn.Linear(d, 20)
        self.head = nn.Linear(20, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.odd(self.int8_proj(x)))


RECIPE = recipe_from_dict({
    "name": "fp8-test", "default": "skip",
    "rules": [{"types": ["Linear"], "precision": "fp8"},
              {"match": "int8_proj", "precision": "int8"},
              {"match": "head", "precision": "skip"}],
    "protect": {"softmax": False}, "attention": {"precision": "skip"},
})


def _data(n: int = 8, d: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 5, d, generator=g) for _ in range(n)]


def _quantized(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    data = [x.to(dtype) for x in _data()]

    def loop(m):
        for x in data:
            m(x)

    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), loop)
    return model


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_converts_exactly_the_per_tensor_fp8_linears():
    model = _quantized()
    plan = dict(fp8_conversion_plan(model))
    assert plan["blocks.0.up"] is None and plan["blocks.1.down"] is None
    assert "not FP8" in plan["int8_proj"], plan["int8_proj"]
    assert "divisible by 16" in plan["odd"], plan["odd"]
    assert "disabled" in plan["head"], plan["head"]

    assert convert_to_fp8(model) == 4
    assert [n for n, m in model.named_modules() if isinstance(m, FP8Linear)] == [
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert not isinstance(model.int8_proj, FP8Linear) and hasattr(model.int8_proj, "weight_quantizer")
    assert convert_to_fp8(model) == 0, "a second conversion must find nothing left"


def test_fp8linear_matches_modelopt_fake_quant():
    model = _quantized()
    reference = copy.deepcopy(model)
    convert_to_fp8(model)
    x = _data(1, seed=1)[0]
    with torch.no_grad():
        for name in ("blocks.0.up", "blocks.1.down"):
            fake, real = reference.get_submodule(name), model.get_submodule(name)
            inp = x if name.endswith("up") else torch.randn(4, 5, 128, generator=torch.Generator().manual_seed(2))
            want, got = fake(inp), real(inp)
            assert got.shape == want.shape == (4, 5, real.out_features)
            assert got.dtype == torch.float32
            err = (got - want).abs().max().item()
            scale = want.abs().max().item()
            # Same FP8 values on both sides; only the FP32 summation order differs.
            assert err <= 1e-5 * scale, f"{name}: max abs error {err} vs output scale {scale}"
        want, got = reference(x), model(x)
    assert _cos(got, want) >= 0.99999, f"model cosine {_cos(got, want)}"


def test_weight_stored_once_in_fp8_with_modelopt_scales():
    model = _quantized()
    q = model.blocks[0].up
    w_amax, x_amax = q.weight_quantizer.amax.float(), q.input_quantizer.amax.float()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    assert lin.weight.dtype == FP8_DTYPE and lin.weight.shape == (128, 32) and lin.weight.is_contiguous()
    assert torch.equal(lin.weight_scale, (w_amax / 448).reshape(()))
    assert torch.equal(lin.input_scale, (x_amax / 448).reshape(()))
    assert torch.equal(lin.input_inv_scale, (448 / x_amax).reshape(()))
    assert not any(isinstance(p, nn.Parameter) for p in lin.parameters()), "FP8Linear holds buffers, no weights to train"
    assert lin.weight_bytes() == 128 * 32 + 128 * 4 + 3 * 4
    # a model-wide cast leaves the FP8 weight and FP32 scales alone
    model.to(torch.bfloat16)
    assert lin.weight.dtype == FP8_DTYPE and lin.input_scale.dtype == torch.float32
    assert lin.bias.dtype == torch.float32
    keys = model.state_dict()
    assert keys["blocks.0.up.weight"].dtype == FP8_DTYPE


def test_bf16_output_with_fused_bias_matches_reference_path():
    model = _quantized(torch.bfloat16)
    convert_to_fp8(model)
    lin = model.blocks[0].up
    x = _data(1, seed=3)[0].to(torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
        x_fp8 = quantize_e4m3(x.reshape(-1, 32), lin.input_inv_scale)
        want = fp8_matmul_reference(x_fp8, lin.weight, lin.input_scale, lin.weight_scale, lin.bias, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert _cos(got, want.reshape(got.shape)) >= 0.9999


def test_reference_path_is_what_scaled_mm_computes(monkeypatch):
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    x = _data(1, seed=4)[0]
    with torch.no_grad():
        fast = lin(x)
        monkeypatch.setattr(torch_fp8, "CPU_SCALED_MM", False)
        explicit = lin(x)
    assert (fast - explicit).abs().max().item() <= 1e-5 * explicit.abs().max().item()


def test_inputs_beyond_fp8_range_saturate_instead_of_nan():
    model = _quantized()
    convert_to_fp8(model)
    lin = model.blocks[0].up
    limit = 448 * lin.input_scale.item()  # the largest input the static scale represents
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([10 * limit, -1e6 * limit, 3.0e38, -3.0e38])
    x[1, :] = limit * 2
    with torch.no_grad():
        out = lin(x)
        clamped = lin(x.clamp(-limit, limit))
    assert torch.isfinite(out).all(), "inputs beyond ±448·scale must saturate, not become NaN/inf"
    assert torch.equal(out, clamped)
    q = quantize_e4m3(torch.tensor([1e30, -1e30, 5.0]), torch.tensor(1.0))
    assert q.float().tolist() == [448.0, -448.0, 5.0]


def test_zero_amax_uses_unit_scale_like_modelopt():
    w = torch.randn(16, 16)
    lin = FP8Linear.from_amax(w, torch.tensor(0.0), torch.tensor(0.0))
    assert lin.weight_scale.item() == pytest.approx(1 / 448) and lin.input_scale.item() == pytest.approx(1 / 448)


def _loaded(model: nn.Module) -> LoadedModel:
    return LoadedModel(spec="net", model=model, input_names=["x"], output_names=["output"],
                       example_inputs={"x": torch.randn(2, 3, 32)})


def test_runner_interface_on_cpu():
    model = _quantized()
    reference = copy.deepcopy(model)
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    assert isinstance(runner, Runner) and runner.name == "torch-fp8"
    assert runner.converted == 4
    assert {n for n, _ in runner.skipped} == {"int8_proj", "odd", "head"}
    x = _data(1, seed=5)[0]
    out = runner.run({"x": x})
    assert set(out) == {"output"} and out["output"].device.type == "cpu" and out["output"].shape == (4, 5, 16)
    with torch.no_grad():
        want = reference(x)
    assert _cos(out["output"], want) >= 0.99999


def test_runner_refuses_a_model_without_fp8_layers():
    with pytest.raises(InputError, match="no static per-tensor FP8"):
        TorchFP8Runner(_loaded(Net()), compile=False, device="cpu")


def test_repeated_blocks_are_the_transformer_layers():
    model = Net()
    assert repeated_blocks(model) == list(model.blocks)
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4))) == []


# ---------------------------------------------------------------------------------------------
# Horizontal fusion: q/k/v and gate/up as one GEMM each


class AttnMLP(nn.Module):
    """Sibling projections as transformer code calls them: q/k/v of one tensor, gate/up of another."""

    def __init__(self, d: int = 32, kv: int = 16):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv), nn.Linear(kv, d)
        self.gate, self.up = nn.Linear(d, 64, bias=False), nn.Linear(d, 64, bias=False)
        self.down = nn.Linear(64, d, bias=False)

    def forward(self, x):
        scores = torch.softmax(self.q(x)[..., :16] @ self.k(x).transpose(-1, -2), dim=-1)
        x = x + self.o(scores @ self.v(x))
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


class Stack(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([AttnMLP() for _ in range(n)])
        self.twice = nn.Linear(32, 32)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.twice(self.twice(x))  # called twice: never fused


def _quantized_stack(dtype: torch.dtype = torch.float32) -> Stack:
    torch.manual_seed(0)
    model = Stack().to(dtype).eval()
    data = [x.to(dtype) for x in _data()]
    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), lambda m: [m(x) for x in data])
    return model


SIBLINGS = [[f"layers.{i}.{n}" for n in names] for i in (0, 1) for names in (("q", "k", "v"), ("gate", "up"))]


def test_fusion_finds_siblings_reading_one_tensor():
    from quantkit.runtime.fusion import shared_input_groups

    model = Stack().eval()
    groups = shared_input_groups(model, lambda: model(torch.randn(2, 3, 32)), lambda m: type(m) is nn.Linear)
    assert groups == SIBLINGS


def test_fused_fp8_groups_compute_what_the_separate_layers_compute():
    model = _quantized_stack()
    separate = copy.deepcopy(model)
    convert_to_fp8(separate)
    x = _data(1, seed=6)[0]
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    assert runner.fuse({"x": x}) == SIBLINGS
    q = model.layers[0].q
    fused = q.group.fused
    assert isinstance(fused, FP8Linear) and fused.weight.shape == (64, 32) and fused.weight_scale.shape == (64,)
    # each joined layer keeps its own weight scale (row-wise), the input is quantized once
    assert torch.equal(fused.weight_scale[:32], separate.layers[0].q.weight_scale.expand(32))
    assert torch.equal(fused.weight_scale[32:48], separate.layers[0].k.weight_scale.expand(16))
    assert torch.equal(fused.weight[48:], separate.layers[0].v.weight)
    assert isinstance(model.twice, FP8Linear), "a layer called twice is left alone"
    with torch.no_grad():
        want = separate(x)
    got = runner.run({"x": x})["output"]
    assert got.shape == want.shape == (4, 5, 32)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"max abs error {err}"
    # the group holds no activations between forwards
    assert q.group.last_input is None and q.group.outputs is None


def test_fused_members_stay_right_in_any_call_order():
    model = _quantized_stack()
    separate = copy.deepcopy(model)
    convert_to_fp8(separate)
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    runner.fuse({"x": _data(1)[0]})
    a, b = torch.randn(6, 32), torch.randn(6, 32)
    layer, ref = model.layers[1], separate.layers[1]
    with torch.no_grad():
        for member, x in ((layer.v, a), (layer.q, b), (layer.k, a), (layer.v, b), (layer.k, a)):
            name = member.original_name.rpartition(".")[2]
            want = getattr(ref, name)(x)
            assert (member(x) - want).abs().max().item() <= 1e-5 * want.abs().max().item(), name
        assert layer.q.group.last_input is a, "out of order, the last input is still cached..."
        layer(torch.randn(2, 3, 32))
    assert layer.q.group.last_input is None and layer.gate.group.outputs is None, "...until the parent's forward ends"
    assert layer.k.weight.shape == (16, 32) and layer.k.weight.dtype == FP8_DTYPE, "members show their rows of the weight"


def test_fused_groups_in_bf16_and_compile_before_the_first_batch():
    """BF16 output takes _scaled_mm's row-wise path where the build has it (FP32 output the per-tensor
    GEMM + column scales, above); asking to compile before any batch compiles after the fusion."""
    model = _quantized_stack(torch.bfloat16)
    compiled_model = copy.deepcopy(model)
    separate = copy.deepcopy(model)
    convert_to_fp8(separate)
    x = _data(1, seed=8)[0].to(torch.bfloat16)
    with torch.no_grad():
        want = separate(x)
    eager = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    got = eager.run({"x": x})["output"]
    assert eager.fused == SIBLINGS and got.dtype == torch.bfloat16
    assert _cos(got, want) >= 0.9999, _cos(got, want)
    runner = TorchFP8Runner(_loaded(compiled_model), compile=False, device="cpu")
    runner.compile()
    assert not runner.compiled and runner.fused is None
    got = runner.run({"x": x})["output"]
    assert runner.fused == SIBLINGS and runner.compiled
    # compiled BF16 rounds elsewhere than eager, and FP8 roundings flip with it: same model, not bit-equal
    assert torch.isfinite(got).all() and _cos(got, want) >= 0.999, _cos(got, want)


def test_fused_group_is_one_gemm_when_compiled():
    from torch._inductor.utils import run_and_get_code

    from quantkit.runtime.fusion import fuse_bf16_linears

    torch.manual_seed(0)
    layer = AttnMLP().eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        want = layer(x)
    assert fuse_bf16_linears(layer, lambda: layer(x)) == [["q", "k", "v"], ["gate", "up"]]
    torch._dynamo.reset()
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(layer), x)
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    # q/k/v, o, gate/up, down: four GEMMs instead of seven (bias GEMMs are addmm)
    assert code[0].count("extern_kernels.mm(") + code[0].count("extern_kernels.addmm(") == 4, code[0]


def test_bf16_baseline_fuses_a_transformers_decoder_the_same_way():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.runtime.fusion import fuse_bf16_linears

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    groups = fuse_bf16_linears(model, lambda: model(input_ids=ids))
    assert groups == [names for i in (0, 1) for names in ([f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"],
                                                          [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")])]
    assert model.model.layers[0].self_attn.q_proj.group.fused.weight.shape == (64 + 32 + 32, 64)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


# ---------------------------------------------------------------------------------------------
# Gated MLPs: act(gate) * up and its FP8 quantization in one pass (quantkit/runtime/gated_mlp.py)


class GatedMLP(nn.Module):
    """The Llama / Gemma MLP, with variants that must not be taken for it."""

    def __init__(self, d: int = 32, ffn: int = 64, act=F.silu, variant: str = "plain"):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.act, self.variant = act, variant

    def forward(self, x):
        if self.variant == "up first":
            return self.down_proj(self.up_proj(x) * self.act(self.gate_proj(x)))
        h = self.act(self.gate_proj(x)) * self.up_proj(x)
        if self.variant == "scaled":  # something more than the gated MLP: not replaced
            return self.down_proj(h * 0.5)
        if self.variant == "residual":
            return x + self.down_proj(h)
        return self.down_proj(h)


class MLPStack(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList([GatedMLP(**kw) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _quantized_mlps(dtype=torch.bfloat16, **kw) -> MLPStack:
    torch.manual_seed(0)
    model = MLPStack(**kw).to(dtype).eval()
    data = [x.to(dtype) for x in _data()]
    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), lambda m: [m(x) for x in data])
    return model


@pytest.mark.parametrize("act, act_name, variant, gate_index", [
    (F.silu, "silu", "plain", 0),
    (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh", "plain", 0),
    (F.gelu, "gelu", "up first", 1),
])
def test_gated_mlp_runs_as_one_module_bit_equal_to_the_fp8_layers(act, act_name, variant, gate_index):
    from quantkit.runtime.gated_mlp import FP8GatedMLP, GatedMLPSite

    model = _quantized_mlps(act=act, variant=variant)
    plain = TorchFP8Runner(_loaded(copy.deepcopy(model)), compile=False, device="cpu", fuse_mlp=False)
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    x = _data(1, seed=3)[0].to(torch.bfloat16)
    want = plain.run({"x": x})["output"]
    got = runner.run({"x": x})["output"]
    assert runner.gated_mlps == [GatedMLPSite(f"layers.{i}", "down_proj", act_name, gate_index) for i in (0, 1)]
    mlp = model.layers[0]
    assert isinstance(mlp, FP8GatedMLP) and mlp.gate_up.weight.shape == (128, 32) and mlp.sizes == [64, 64]
    assert plain.gated_mlps == [] and got.dtype == want.dtype == torch.bfloat16 and got.shape == (4, 5, 32)
    # the same roundings as the separate ops (act, product, quantization): the same bits out
    assert torch.equal(got, want), (got - want).abs().max()
    other = _data(1, seed=4)[0].to(torch.bfloat16)
    assert torch.equal(runner.run({"x": other})["output"], plain.run({"x": other})["output"])


def test_interleave_gate_up_puts_each_gate_block_beside_its_up_block():
    from quantkit.runtime.gated_mlp import interleave_gate_up

    joined = torch.arange(16).reshape(8, 2)  # rows 0-3 one half, rows 4-7 the other
    assert interleave_gate_up(joined, 0, 2)[:, 0].tolist() == [0, 2, 8, 10, 4, 6, 12, 14]
    assert interleave_gate_up(joined, 1, 2)[:, 0].tolist() == [8, 10, 0, 2, 12, 14, 4, 6]
    fp8 = (torch.arange(8, dtype=torch.float32) / 4).to(torch.float8_e4m3fn)
    out = interleave_gate_up(fp8, 0, 2)
    assert out.dtype == torch.float8_e4m3fn and out.float().tolist() == [0, 0.25, 1, 1.25, 0.5, 0.75, 1.5, 1.75]


@pytest.mark.parametrize("gate_index, variant", [(0, "plain"), (1, "up first")])
def test_gated_mlp_with_its_weight_interleaved_for_the_gemm_epilogue_gives_the_same_bits(gate_index, variant):
    # On CPU the interleaved module runs the torch path over the block layout; on Hopper the same layout
    # feeds the gated GEMM (tests/gpu/test_torch_fp8.py). Either way: the bits of the separate layers.
    from quantkit.runtime.gated_mlp import gemm_epilogue_reason

    model = _quantized_mlps(variant=variant, act=F.silu if gate_index == 0 else F.gelu)
    runner = TorchFP8Runner(_loaded(copy.deepcopy(model)), compile=False, device="cpu")
    x = _data(1, seed=3)[0].to(torch.bfloat16)
    want = runner.run({"x": x})["output"]
    mlp = runner.model.layers[0]
    before = mlp.gate_up.weight.view(torch.uint8).clone()
    assert mlp.interleave == 0 and gemm_epilogue_reason(mlp.gate_up, 16) is not None  # not on CPU: not interleaved
    for layer in runner.model.layers:
        layer.use_gemm_epilogue(16)
    after = mlp.gate_up.weight.view(torch.uint8)
    assert mlp.interleave == 16 and after.shape == before.shape == (128, 32)
    gate = before[:64] if gate_index == 0 else before[64:]
    up = before[64:] if gate_index == 0 else before[:64]
    assert torch.equal(after[:16], gate[:16]) and torch.equal(after[16:32], up[:16])
    assert torch.equal(after[32:48], gate[16:32])
    got = runner.run({"x": x})["output"]
    assert got.shape == (4, 5, 32) and torch.equal(got, want)


@pytest.mark.parametrize("variant", ["scaled", "residual"])
def test_an_mlp_doing_more_than_the_gated_mlp_stays_as_it_is(variant):
    from quantkit.runtime.fusion import FusedMember

    model = _quantized_mlps(variant=variant)
    reference = TorchFP8Runner(_loaded(copy.deepcopy(model)), compile=False, device="cpu", fuse_mlp=False)
    runner = TorchFP8Runner(_loaded(model), compile=False, device="cpu")
    x = _data(1, seed=5)[0].to(torch.bfloat16)
    got = runner.run({"x": x})["output"]
    assert runner.gated_mlps == [] and len(runner.fused) == 2, "gate/up still joined, the MLP left as it is"
    assert isinstance(model.layers[0].gate_proj, FusedMember)
    assert torch.equal(got, reference.run({"x": x})["output"])


def test_transformers_llama_mlps_are_found():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        mtq.quantize(model, build_quant_config(make_plan(model, RECIPE)), lambda m: [m(input_ids=t) for t in ids])
    loaded = LoadedModel(spec="llama", model=model, input_names=["input_ids"], output_names=["logits"],
                         example_inputs={"input_ids": ids[0]})
    plain = TorchFP8Runner(dataclasses.replace(loaded, model=copy.deepcopy(model)), compile=False, device="cpu",
                           fuse_mlp=False)
    runner = TorchFP8Runner(loaded, compile=False, device="cpu")
    got = runner.run({"input_ids": ids[1]})["logits"]
    assert [(s.name, s.down, s.act) for s in runner.gated_mlps] == [
        (f"model.layers.{i}.mlp", "down_proj", "silu") for i in (0, 1)]
    assert torch.equal(got, plain.run({"input_ids": ids[1]})["logits"])


# ---------------------------------------------------------------------------------------------
# FP8 attention (quantkit/runtime/fp8_attention.py): where it is switched on, and what it is handed


def _llama_quantized(recipe: str):
    import quantkit
    from quantkit.calib import builtin_set
    from quantkit.models import load_model

    llama = load_model("llama-tiny")
    return quantkit.quantize(llama, recipe, calibration=builtin_set(llama).subset(range(6)), per_layer=False,
                             device="cpu")


def test_fp8_attention_takes_the_fp8_recipes_attention_with_the_call_as_the_model_makes_it():
    """Under `fp8` (Q, K, V, P in FP8) every attention gets the kernel call; on the CPU it declines
    (no Triton, no CUDA) and the fake-quant path gives the same bytes as without it."""
    from quantkit.attention_math import ATTENTION_KERNEL
    from quantkit.runtime.fp8_attention import FP8AttentionCall

    with _llama_quantized("fp8") as qm:
        plain = TorchFP8Runner(dataclasses.replace(qm.loaded, model=copy.deepcopy(qm.model)), compile=False,
                               device="cpu", fp8_attention=False)
        runner = TorchFP8Runner(qm.loaded, compile=False, device="cpu")
        names = [f"model.layers.{i}.self_attn" for i in range(4)]
        assert runner.fp8_attention == names and plain.fp8_attention == []
        seen = []
        for name in names:
            module = qm.model.get_submodule(name)
            call = getattr(module, ATTENTION_KERNEL)
            assert isinstance(call, FP8AttentionCall)

            def spy(module, q, k, v, mask, causal, kwargs, call=call):
                seen.append((tuple(q.shape), tuple(k.shape), mask is None, causal, kwargs.get("scaling")))
                return call(module, q, k, v, mask, causal, kwargs)

            setattr(module, ATTENTION_KERNEL, spy)
        ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37]])
        runner.fuse({"input_ids": ids})  # the probe forwards of the first batch
        seen.clear()
        got = runner.run({"input_ids": ids})["logits"]
        # llama-tiny: 8 heads and 4 KV heads of 32; plain causal attention, so no mask is materialized
        assert seen == [((1, 8, 10, 32), (1, 4, 10, 32), True, True, 32 ** -0.5)] * 4
        assert all(getattr(qm.model.get_submodule(n), ATTENTION_KERNEL) is not None for n in names)
        assert torch.equal(got, plain.run({"input_ids": ids})["logits"])
        # a padded batch brings a mask: the kernel is handed it and declines
        seen.clear()
        runner.run({"input_ids": torch.cat([ids, ids]), "attention_mask": torch.tensor([[1] * 10, [1] * 7 + [0] * 3])})
        assert [s[2] for s in seen] == [False] * 4


def test_fp8_attention_is_off_where_the_recipe_leaves_attention_alone():
    from quantkit.runtime.fp8_attention import fp8_attention_reason

    with _llama_quantized("fp8") as qm:
        attn = qm.model.model.layers[0].self_attn
        assert fp8_attention_reason(attn) is None
        attn.p_bmm_quantizer.disable()
        assert fp8_attention_reason(attn) == "p_bmm quantizer disabled"
        assert fp8_attention_reason(qm.model.model.layers[0].mlp) == "no attention quantizers"
