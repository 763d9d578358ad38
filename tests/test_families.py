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
