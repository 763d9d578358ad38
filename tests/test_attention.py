"""Quantized attention: explicit Q·Kᵀ / P·V with ModelOpt quantizers, on CPU with FP8 fake quant."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

from quantkit.attention import attention_sites, convert_attention, verify_attention  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.protect import protect_model  # noqa: E402
from quantkit.recipe import AttentionSpec, ProtectSpec  # noqa: E402

FP8 = {"num_bits": (4, 3), "axis": None}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world.",
         "Quantization keeps models small and fast.", "A short one."]
FP8_ATTN = AttentionSpec(precision="fp8", quantize_softmax_output=True)


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def quant_cfg(model, conversions, skip=("lm_head",)):
    cfg = [{"quantizer_name": "*", "enable": False}]
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not any(s in name for s in skip):
            cfg.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": FP8})
            cfg.append({"quantizer_name": f"{name}.input_quantizer", "cfg": FP8})
    for c in conversions:
        cfg += [{"quantizer_name": q, "cfg": FP8} for q in c.quantizers.values()]
    return {"quant_cfg": cfg, "algorithm": "max"}


def set_quant(model, on: bool):
    """Quantizers stay enabled (quantkit's explicit path runs) but pass values through when off."""
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and m.is_enabled:
            m.enable_quant() if on else m.disable_quant()


def check_quantized_hf(spec: str, min_cos: float):
    loaded = load_model(spec)
    model = loaded.model
    inputs = loaded.tokenize(TEXTS)
    valid = inputs["attention_mask"].bool()
    out_name = loaded.output_names[0]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref = loaded.run(inputs)[out_name]
    protect_model(model, ProtectSpec())
    conversions = convert_attention(model, FP8_ATTN)
    assert conversions and all(c.converted and c.via == "quantkit" for c in conversions)
    assert all(set(c.quantizers) == {"q", "k", "v", "p"} for c in conversions)
    with torch.no_grad():
        mtq.quantize(model, quant_cfg(model, conversions), lambda m: loaded.run(inputs))
        out = loaded.run(inputs)[out_name]
    modules = dict(model.named_modules())
    # Linear layers: same names, now QuantLinear with an enabled weight quantizer.
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] == linear_names
    for n in linear_names:
        if "lm_head" not in n:
            assert type(modules[n]).__name__ == "QuantLinear", n
            assert modules[n].weight_quantizer.is_enabled, n
    for c in conversions:
        for role, qname in c.quantizers.items():
            q = modules[qname]
            assert isinstance(q, TensorQuantizer) and q.is_enabled and q.amax is not None, qname
    assert verify_attention(model, conversions) == []
    cos = cosine(ref[valid], out[valid])
    assert cos >= min_cos, f"{spec}: FP8 cosine {cos}"
    # Quantizers off: the explicit (eager, FP32-softmax) attention reproduces the SDPA reference.
    set_quant(model, False)
    with torch.no_grad():
        same = loaded.run(inputs)[out_name]
    set_quant(model, True)
    diff = (same - ref)[valid].abs().max().item()
    assert diff <= 1e-5, f"{spec}: explicit attention vs SDPA max diff {diff}"
    return loaded, conversions, out, inputs


def test_minilm_fp8_attention_padding_mask():
    check_quantized_hf("minilm", 0.99)


def test_llama_tiny_fp8_causal_gqa_and_restore(tmp_path):
    mto = pytest.importorskip("modelopt.torch.opt")
    loaded, conversions, out, inputs = check_quantized_hf("llama-tiny", 0.99)
    assert loaded.model.model.layers[0].self_attn.num_key_value_groups == 2  # GQA really exercised
    # An SDPA switch after quantization would bypass the quantizers: verify_attention says so.
    config = loaded.model.config
    config._attn_implementation = {"": "sdpa"}
    assert any("bypass" in p for p in verify_attention(loaded.model, conversions))
    config._attn_implementation = {"": "quantkit"}
    # mto.save / rebuild + protect + convert / mto.restore gives the same quantized model.
    mto.save(loaded.model, str(tmp_path / "state.pth"))
    again = load_model("llama-tiny")
    protect_model(again.model, ProtectSpec())
    convert_attention(again.model, FP8_ATTN)
    mto.restore(again.model, str(tmp_path / "state.pth"))
    with torch.no_grad():
        restored = again.run(inputs)["logits"]
    assert torch.equal(restored, out)
    assert verify_attention(again.model, conversions) == []


class SDPAAttention(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2, causal=True):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.causal = heads, kv_heads, dim, causal
        hd = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, hd * kv_heads)
        self.v = nn.Linear(dim, hd * kv_heads)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        hd = self.dim // self.heads
        q = self.q(x).view(b, n, self.heads, hd).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, hd).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, n, self.dim))


class EagerAttention(nn.Module):
    """Explicit attention, Q·Kᵀ with torch.matmul and P·V with @."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1)
        return self.o((probs @ v).transpose(1, 2).reshape(b, n, self.dim))


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.causal = SDPAAttention(causal=True)
        self.masked = SDPAAttention(causal=False)
        self.eager = EagerAttention()

    def forward(self, x, mask=None):
        return self.eager(self.masked(self.causal(self.norm(x)), mask), None if mask is None or
                          mask.dtype == torch.bool else mask)


def plain_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 32, generator=g)
    bool_mask = torch.ones(3, 1, 9, 9, dtype=torch.bool)
    bool_mask[1, ..., 6:] = False
    bool_mask[2, ..., 4:] = False
    float_mask = torch.zeros(3, 1, 9, 9).masked_fill(~bool_mask, -1e9)
    return x, bool_mask, float_mask


def test_plain_modules_sdpa_causal_masks_gqa_and_eager(tmp_path):
    mto = pytest.importorskip("modelopt.torch.opt")
    torch.manual_seed(0)
    net = PlainNet().eval()
    x, bool_mask, float_mask = plain_inputs()
    with torch.no_grad():
        refs = {name: net(x, m) for name, m in (("none", None), ("bool", bool_mask), ("float", float_mask))}
    kinds = {s.name: s.kind for s in attention_sites(net)}
    assert kinds == {"causal": "sdpa", "masked": "sdpa", "eager": "eager"}
    protect_model(net, ProtectSpec())
    conversions = convert_attention(net, FP8_ATTN)
    assert [c.name for c in conversions] == ["causal", "masked", "eager"]
    assert all(c.converted for c in conversions)
    with torch.no_grad():
        assert all(torch.equal(net(x, m), refs[k]) for k, m in (("none", None), ("bool", bool_mask)))
        mtq.quantize(net, quant_cfg(net, conversions), lambda m: [m(x, bool_mask), m(x, float_mask)])
        assert verify_attention(net, conversions) == []
        for name, m in (("none", None), ("bool", bool_mask), ("float", float_mask)):
            cos = cosine(net(x, m), refs[name])
            assert cos >= 0.99, f"{name}: FP8 cosine {cos}"
        quantized = net(x, bool_mask)
        set_quant(net, False)
        for name, m in (("none", None), ("bool", bool_mask), ("float", float_mask)):
            diff = (net(x, m) - refs[name]).abs().max().item()
            assert diff <= 1e-5, f"{name}: explicit attention vs SDPA max diff {diff}"
        set_quant(net, True)
    mto.save(net, str(tmp_path / "state.pth"))
    torch.manual_seed(0)
    again = PlainNet().eval()
    protect_model(again, ProtectSpec())
    convert_attention(again, FP8_ATTN)
    mto.restore(again, str(tmp_path / "state.pth"))
    with torch.no_grad():
        assert torch.equal(again(x, bool_mask), quantized)


def test_skip_match_and_unconvertible():
    net = PlainNet().eval()
    assert convert_attention(net, AttentionSpec(precision="skip")) == []
    assert [c.name for c in convert_attention(net, AttentionSpec(precision="fp8", match="masked"))] == ["masked"]
    assert convert_attention(net, FP8_ATTN) == convert_attention(net, FP8_ATTN)  # re-appliable
    assert "p" not in convert_attention(net, AttentionSpec(precision="int8", match="masked"))[0].quantizers

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    (conv,) = convert_attention(WithMHA(), FP8_ATTN)
    assert not conv.converted and "MultiheadAttention" in conv.reason and conv.quantizers == {}


def test_verify_reports_missing_disabled_uncalibrated():
    net = PlainNet().eval()
    x, bool_mask, _ = plain_inputs()
    conversions = convert_attention(net, FP8_ATTN)
    cfg = quant_cfg(net, conversions)
    # causal: quantizers left disabled; eager: never run during calibration.
    cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if not e["quantizer_name"].startswith("causal.")]
    with torch.no_grad():
        mtq.quantize(net, cfg, lambda m: m.masked(m.causal(x), bool_mask))
    problems = verify_attention(net, conversions)
    assert sum("causal." in p and "disabled" in p for p in problems) == 4
    # eager: the model never called it (as a VAE decoder's unused encoder): nothing to calibrate, no problem.
    assert not any("eager." in p for p in problems)
    with torch.no_grad():
        net.eager(x)  # called now, but its quantizers still uncalibrated
    assert sum("eager." in p and "amax is None" in p for p in verify_attention(net, conversions)) == 4
    assert not any("masked." in p for p in problems)
    ghost = [type(conversions[0])("ghost", "X", True, "quantkit", None, {"q": "ghost.q_bmm_quantizer"})]
    assert verify_attention(net, ghost) == ["ghost: attention module not found in the model"]


def test_is_quantized_trap():
    """ModelOpt skips replacing Linear layers once any TensorQuantizer exists: quantkit never attaches one itself."""
    net = PlainNet().eval()
    net.causal.q_bmm_quantizer = TensorQuantizer()
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": FP8}], "algorithm": "max"}
    x, _, _ = plain_inputs()
    with pytest.raises(RuntimeError, match="no weight quantizer is enabled"), torch.no_grad():
        mtq.quantize(net, cfg, lambda m: m(x))
    assert type(net.causal.q) is nn.Linear
    # convert_attention only registers classes; before mtq.quantize the model holds no quantizer.
    fresh = PlainNet().eval()
    convert_attention(fresh, FP8_ATTN)
    assert not any(isinstance(m, TensorQuantizer) for m in fresh.modules())


def test_fp8_attention_qdq_in_onnx():
    deploy = pytest.importorskip("modelopt.torch._deploy.utils")
    onnx = pytest.importorskip("onnx")
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes

    torch.manual_seed(0)
    net = nn.Sequential(SDPAAttention(causal=False)).eval()
    x = torch.randn(2, 6, 32)
    conversions = convert_attention(net, FP8_ATTN)
    with torch.no_grad():
        mtq.quantize(net, quant_cfg(net, conversions, skip=("",)), lambda m: m(x))
    blob, _ = deploy.get_onnx_bytes_and_metadata(net, (x,), onnx_opset=20)
    graph = onnx.load_from_string(OnnxBytes.from_bytes(blob).get_onnx_model_file_bytes()).graph
    producer = {o: n for n in graph.node for o in n.output}

    def through_dq(name):
        seen = []
        # ModelOpt's FP8 Q/DQ are TRT_FP8QuantizeLinear/TRT_FP8DequantizeLinear before its graph clean-up.
        while name in producer and (producer[name].op_type in ("Transpose", "Cast", "Reshape")
                                    or producer[name].op_type.lower().endswith("quantizelinear")):
            seen.append("DequantizeLinear" if producer[name].op_type.endswith("DequantizeLinear")
                        else producer[name].op_type)
            name = producer[name].input[0]
        return seen

    matmuls = [n for n in graph.node if n.op_type == "MatMul" and all(name in producer for name in n.input)]
    qdq_inputs = collections.Counter("DequantizeLinear" in through_dq(i) for n in matmuls for i in n.input)
    assert qdq_inputs[True] == 4, f"Q·Kᵀ and P·V inputs with Q/DQ: {qdq_inputs}"
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1


def test_diffusers_attention_processor_sdpa_routed():
    """diffusers' Attention delegates to self.processor (AttnProcessor2_0 -> F.scaled_dot_product_attention
    in diffusers' module): quantkit routes that call, only while the module's forward runs."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    sdpa_before = F.scaled_dot_product_attention
    torch.manual_seed(0)
    net = nn.Sequential(Attention(32, heads=4, dim_head=8), Attention(32, cross_attention_dim=16, heads=2,
                                                                    dim_head=16)).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 16)

    def run(m):
        return m[1](m[0](x), encoder_hidden_states=ctx)

    with torch.no_grad():
        ref = run(net)
    assert [(s.name, s.kind) for s in attention_sites(net)] == [("0", "sdpa"), ("1", "sdpa")]
    protect_model(net, ProtectSpec())
    conversions = convert_attention(net, FP8_ATTN)
    assert all(c.converted and set(c.quantizers) == {"q", "k", "v", "p"} for c in conversions)
    with torch.no_grad():
        mtq.quantize(net, quant_cfg(net, conversions, skip=("",)), run)
        assert verify_attention(net, conversions) == []  # every bmm quantizer calibrated: the route ran
        cos = cosine(run(net), ref)
        assert 0.99 <= cos < 1.0, f"FP8 cosine {cos}"
        set_quant(net, False)
        diff = (run(net) - ref).abs().max().item()
        assert diff <= 1e-5, f"explicit attention vs SDPA max diff {diff}"
    assert F.scaled_dot_product_attention is sdpa_before  # nothing left patched after the forward


class _Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _tiny_bidirectional_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, use_bidirectional_attention=True, use_cache=False)
    torch.manual_seed(0)
    return GemmaForCausalLM(config).eval()


def _tiny_bidirectional_gemma2(window: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
                          use_bidirectional_attention=True, use_cache=False)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


def _export_and_compare(tmp_path, model, ids, mask):
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        path = tmp_path / "model.onnx"
        torch.onnx.export(_Logits(model), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=False, opset_version=17)
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input_ids": ids.numpy(),
                                                                     "attention_mask": mask.numpy()})[0])
    valid = mask.bool()
    return cosine(eager[valid], got[valid]), (eager[valid] - got[valid]).abs().max().item()


def test_a_one_token_trace_of_a_non_causal_module_exports_and_follows_eager(tmp_path):
    """One query token (an encoder-decoder's start token): the tagged mask once crashed the trace (a
    traced length compared as a tensor: `aten::eq` INTERNAL ASSERT)."""
    model = _tiny_bidirectional_gemma()
    protect_model(model, ProtectSpec())
    ids = torch.randint(1, 64, (2, 1), generator=torch.Generator().manual_seed(0))
    cos, diff = _export_and_compare(tmp_path, model, ids, torch.ones_like(ids))
    assert cos > 0.999999 and diff < 1e-4, (cos, diff)


@pytest.mark.parametrize("seq", [1, 3, 9])
def test_exported_sliding_window_masks_follow_eager(tmp_path, seq):
    """Gemma2 with bidirectional attention (PaliGemma2's text model), sliding window 4: shorter and
    longer sequences than the window, and one token, give eager's attention in the graph."""
    model = _tiny_bidirectional_gemma2(window=4)
    protect_model(model, ProtectSpec())
    ids = torch.randint(1, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    cos, diff = _export_and_compare(tmp_path, model, ids, torch.ones_like(ids))
    assert cos > 0.999999 and diff < 1e-4, (cos, diff)


@pytest.mark.parametrize("padded", [False, True])
def test_exported_mask_follows_eager_for_a_non_causal_module(tmp_path, padded):
    """PaliGemma's Gemma: its attentions are not causal (use_bidirectional_attention) while its mask is.
    Eager sdpa leaves the mask out over an unpadded batch and attends bidirectionally; traced, the mask
    is materialized (causal). quantkit's attention must give the graph eager's attention either way."""
    model = _tiny_bidirectional_gemma()
    assert model.model.layers[0].self_attn.is_causal is False
    protect_model(model, ProtectSpec())  # routes the attention through quantkit (FP32 softmax)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 6:] = 0
    # the bidirectional and causal attentions of these weights differ well above float rounding (0.9993)
    cos, diff = _export_and_compare(tmp_path, model, ids, mask)
    assert cos > 0.999999 and diff < 1e-4, (cos, diff)
