"""Layer roles from structure (quantkit.roles), rules that select by role, shared weights in the plan."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from quantkit import ptq
from quantkit.errors import RecipeError
from quantkit.plan import make_plan
from quantkit.recipe import load_recipe, recipe_from_dict
from tests import families

warnings.filterwarnings("ignore")


def _rows(plan):
    return {r.name: r for r in plan.layers}


# ---------------------------------------------------------------------------------------------
# Naming (failure class 6): the shipped recipes reach FFNs and attention whatever they are called


def test_balanced_quantizes_transformer_encoder_layer_ffn_named_linear1_linear2():
    loaded = families.act_policy()
    plan = ptq.prepare(loaded, load_recipe("balanced"))
    rows = _rows(plan)
    for block in ("encoder.layers.0", "encoder.layers.1", "decoder.layers.0"):
        assert (rows[f"{block}.linear1"].role, str(rows[f"{block}.linear1"].precision)) == ("mlp_up", "nvfp4")
        assert (rows[f"{block}.linear2"].role, str(rows[f"{block}.linear2"].precision)) == ("mlp_down", "nvfp4")
        assert (rows[f"{block}.self_attn.out_proj"].role, str(rows[f"{block}.self_attn.out_proj"].precision)) == (
            "attention_out", "fp8")
    assert (rows["action_head"].role, str(rows["action_head"].precision)) == ("head", "fp16")
    assert rows["state_proj"].role == "conditioning"  # reads only the robot state, never the image
    assert not any("matched no layer" in w for w in plan.warnings), plan.warnings


def test_balanced_quantizes_diffusers_ff_net_and_keeps_conditioning_wide():
    loaded = families.dit()
    plan = ptq.prepare(loaded, load_recipe("balanced"))
    rows = _rows(plan)
    for i in (0, 1):
        b = f"dit.transformer_blocks.{i}"
        assert (rows[f"{b}.ff.net.0.proj"].role, str(rows[f"{b}.ff.net.0.proj"].precision)) == ("mlp_up", "nvfp4")
        assert (rows[f"{b}.ff.net.2"].role, str(rows[f"{b}.ff.net.2"].precision)) == ("mlp_down", "nvfp4")
        for proj, role in (("to_q", "attention_q"), ("to_k", "attention_k"), ("to_v", "attention_v"),
                           ("to_out.0", "attention_out")):
            assert (rows[f"{b}.attn1.{proj}"].role, str(rows[f"{b}.attn1.{proj}"].precision)) == (role, "fp8")
        assert (rows[f"{b}.norm1.linear"].role, str(rows[f"{b}.norm1.linear"].precision)) == ("conditioning", "fp16")
    assert rows["dit.proj_out_1"].role == "conditioning" and rows["dit.proj_out_2"].role == "head"
    assert rows["dit.pos_embed.proj"].role == "conv" and str(rows["dit.pos_embed.proj"].precision) == "skip"
    assert plan.roles_not_inferred() == []


def test_siglip_attention_pooling_head_is_attention_and_mlp_not_an_output_head():
    loaded = families.siglip_vision()
    rows = _rows(ptq.prepare(loaded, load_recipe("balanced")))
    assert (rows["head.attention.out_proj"].role, str(rows["head.attention.out_proj"].precision)) == (
        "attention_out", "fp8")
    for fc, role in (("fc1", "mlp_up"), ("fc2", "mlp_down")):
        assert (rows[f"head.mlp.{fc}"].role, str(rows[f"head.mlp.{fc}"].precision)) == (role, "nvfp4")
    assert not any(r.role == "head" for r in rows.values())


def test_roles_of_paligemma_and_how_they_were_found():
    loaded = families.paligemma()
    plan = ptq.prepare(loaded, load_recipe("balanced"))
    rows = _rows(plan)
    assert rows["model.multi_modal_projector.linear"].role == "projector"
    assert "between two stacks of blocks" in rows["model.multi_modal_projector.linear"].role_how
    assert rows["lm_head"].role == "head" and "tied" in rows["lm_head"].role_how
    t = "model.language_model.layers.0"
    assert [rows[f"{t}.mlp.{p}"].role for p in ("gate_proj", "up_proj", "down_proj")] == [
        "mlp_gate", "mlp_up", "mlp_down"]
    assert [rows[f"{t}.self_attn.{p}"].role for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        "attention_q", "attention_k", "attention_v", "attention_out"]
    d = plan.to_dict()
    assert d["roles_not_inferred"] == [] and d["layers"][0]["role_how"]


def test_roles_come_from_structure_not_names():
    """Renamed layers (nothing says attn/mlp/head) get the same roles from the probe forward."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            q, k, v = self.a(x), self.b(x), self.c(x)
            return self.d(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix, self.w_in, self.w_out = Attn(), nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            x = x + self.mix(x)
            return x + self.w_out(torch.relu(self.w_in(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([Block(), Block()])
            self.z = nn.Linear(32, 10)

        def forward(self, x):
            for b in self.stack:
                x = b(x)
            return self.z(x)

    model = Net().eval()
    plan = make_plan(model, load_recipe("balanced"), example={"x": torch.randn(2, 5, 32)})
    got = {r.name: (r.role, str(r.precision)) for r in plan.layers}
    assert got["stack.0.mix.a"] == ("attention_q", "fp8") and got["stack.1.mix.c"] == ("attention_v", "fp8")
    assert got["stack.0.mix.d"] == ("attention_out", "fp8")
    assert got["stack.0.w_in"] == ("mlp_up", "nvfp4") and got["stack.0.w_out"] == ("mlp_down", "nvfp4")
    assert got["z"] == ("head", "fp16")


def test_head_after_blocks_that_are_attention_sites_is_the_head():
    """A block whose own forward computes the attention (so the whole block is the attention site) and
    then its MLP: the linear reading the last block's output is the head, not attention_out, and the
    block's MLP is MLP."""
    from tests.test_export import TinyModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyModel().eval()
    plan = make_plan(model, load_recipe("balanced"), example={"x": torch.randn(2, 8, 32)})
    got = {r.name: (r.role, str(r.precision)) for r in plan.layers}
    for b in ("blocks.0", "blocks.1"):
        assert got[f"{b}.q_proj"] == ("attention_q", "fp8") and got[f"{b}.o_proj"] == ("attention_out", "fp8")
        assert got[f"{b}.up"] == ("mlp_up", "nvfp4") and got[f"{b}.down"] == ("mlp_down", "nvfp4"), got
    assert got["head"] == ("head", "fp16"), got["head"]


class _WholeBlock(nn.Module):
    """A hand-written transformer block (robot-policy / DiT style): one forward runs q/k/v, the attention,
    its output projection and the MLP, so the whole block is the attention site. Names that say nothing
    (a..f): the roles must come from the structure."""

    def __init__(self, sdpa: bool, d: int = 32, heads: int = 4):
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.a, self.b, self.c, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.e, self.f = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        n, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(n, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.a, self.b, self.c))
        if self.sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / (d // self.heads) ** 0.5, dim=-1), v)
        x = x + self.proj(o.transpose(1, 2).reshape(n, t, d))
        return x + self.f(torch.nn.functional.gelu(self.e(self.norm2(x))))


class _WholeBlockNet(nn.Module):
    def __init__(self, sdpa: bool):
        super().__init__()
        self.blocks = nn.ModuleList([_WholeBlock(sdpa), _WholeBlock(sdpa)])
        self.out = nn.Linear(32, 7)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.out(x)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "matmul-softmax"])
def test_whole_block_site_keeps_its_mlp_mlp(sdpa):
    """Until the probe followed what the attention computed, every linear called after q/k/v in such a
    block was attention_out: its MLP went FP8 under balanced instead of NVFP4."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _WholeBlockNet(sdpa).eval()
    plan = make_plan(model, load_recipe("balanced"), example={"x": torch.randn(2, 6, 32)})
    rows = _rows(plan)
    got = {n: (r.role, str(r.precision)) for n, r in rows.items()}
    for blk in ("blocks.0", "blocks.1"):
        assert [got[f"{blk}.{p}"] for p in ("a", "b", "c")] == [
            ("attention_q", "fp8"), ("attention_k", "fp8"), ("attention_v", "fp8")]
        assert got[f"{blk}.proj"] == ("attention_out", "fp8")
        assert "reads the attention's output" in rows[f"{blk}.proj"].role_how
        assert got[f"{blk}.e"] == ("mlp_up", "nvfp4") and got[f"{blk}.f"] == ("mlp_down", "nvfp4"), got
        assert rows[f"{blk}.e"].role_how == f"MLP in block {blk}: expands the hidden size (32 -> 128 ... 128 -> 32)"
    assert got["out"] == ("head", "fp16")
    assert plan.roles_not_inferred() == []


def test_attention_output_through_an_op_not_followed_keeps_every_later_linear_attention():
    """When what the attention computed reaches no linear through moves and casts (here a tanh), the
    linears after it in the site all stay attention_out, as before the probe followed the output."""

    class Site(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))
            self.e, self.f = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            q, k, v = self.a(x), self.b(x), self.c(x)
            x = x + self.d(torch.tanh(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v))
            return x + self.f(torch.relu(self.e(x)))

    from quantkit.roles import infer_roles

    roles, _ = infer_roles(nn.Sequential(Site()), {"input": torch.randn(2, 5, 16)})
    assert {n: r.role for n, r in roles.items()} == {
        "0.a": "attention_q", "0.b": "attention_k", "0.c": "attention_v", "0.d": "attention_out",
        "0.e": "attention_out", "0.f": "attention_out"}
    assert "no linear reads its output through reshapes and casts alone" in roles["0.e"].how


def test_rule_selects_by_role_beside_names():
    r = recipe_from_dict({"name": "t", "rules": [
        {"roles": ["mlp"], "precision": "fp8"},
        {"roles": "attention_out", "match": "*layers.1*", "precision": "int8"}]})
    loaded = families.llama_tied()
    rows = _rows(make_plan(loaded.model, r, example=loaded.example_inputs))
    assert str(rows["model.layers.0.mlp.down_proj"].precision) == "fp8"
    assert str(rows["model.layers.1.self_attn.o_proj"].precision) == "int8"
    assert str(rows["model.layers.0.self_attn.o_proj"].precision) == "skip"
    assert str(rows["model.layers.1.self_attn.q_proj"].precision) == "skip"
    assert rows["model.layers.1.self_attn.o_proj"].rule == "rules[1] (roles attention_out & *layers.1*)"


def test_unknown_role_is_a_recipe_error_naming_the_rule_and_the_valid_roles(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nrules:\n  - types: [Linear]\n    precision: fp8\n  - roles: [mlp, feedforward]\n"
                    "    precision: nvfp4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: rules[1].roles: 'feedforward' is not a layer role; valid roles: attention, mlp, "
                          "attention_q,"), msg
    assert "conditioning" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# Shared weights (failure class 1)


def test_tied_embedding_and_head_get_one_precision_and_calibration_runs():
    """fp8's FP16 head rule used to cast the tied embedding too: `expected m1 and m2 to have the same dtype`."""
    loaded = families.llama_tied()
    plan = ptq.prepare(loaded, load_recipe("fp8"))
    rows = _rows(plan)
    assert str(rows["lm_head"].precision) == str(rows["model.embed_tokens"].precision) == "fp16"
    assert plan.shared_weights == [{"layers": ["model.embed_tokens", "lm_head"], "precision": ["fp16"],
                                    "decided_by": "rules[1] (roles head [Linear])", "decided_by_layer": "lm_head"}]
    assert rows["lm_head"].shares_weight_with == ["model.embed_tokens"]
    assert any("share one weight but the recipe gives them fp16 / skip" in w for w in plan.warnings), plan.warnings
    with torch.no_grad():
        out = loaded.run(loaded.example_inputs)["logits"]
    assert out.dtype == torch.float32 and out.shape == (2, 12, 256) and torch.isfinite(out).all()
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_a_cast_never_changes_a_shared_weight_under_a_layer_that_keeps_it():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.out = nn.Linear(32, 50, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids))

    # out's rule (the later one) decides for both: INT8 for out (fake-quant keeps the FP32 tensor); the
    # embedding cannot be INT8 and its fallback would cast the shared tensor to FP16 under out.
    r = recipe_from_dict({"name": "t", "rules": [{"types": ["Embedding"], "precision": "fp16"},
                                                 {"match": ["out", "emb"], "precision": "int8", "fallback": "fp16"}]})
    plan = make_plan(Tied(), r)
    rows = _rows(plan)
    assert str(rows["out"].precision) == "int8"
    assert str(rows["emb"].precision) == "skip" and "a cast would change the weight it shares with out" in rows["emb"].note
    assert plan.shared_weights[0]["decided_by"] == "rules[1] (out,emb)"
    assert plan.shared_weights[0]["precision"] == ["int8", "skip"]


def test_low_rank_attention_projections_keep_an_attention_role():
    """DeepSeek's MLA projects q and kv through low-rank pairs (q_a_proj -> q_b_proj, kv_a_proj_with_mqa ->
    kv_b_proj) before the attention, none named like q/k/v: all four are the attention's input projections
    (balanced: FP8), not left without a role (the first of each pair had none before, the second was taken
    for an output projection)."""
    import transformers as T

    from quantkit.roles import infer_roles

    config = T.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16,
                                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, moe_intermediate_size=16,
                                n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(config).eval()
    roles, _ = infer_roles(model, {"input_ids": torch.randint(1, 60, (2, 8))})
    attn = "model.layers.0.self_attn"
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
        assert roles[f"{attn}.{name}"].role == "attention_qkv", (name, roles[f"{attn}.{name}"])
    assert roles[f"{attn}.o_proj"].role == "attention_out"
