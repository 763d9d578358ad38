"""FP32 guards: identity in FP32, FP32 arithmetic inside FP16/BF16 models, visible as FLOAT ops in ONNX."""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from quantkit.errors import InputError
from quantkit.models import load_model
from quantkit.protect import Protection, protect_model
from quantkit.recipe import ProtectSpec

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.", "Hello world."]


class DtypeLog(TorchDispatchMode):
    """Records the input dtypes of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.ops = collections.defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        if dtypes:
            self.ops[func.overloadpacket.__name__].add(dtypes[0])
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def llama():
    return load_model("llama-tiny")


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def _run(loaded, model, inputs):
    return loaded.named_outputs(model(**inputs))[loaded.output_names[0]]


@pytest.mark.parametrize("spec", ["minilm", "llama-tiny"])
def test_fp32_outputs_bit_identical_and_idempotent(spec, request):
    loaded = request.getfixturevalue("minilm" if spec == "minilm" else "llama")
    model = copy.deepcopy(loaded.model)
    inputs = loaded.tokenize(TEXTS)
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = _run(loaded, model, inputs)
        first = protect_model(model, ProtectSpec())
        classes = {n: type(m) for n, m in model.named_modules()}
        second = protect_model(model, ProtectSpec())
        out = _run(loaded, model, inputs)
    assert torch.equal(out, ref)
    assert first == second and classes == {n: type(m) for n, m in model.named_modules()}
    # Linear layers: same names, same plain class; state-dict keys unchanged.
    assert {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)} == linears
    assert all(t is nn.Linear for t in linears.values()) and list(model.state_dict()) == keys
    ops = collections.Counter(p.op for p in first)
    if spec == "minilm":
        assert ops == {"layernorm": 13, "softmax": 6}
    else:
        assert ops == {"rmsnorm": 9, "softmax": 4, "rope": 2}  # rotary module + apply_rotary_pos_emb
        assert any(p.name.endswith("modeling_llama:apply_rotary_pos_emb") for p in first)
    assert all(isinstance(p, Protection) and p.module_class and p.how for p in first)


def test_bf16_llama_ops_run_in_fp32(llama):
    inputs = llama.tokenize(TEXTS)
    fp32 = llama.model
    plain = copy.deepcopy(fp32).to(torch.bfloat16)
    guarded = copy.deepcopy(fp32).to(torch.bfloat16)
    protections = protect_model(guarded, ProtectSpec())
    with torch.no_grad():
        ref = _run(llama, fp32, inputs)
        with DtypeLog() as before:
            _run(llama, plain, inputs)
        with DtypeLog() as after:
            out = _run(llama, guarded, inputs)
    # Unprotected: softmax hidden in a BF16 SDPA kernel, RMSNorm weight applied in BF16. (Not the RoPE
    # rotation: apply_rotary_pos_emb is wrapped module-wide, so once any model is protected, all are.)
    assert any("scaled_dot_product" in op for op in before.ops) and torch.bfloat16 in before.ops["mul"]
    # Protected: softmax, RMSNorm variance, RoPE frequencies and rotation all in FP32; matmuls stay BF16.
    assert not any("scaled_dot_product" in op for op in after.ops)
    for op in ("_softmax", "pow", "mean", "rsqrt", "cos", "sin", "neg"):
        assert after.ops[op] == {torch.float32}, (op, after.ops[op])
    assert torch.bfloat16 in after.ops["mm"] or torch.bfloat16 in after.ops["bmm"]
    assert out.dtype == torch.bfloat16
    # inv_freq was already rounded by .to(bf16): protection rebuilds it in FP32 from the config.
    rotary = guarded.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, fp32.model.rotary_emb.inv_freq)
    assert guarded.model.norm.weight.dtype == torch.float32
    cos = F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0).item()
    assert cos >= 0.999, f"bf16 protected cosine {cos}"
    assert {p.op for p in protections} == {"rmsnorm", "rope", "softmax"}


def test_guards_survive_later_dtype_cast(llama):
    model = copy.deepcopy(llama.model)
    protect_model(model, ProtectSpec())
    model.to(torch.float16)
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, llama.model.model.rotary_emb.inv_freq)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16


class GemmaLikeRMSNorm(nn.Module):
    """Not in any list: recognized by its name; weight applied as 1 + w."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * (1.0 + self.weight)


class T5StyleLayerNorm(nn.Module):
    """Named LayerNorm but an RMS norm (no bias, no mean subtraction)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class MyScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.seen = None

    def forward(self, x):
        self.seen = x.dtype
        return self.proj(x).exp()


SEEN_BY_MY_OP = []


def my_op(x):
    SEEN_BY_MY_OP.append(x.dtype)
    return x.sigmoid()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = GemmaLikeRMSNorm(16)
        self.b = T5StyleLayerNorm(16)
        self.c = MyScale(16)
        self.d = nn.RMSNorm(16)
        self.e = nn.Softmax(dim=-1)

    def forward(self, x):
        return self.e(my_op(self.d(self.c(self.b(self.a(x))))))


@pytest.mark.parametrize("declared", ["MyScale", "tests.test_protect:MyScale"])
def test_structural_recognition_and_user_declarations(declared):
    torch.manual_seed(0)
    model = Custom().eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = model(x)
    spec = ProtectSpec(modules=[declared], functions=["tests.test_protect:my_op"])
    protections = {p.name: p.op for p in protect_model(model, spec)}
    assert protections == {"a": "rmsnorm", "b": "rmsnorm", "c": "custom", "d": "rmsnorm", "e": "softmax",
                           "tests.test_protect:my_op": "custom"}
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        model.half()
        assert model.c.proj.weight.dtype == torch.float32  # declared module: FP32 as a whole
        SEEN_BY_MY_OP.clear()
        out = model(x.half())
    assert out.dtype == torch.float16 and model.c.seen == torch.float32 and SEEN_BY_MY_OP == [torch.float32]
    assert type(model.c.proj) is nn.Linear  # a Linear inside a declared module stays visible to ModelOpt


def test_bad_declarations_name_the_entry():
    with pytest.raises(InputError, match="nope.module"):
        protect_model(Custom(), ProtectSpec(functions=["nope.module:fn"]))
    with pytest.raises(InputError, match="no_such_fn"):
        protect_model(Custom(), ProtectSpec(functions=["tests.test_protect:no_such_fn"]))
    with pytest.raises(InputError, match="not an nn.Module"):
        protect_model(Custom(), ProtectSpec(modules=["tests.test_protect:my_op"]))


def test_disabled_ops_are_left_alone(minilm):
    model = copy.deepcopy(minilm.model)
    assert protect_model(model, ProtectSpec(softmax=False, layernorm=False)) == []
    assert model.config._attn_implementation == "sdpa"


def _tiny(family):
    tf = pytest.importorskip("transformers")
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(common, head_dim=8)),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(common, head_dim=8)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, common),
        "t5": (tf.T5Config, tf.T5EncoderModel, dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                                     num_heads=4)),
    }
    config_cls, model_cls, kwargs = configs[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("family", ["qwen3", "gemma", "mistral", "t5"])
def test_other_transformers_families(family):
    model = _tiny(family)
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0

    def run(m):
        out = m(input_ids=ids, attention_mask=mask)
        return getattr(out, "logits", None) if getattr(out, "logits", None) is not None else out.last_hidden_state

    with torch.no_grad():
        ref = run(model)
        guarded = copy.deepcopy(model)
        protections = protect_model(guarded, ProtectSpec())
        assert torch.equal(run(guarded), ref)
        guarded.to(torch.bfloat16)
        with DtypeLog() as log:
            out = run(guarded)
    ops = {p.op for p in protections}
    assert {"rmsnorm", "softmax"} <= ops and (family == "t5" or "rope" in ops)
    for op in ("_softmax", "pow", "mean", "rsqrt") + (() if family == "t5" else ("cos", "sin", "neg")):
        assert log.ops[op] == {torch.float32}, (family, op, log.ops[op])
    valid = mask.bool()
    cos = F.cosine_similarity(out.float()[valid].flatten(), ref[valid].flatten(), dim=0).item()
    assert cos >= 0.999, f"{family}: bf16 protected cosine {cos}"


def test_fp16_export_keeps_softmax_and_rmsnorm_in_float():
    onnx = pytest.importorskip("onnx")
    deploy = pytest.importorskip("modelopt.torch._deploy.utils")
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes

    tf = pytest.importorskip("transformers")
    config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.LlamaModel(config).eval()
    protect_model(model, ProtectSpec())
    model.half()

    class Exportable(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(3, 96, (1, 8))
    blob, _ = deploy.get_onnx_bytes_and_metadata(Exportable(model), (ids, torch.ones_like(ids)))
    graph = onnx.shape_inference.infer_shapes(
        onnx.load_from_string(OnnxBytes.from_bytes(blob).get_onnx_model_file_bytes())).graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    dtype.update({i.name: i.data_type for i in graph.initializer})
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_type = collections.defaultdict(list)
    for node in graph.node:
        if node.input:
            by_type[node.op_type].append(dtype.get(node.input[0]))
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert dtype[softmax.input[0]] == FLOAT
    # Cast -> Softmax(FLOAT) -> Cast(FLOAT16): explicit casts a strongly-typed build keeps.
    assert producer[softmax.input[0]].op_type == "Cast"
    assert [(c.op_type, c.attribute[0].i) for c in consumers[softmax.output[0]]] == [("Cast", FLOAT16)]
    assert by_type["ReduceMean"] and set(by_type["ReduceMean"]) == {FLOAT}  # RMSNorm variance
    assert set(by_type["Pow"]) == {FLOAT} and set(by_type["Cos"]) == {FLOAT} and set(by_type["Sin"]) == {FLOAT}
    assert FLOAT16 in by_type["MatMul"]  # the model itself runs in FP16
