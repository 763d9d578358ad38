"""The plan (rule ordering, types, fallbacks, coverage) and its compilation to a ModelOpt config."""

import warnings

import pytest
import torch
from torch import nn

from quantkit.errors import PlanError
from quantkit.modelopt_config import build_quant_config, quantizer_cfg
from quantkit.plan import make_plan
from quantkit.recipe import Precision, load_recipe, recipe_from_dict


class Block(nn.Module):
    def __init__(self, d=32, ff=64):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.o_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, ff)
        self.mlp.down_proj = nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.self_attn.o_proj(self.self_attn.q_proj(self.norm(x)))
        return x + h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Toy(nn.Module):
    """11 blocks so that layers.1 and layers.10 both exist."""

    def __init__(self, n=11, d=32):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.odd = nn.Linear(d, 20)  # in_features 32, but next layer's 20 is not a multiple of 16
        self.odd_in = nn.Linear(20, d)
        self.patch = nn.Conv2d(3, 8, 2)
        self.lm_head = nn.Linear(d, 100)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        x = x + self.odd_in(self.odd(x))
        return self.lm_head(x)


def recipe(rules, **kw):
    return recipe_from_dict({"name": "t", "rules": rules, **kw})


def test_last_matching_rule_wins():
    r = recipe([{"types": ["Linear"], "precision": "fp8"}, {"match": "*.mlp", "precision": "int8"}])
    plan = make_plan(Toy(), r)
    assert plan.layer("layers.0.mlp.up_proj").precision == Precision.INT8
    assert plan.layer("layers.0.mlp.up_proj").rule.startswith("rules[1]")
    assert plan.layer("layers.0.self_attn.q_proj").precision == Precision.FP8
    # reversed order: the broad rule now wins everywhere
    r2 = recipe([{"match": "*.mlp", "precision": "int8"}, {"types": ["Linear"], "precision": "fp8"}])
    plan2 = make_plan(Toy(), r2)
    assert plan2.layer("layers.0.mlp.up_proj").precision == Precision.FP8
    assert any("rules[0]" in w and "later rules override" in w for w in plan2.warnings)


def test_layers_1_does_not_catch_layers_10():
    plan = make_plan(Toy(), recipe([{"match": "layers.1", "types": ["Linear"], "precision": "fp8"}]))
    hits = {row.name.split(".")[1] for row in plan.layers if row.precision == Precision.FP8}
    assert hits == {"1"}
    assert len([r for r in plan.layers if r.precision == Precision.FP8]) == 4


def test_type_filter_and_default():
    plan = make_plan(Toy(), recipe([{"types": ["Embedding"], "precision": "fp16"}], default="fp8"))
    assert plan.layer("embed_tokens").precision == Precision.FP16
    assert plan.layer("layers.3.mlp.down_proj").precision == Precision.FP8
    assert plan.layer("layers.3.mlp.down_proj").rule == "default"
    assert plan.layer("patch").kind == "conv"


def test_nvfp4_shape_fallback_is_stated():
    plan = make_plan(Toy(), recipe([{"types": ["Linear"], "precision": "nvfp4", "fallback": "fp8"}]))
    row = plan.layer("odd_in")
    assert row.precision == Precision.FP8 and row.weights == Precision.FP8
    assert "in_features % 16 == 0, this layer has 20" in row.note
    assert plan.layer("odd").precision == Precision.NVFP4
    assert any(w.startswith("odd_in: falls back to fp8") for w in plan.warnings)
    # no fallback stated: the layer is left unquantized, and the plan says so
    plan2 = make_plan(Toy(), recipe([{"types": ["Linear"], "precision": "nvfp4"}]))
    assert plan2.layer("odd_in").precision == Precision.SKIP


def test_quantized_embedding_falls_back():
    plan = make_plan(Toy(), recipe([{"types": ["Embedding"], "precision": "fp8", "fallback": "fp16"}]))
    assert plan.layer("embed_tokens").precision == Precision.FP16
    assert "not an embedding" in plan.layer("embed_tokens").note


def test_unmatched_rules_warn_and_strict_fails():
    r = recipe([{"match": "*.ffn.*", "precision": "fp8"}, {"match": "*.conv_out", "precision": "fp8", "optional": True}])
    plan = make_plan(Toy(), r)
    assert plan.unmatched_rules == ["rules[0] (*.ffn.*) matched no layer"]
    assert any("rules[0] (*.ffn.*) matched no layer" in w for w in plan.warnings)
    with pytest.raises(PlanError, match=r"rules\[0\] \(\*\.ffn\.\*\) matched no layer \(--strict\)"):
        make_plan(Toy(), r, strict=True)


def test_balanced_on_toy_exact_assignment():
    plan = make_plan(Toy(n=2), load_recipe("balanced"))
    got = {r.name: str(r.precision) for r in plan.layers}
    assert got == {
        "embed_tokens": "fp16",
        "layers.0.self_attn.q_proj": "fp8", "layers.0.self_attn.o_proj": "fp8",
        "layers.0.mlp.up_proj": "nvfp4", "layers.0.mlp.down_proj": "nvfp4",
        "layers.1.self_attn.q_proj": "fp8", "layers.1.self_attn.o_proj": "fp8",
        "layers.1.mlp.up_proj": "nvfp4", "layers.1.mlp.down_proj": "nvfp4",
        "odd": "skip", "odd_in": "skip", "patch": "skip", "lm_head": "fp16",
    }
    cov = plan.coverage()
    assert cov["by_precision"]["nvfp4"]["layers"] == 4
    assert cov["by_precision"]["nvfp4"]["params"] == 2 * (32 * 64 + 64 + 64 * 32 + 32)
    assert cov["by_precision"]["fp8"]["layers"] == 4
    assert cov["weight_bytes_before"] == 4 * cov["total_params"]


def test_quant_config_is_exact_per_layer():
    plan = make_plan(Toy(n=2), recipe([{"match": "*.mlp", "types": ["Linear"], "precision": "int8"},
                                       {"match": "*q_proj", "precision": "nvfp4", "activations": "fp8"}]))
    cfg = build_quant_config(plan)
    entries = cfg["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    by_name = {e["quantizer_name"]: e.get("cfg") for e in entries[1:]}
    assert by_name["layers.0.mlp.up_proj.weight_quantizer"] == {"num_bits": 8, "axis": 0}
    assert by_name["layers.0.mlp.up_proj.input_quantizer"] == {"num_bits": 8, "axis": None}
    assert by_name["layers.1.self_attn.q_proj.weight_quantizer"]["block_sizes"] == {-1: 16, "type": "dynamic",
                                                                                   "scale_bits": (4, 3)}
    assert by_name["layers.1.self_attn.q_proj.input_quantizer"] == {"num_bits": (4, 3), "axis": None}
    assert len(entries) == 1 + 2 * 6
    assert cfg["algorithm"] == {"method": "max"}
    assert quantizer_cfg(Precision.FP8, "weight") == {"num_bits": (4, 3), "axis": None}


def _calibrate(model, cfg):
    import modelopt.torch.quantization as mtq

    torch.manual_seed(0)
    batches = [torch.randint(0, 100, (2, 8)) for _ in range(3)]

    def loop(m):
        for b in batches:
            m(b)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, loop)
    return model


def _cpu_part(cfg):
    """Keep the FP8/INT8 entries; NVFP4 on the CPU is covered by the NVFP4-without-CUDA tests."""
    keep = [e for e in cfg["quant_cfg"] if "block_sizes" not in (e.get("cfg") or {})]
    return {**cfg, "quant_cfg": keep}


@pytest.mark.parametrize("name", ["balanced", "fp8", "nvfp4", "int8-smoothquant", "fp16"])
def test_shipped_recipe_configs_pass_mtq_quantize(name):
    from modelopt.torch.quantization.nn import TensorQuantizer

    torch.manual_seed(0)
    model = Toy(n=2).eval()
    plan = make_plan(model, load_recipe(name))
    cfg = _cpu_part(build_quant_config(plan))
    _calibrate(model, cfg)
    modules = dict(model.named_modules())
    expected = {e["quantizer_name"] for e in cfg["quant_cfg"][1:]}
    enabled = {n for n, m in modules.items() if isinstance(m, TensorQuantizer) and m.is_enabled}
    assert enabled == expected
    for qname in expected:
        amax = modules[qname].amax
        assert amax is not None and torch.all(amax > 0), qname
    if name == "fp16":
        assert enabled == set()


def test_balanced_puts_fused_qkv_projections_in_fp8():
    # ViT/DiT blocks often fuse q, k and v into one `qkv` Linear outside any module named attn.
    block = nn.Module()
    block.qkv, block.mlp = nn.Linear(32, 96), nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    model = nn.Module()
    model.blocks = nn.ModuleList([block])
    rows = {r.name: str(r.precision) for r in make_plan(model, load_recipe("balanced")).layers}
    assert rows == {"blocks.0.qkv": "fp8", "blocks.0.mlp.0": "nvfp4", "blocks.0.mlp.2": "nvfp4"}


def test_linear_rules_cover_gpt2_conv1d():
    # transformers' GPT-2 Conv1D is a linear layer (weight stored (in, out)); `types: [Linear]` must reach it,
    # or balanced quantizes nothing of GPT-2 but its attention matmuls.
    from transformers.pytorch_utils import Conv1D

    block = nn.Module()
    block.attn, block.mlp = nn.Module(), nn.Module()
    block.attn.c_attn, block.mlp.c_fc, block.mlp.c_proj = Conv1D(96, 32), Conv1D(128, 32), Conv1D(32, 128)
    model = nn.Module()
    model.h = nn.ModuleList([block])
    plan = make_plan(model, load_recipe("balanced"))
    rows = {r.name: str(r.precision) for r in plan.layers}
    assert rows == {"h.0.attn.c_attn": "fp8", "h.0.mlp.c_fc": "nvfp4", "h.0.mlp.c_proj": "nvfp4"}
    assert next(r for r in plan.layers if r.name == "h.0.mlp.c_proj").shape == [128, 32]  # (in, out) as stored
