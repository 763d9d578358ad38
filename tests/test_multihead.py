"""torch.nn.MultiheadAttention and nn.Transformer layers: projections exposed as Linear layers of the
plan, same outputs as torch, quantized attention matmuls, FP16 islands, no fused fast path in export."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from tests.tiny import example_generator, quantize_synthetic, seeded_model

warnings.filterwarnings("ignore")


def _pair(**kw):
    from quantkit import multihead

    torch.manual_seed(0)
    ref = nn.MultiheadAttention(**kw).eval()
    out = copy.deepcopy(ref)
    assert multihead.expose(out) and not multihead.expose(out)
    return ref, out


CASES = [
    dict(embed_dim=16, num_heads=2, batch_first=True),
    dict(embed_dim=16, num_heads=4, batch_first=False),
    dict(embed_dim=16, num_heads=2, batch_first=True, kdim=8, vdim=12),
    dict(embed_dim=16, num_heads=2, batch_first=True, add_bias_kv=True, add_zero_attn=True),
    dict(embed_dim=16, num_heads=2, batch_first=True, bias=False),
]


@pytest.mark.parametrize("kw", CASES)
def test_exposed_mha_matches_torch(kw):
    from quantkit import multihead

    ref, mha = _pair(**kw)
    assert isinstance(mha, nn.MultiheadAttention) and type(mha).__name__ == "MultiheadAttention"
    assert mha.in_proj_weight is None and mha.in_proj_bias is None
    assert [type(getattr(mha, p)).__name__ for p in multihead.PROJECTIONS] == ["Linear"] * 3
    assert mha.k_proj.in_features == kw.get("kdim", 16) and mha.v_proj.in_features == kw.get("vdim", 16)
    g = torch.Generator().manual_seed(1)
    bf = kw["batch_first"]
    q = torch.randn((2, 5, 16) if bf else (5, 2, 16), generator=g)
    k = torch.randn((2, 7, kw.get("kdim", 16)) if bf else (7, 2, kw.get("kdim", 16)), generator=g)
    v = torch.randn((2, 7, kw.get("vdim", 16)) if bf else (7, 2, kw.get("vdim", 16)), generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.randn(5, 7, generator=g)
    for extra in ({}, {"key_padding_mask": pad}, {"attn_mask": causal > 0.5}, {"attn_mask": causal},
                  {"need_weights": False, "key_padding_mask": pad}, {"average_attn_weights": False}):
        with torch.no_grad():
            (a, wa), (b, wb) = ref(q, k, v, **extra), mha(q, k, v, **extra)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (extra, (a - b).abs().max())
        assert (wa is None) == (wb is None)
        if wa is not None:
            assert wa.shape == wb.shape and torch.allclose(wa, wb, atol=1e-5)


def test_unbatched_input():
    ref, mha = _pair(embed_dim=16, num_heads=2)
    x = torch.randn(5, 16)
    with torch.no_grad():
        (a, wa), (b, wb) = ref(x, x, x), mha(x, x, x)
    assert a.shape == b.shape == (5, 16) and torch.allclose(a, b, atol=1e-5) and wb.shape == (5, 5)


def test_encoder_layer_takes_the_slow_path_and_calls_the_projections():
    from quantkit import multihead

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    ref = copy.deepcopy(layer)
    assert multihead.expose_projections(layer) == ["self_attn"]
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append("q"))
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        assert torch.allclose(ref(x), layer(x), atol=1e-5)
    assert calls == ["q"]  # the fused torch._transformer_encoder_layer_fwd would call no module


class ACTPolicy(nn.Module):
    """An ACT-style policy: nn.Transformer encoder/decoder over state tokens and learned queries."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(14, 32)
        self.transformer = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                                          dim_feedforward=64, batch_first=True, dropout=0.0)
        self.query = nn.Embedding(8, 32)
        self.action_head = nn.Linear(32, 14)

    def forward(self, state):
        tgt = self.query.weight.unsqueeze(0).expand(state.shape[0], -1, -1)
        return self.action_head(self.transformer(self.inp(state), tgt))


class PoolingHead(nn.Module):
    """SigLIP's attention-pooling head: a probe attends over the tokens through nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.probe = nn.Parameter(torch.randn(1, 1, 32))
        self.attention = nn.MultiheadAttention(32, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x):
        h = self.embed(x)
        pooled = self.attention(self.probe.expand(h.shape[0], -1, -1), h, h)[0]
        return self.mlp(pooled)[:, 0]


def act_policy():
    return seeded_model(f"{__file__}:act_policy", ACTPolicy,
                        {"state": torch.randn(1, 10, 14, generator=example_generator())}, ["output"])


def pooling_head():
    return seeded_model(f"{__file__}:pooling_head", PoolingHead,
                        {"x": torch.randn(1, 9, 16, generator=example_generator())}, ["output"])


HEAD_FP16 = """
name: head-fp16
default: skip
rules:
  - types: [Linear]
    precision: fp8
  - match: ["attention"]
    types: [Linear]
    precision: fp16
attention: {precision: skip}
"""


def test_fp16_rule_on_a_mha_casts_at_its_projections(tmp_path):
    """The FP16 rule that caught SigLIP's pooling head crashed with `mat1 and mat2 must have the same
    dtype` (torch's MHA reads out_proj.weight without calling out_proj): now each projection is an
    FP16 island with casts, and the whole model still runs in FP32 around it."""
    (tmp_path / "r.yaml").write_text(HEAD_FP16)
    loaded = pooling_head()
    result = quantize_synthetic(loaded, tmp_path / "r.yaml", per_layer=True)
    per_layer = {r["name"]: r["cosine"] for r in result.report["per_layer"]}
    assert set(per_layer) >= {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj"}
    assert per_layer["attention.q_proj"] > 0.999  # FP16 weights, nothing quantized
    rows = {r.name: str(r.precision) for r in result.plan.layers}
    assert rows == {"embed": "fp8", "attention.out_proj": "fp16", "attention.q_proj": "fp16",
                    "attention.k_proj": "fp16", "attention.v_proj": "fp16", "mlp.0": "fp8", "mlp.2": "fp8"}
    assert loaded.model.attention.q_proj.weight.dtype == torch.float16
    cos = result.report["metrics"]["fake-quant"]["output"]["cosine"]
    assert cos > 0.99, cos


def test_act_policy_fp8_quantizes_mha_and_exports(tmp_path):
    """nn.Transformer policy under fp8: q/k/v/out of every MHA are FP8 layers of the plan, the three
    attentions carry bmm quantizers, the export has no fused encoder kernel and the audit passes."""
    from quantkit import ptq
    from quantkit.export.audit import audit
    from quantkit.export.onnx_export import export_run

    loaded = act_policy()
    result = quantize_synthetic(loaded, "fp8")
    rows = {r.name: str(r.precision) for r in result.plan.layers}
    attn = [n for n in rows if ".self_attn." in n or ".multihead_attn." in n]
    assert len(attn) == 4 * 4 and all(rows[n] == "fp8" for n in attn), rows
    assert rows["transformer.encoder.layers.0.linear1"] == "fp8"
    conv = {a["name"]: a for a in result.plan.attention}
    assert sorted(conv) == ["transformer.decoder.layers.0.multihead_attn", "transformer.decoder.layers.0.self_attn",
                            "transformer.encoder.layers.0.self_attn", "transformer.encoder.layers.1.self_attn"]
    assert all(a["converted"] and sorted(a["quantizers"]) == ["k", "p", "q", "v"] for a in conv.values())
    assert result.report["metrics"]["fake-quant"]["output"]["cosine"] > 0.99
    out = tmp_path / "out"
    out.mkdir()
    ptq.save_run(result, out, loaded.spec, "fp32")
    export_run(out, trust_model_code=True)
    report = audit(out / "model.onnx", json.loads((out / "plan.json").read_text()))
    assert report.violations == []
    att = report.counts["attention_matmuls"]
    assert att == {"with_qdq": 8, "without_qdq": 0}, att
    assert report.counts["softmax"] == {"float32": 4}
    assert report.counts["compute_by_format"]["fp8"]["MatMul"] >= 4 * 4 + 4


def test_attention_quantizers_stay_on_the_model_that_converted_them():
    """Two models of one class in one process: the first (fp8, attention converted) still alive, the second
    quantized with fp16 (attention: skip). At c2c3e56 the registration for the first's class gave the
    second's MultiheadAttention bmm quantizers too; its saved state then failed to restore in a fresh
    process ('Unmatched keys in quantizer state_dict: ...attention.k_bmm_quantizer'; PaliGemma fp16)."""
    from quantkit import calib, ptq
    from quantkit.recipe import load_recipe

    first = pooling_head()
    done = ptq.quantize(first, load_recipe("fp8"), calib.synthetic_set(first, n=4, seed=0), batch_size=4,
                        per_layer=False)
    assert {n.rsplit(".", 1)[-1] for n, _ in first.model.named_modules() if n.startswith("attention.")} >= {
        "q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "p_bmm_quantizer"}
    second = pooling_head()
    ptq.quantize(second, load_recipe("fp16"), calib.synthetic_set(second, n=4, seed=0), batch_size=4,
                 per_layer=False)
    bmm = [n for n, _ in second.model.named_modules() if n.endswith("_bmm_quantizer")]
    assert bmm == []
    assert type(second.model.attention) is not type(first.model.attention)
    assert isinstance(second.model.attention, nn.MultiheadAttention)
    assert done.plan.attention and done.plan.attention[0]["converted"]
