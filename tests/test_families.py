"""The family matrix: tiny random-weight models of the families people deploy (tests/families.py)
under the shipped recipes: quantize, export, audit, ONNX Runtime per block, roles and protections."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.families import FAMILIES

warnings.filterwarnings("ignore")

EXPECTED_OUTPUTS = {
    "gemma": {"logits": (2, 12, 256)}, "paligemma": {"logits": (2, 22, 256)},
    "siglip_vision": {"last_hidden_state": (2, 16, 64), "pooler_output": (2, 64)},
    "llama_tied": {"logits": (2, 12, 256)}, "qwen2": {"logits": (2, 12, 256)},
    "t5_encoder": {"last_hidden_state": (2, 12, 64)}, "vit": {"last_hidden_state": (2, 17, 64)},
    "gpt2": {"logits": (2, 12, 256)}, "act_policy": {"actions": (2, 8, 14)},
    "vae_decoder": {"image": (1, 3, 16, 16)}, "dit": {"sample": (2, 4, 8, 8)}, "unet": {"sample": (2, 4, 8, 8)},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_builder_is_deterministic_and_runs_its_example(family):
    """A run folder rebuilds its model from the spec: two builds must hold the same weights."""
    a, b = FAMILIES[family](), FAMILIES[family]()
    assert a.spec.endswith(f"families.py:{family}")
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name
    with torch.no_grad():
        out = a.run(a.example_inputs)
    assert {k: tuple(v.shape) for k, v in out.items()} == EXPECTED_OUTPUTS[family]
    assert all(torch.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------------------------------------
# The matrix: family x recipe through quantize -> export -> audit -> ONNX Runtime per block

from tests.families import recipes_for, run_case  # noqa: E402

# Layers per role, as quantkit.roles infers them (see `quantkit plan`).
EXPECTED_ROLES = {
    "gemma": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "embedding": 1, "head": 1,
              "mlp_down": 2, "mlp_gate": 2, "mlp_up": 2},
    "paligemma": {"attention_k": 5, "attention_out": 5, "attention_q": 5, "attention_v": 5, "conv": 1, "embedding": 2,
                  "head": 1, "mlp_down": 5, "mlp_gate": 2, "mlp_up": 5, "projector": 1},
    # the pooling head's nn.MultiheadAttention is the third attention: its q/k/v projections exposed as layers
    "siglip_vision": {"attention_k": 3, "attention_out": 3, "attention_q": 3, "attention_v": 3, "conv": 1,
                      "embedding": 1, "mlp_down": 3, "mlp_up": 3},
    "llama_tied": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "embedding": 1, "head": 1,
                   "mlp_down": 2, "mlp_gate": 2, "mlp_up": 2},
    "qwen2": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "embedding": 1, "head": 1,
              "mlp_down": 2, "mlp_gate": 2, "mlp_up": 2},
    "t5_encoder": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "embedding": 3,
                   "mlp_down": 2, "mlp_gate": 2, "mlp_up": 2},
    "vit": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "conv": 1, "mlp_down": 2,
            "mlp_up": 2},
    "gpt2": {"attention_out": 2, "attention_qkv": 2, "embedding": 2, "head": 1, "mlp_down": 2, "mlp_up": 2},
    # its four nn.MultiheadAttention expose q/k/v projections
    "act_policy": {"attention_k": 4, "attention_out": 4, "attention_q": 4, "attention_v": 4, "conditioning": 1,
                   "conv": 2, "embedding": 1, "head": 1, "mlp_down": 3, "mlp_up": 3},
    "vae_decoder": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "conv": 30},
    "dit": {"attention_k": 2, "attention_out": 2, "attention_q": 2, "attention_v": 2, "conditioning": 7, "conv": 1,
            "embedding": 2, "head": 1, "mlp_down": 2, "mlp_up": 2},
    "unet": {"attention_k": 8, "attention_out": 8, "attention_q": 8, "attention_v": 8, "conditioning": 10, "conv": 33,
             "mlp_down": 4, "mlp_gate_up": 4},
}
# FP32 protections the plan finds (at least these).
DECODER = {"rmsnorm", "rope", "softmax"}
EXPECTED_PROTECTIONS = {
    "gemma": DECODER, "paligemma": DECODER | {"layernorm"}, "siglip_vision": {"layernorm", "softmax"},
    "llama_tied": DECODER, "qwen2": DECODER, "t5_encoder": {"rmsnorm", "softmax"}, "vit": {"layernorm", "softmax"},
    "gpt2": {"layernorm", "softmax"}, "act_policy": {"layernorm", "softmax"}, "vae_decoder": {"groupnorm", "softmax"},
    "dit": {"layernorm", "softmax"}, "unet": {"groupnorm", "layernorm", "softmax"},
}
# What the attention / MLP roles must run in: nothing of them silently left unquantized.
QUANTIZED = {"fp8": {"fp8"}, "balanced": {"nvfp4", "fp8"}, "int8-smoothquant": {"int8"}}
# Every family x recipes_for, as scripts/family_matrix.py runs them.
CASES = [(f, r) for f in FAMILIES for r in recipes_for(f)]


def _check_precisions(recipe: str, precision_by_role: dict[str, list[str]]) -> None:
    for role, precisions in precision_by_role.items():
        got = set(precisions)
        if recipe == "fp16":
            assert got == {"fp16"}, (role, got)
        elif role.startswith("attention_"):
            assert got == ({"fp8"} if recipe == "balanced" else QUANTIZED[recipe]), (role, got)
        elif role.startswith("mlp_"):
            assert got and got <= QUANTIZED[recipe], (role, got)
            if recipe == "balanced":
                assert "nvfp4" in got, (role, got)
        elif role == "head":
            assert got == {"fp16"}, (role, got)
        elif recipe == "balanced" and role in ("embedding", "projector", "conditioning"):
            assert got == {"fp16"}, (role, got)
        elif recipe == "balanced" and role == "conv":
            assert got == {"skip"}, (role, got)


@pytest.mark.parametrize("family,recipe", CASES)
def test_family_through_quantize_export_audit_and_onnxruntime(family, recipe, tmp_path):
    row = run_case(family, recipe, tmp_path / "run")
    assert row["quantize"] == 0, row["quantize_message"]
    assert row["export"] == 0, row["export_message"]
    assert row["violations"] == []
    # The TensorRT-RTX compile check of the exported graph, for each of the recipe's targets.
    assert row["compile"] and row["compile_verdict"] in ("passed", "not checked"), row["compile"]
    for sm, r in row["compile"].items():
        assert r["not_checked"] or (r["parsed"] and r["built"] and r["engine_bytes"] > 0), (sm, r)
    assert row["roles"] == EXPECTED_ROLES[family]  # "?" would count layers whose role was not inferred
    _check_precisions(recipe, row["precision_by_role"])
    assert set(row["protections"]) >= EXPECTED_PROTECTIONS[family], row["protections"]
    # The attention matmuls (Q·Kᵀ, P·V) the graph runs carry Q/DQ under fp8 and balanced (diffusers'
    # Attention and nn.MultiheadAttention included), none under fp16 / int8-smoothquant (attention: skip).
    matmuls = row["audit_counts"]["attention_matmuls"]
    if recipe in ("fp8", "balanced"):
        assert row["attention_converted"] >= 1 and matmuls["with_qdq"] >= 2 and matmuls["without_qdq"] == 0, matmuls
        assert matmuls["with_qdq"] <= 2 * row["attention_converted"], matmuls
    else:
        assert row["attention_converted"] == 0 and matmuls["with_qdq"] == 0, matmuls
    # Plain-dtype rows of layers the model never calls stay in the model's dtype: only the VAE's encoder half
    # and ACT's learned queries (their weight is read, the module never called).
    uncalled = {"vae_decoder": ("vae.encoder.", "vae.quant_conv"), "act_policy": ("query",)}.get(family, ())
    assert all(n.startswith(uncalled) for n in row["not_called"]), row["not_called"]
    floor = 0.95 if recipe == "balanced" else 0.99 if recipe in QUANTIZED else 0.999
    assert row["cosine"] >= floor, row["cosine"]
    per_block = row["ort_per_block"]
    assert per_block, "no per-block ONNX Runtime comparison"
    worst = min(per_block.values())
    assert worst >= 0.999, per_block
