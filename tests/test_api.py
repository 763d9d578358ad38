"""The Python API in one process: two models quantized side by side under different recipes leave each
other alone; a model keeps its changes while it lives, and once both models and their
QuantizedModels are released torch, transformers and ModelOpt are as they were (quantkit.patches);
importing quantkit changes nothing; the recipe hash is one."""

from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkit
from tests.process_state import process_state as _process_state


class TinyAttention(nn.Module):
    """An eager two-matmul attention with a LayerNorm: quantkit routes its matmuls and softmax."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x, bias):
        h = self.norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        p = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1)
        return self.mlp(p @ v) + bias


def _tiny_batches(n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)) for _ in range(n)]


def _assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    for key, value in before.items():
        if isinstance(value, dict):
            changed = {k for k in value.keys() | after[key].keys() if value.get(k) is not after[key].get(k)}
            assert not changed, f"{key}: entries changed and not restored: {sorted(map(str, changed))[:5]}"
        else:
            assert after[key] is value, f"{key} is not the original object any more"


def test_two_models_in_one_process_leave_each_other_and_the_process_alone():
    from quantkit.calib import builtin_set
    from quantkit.models import load_model
    from quantkit import patches

    from quantkit import nvfp4_cpu
    import transformers.models.llama.modeling_llama as llama
    from transformers.modeling_utils import AttentionInterface

    before = _process_state()
    llama_tiny = load_model("llama-tiny")
    calib = builtin_set(llama_tiny).subset(range(12))
    first = quantkit.quantize(llama_tiny, "fp8", calibration=calib, per_layer=False)
    plan = first.plan.to_dict()
    assert any(p["op"] == "rope" for p in plan["protected"]), "fp8 protects llama's RoPE"
    assert len(plan["attention"]) == 4 and all(a["converted"] for a in plan["attention"]), plan["attention"]
    # The first model's changes are in force while it lives.
    assert llama.apply_rotary_pos_emb is not before["llama.apply_rotary_pos_emb"]
    assert "quantkit" in AttentionInterface._global_mapping
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        out_before = first.model(input_ids=ids).logits.clone()

    # A different model under a different recipe: NVFP4 on CPU (ModelOpt's kernel global rerouted).
    second = quantkit.quantize(TinyAttention(), "balanced", calibration=_tiny_batches(), per_layer=False)
    assert second.plan.to_dict()["attention"][0]["converted"]
    if any(r["precision"] == "nvfp4" for r in second.plan.to_dict()["layers"]):
        assert nvfp4_cpu.is_installed()  # ModelOpt's CPU NVFP4 kernel globals rerouted while it lives
    with torch.no_grad():
        out_after = first.model(input_ids=ids).logits
    assert torch.equal(out_before, out_after), (out_before - out_after).abs().max()
    assert first.report.cosine > 0.98 and second.report.cosine > 0.9, (first.report, second.report)

    # The changes belong to the model: dropping its QuantizedModel while the model is kept leaves it
    # routed (the same logits), its RoPE protected and the `quantkit` attention registered.
    model = first.model
    del first
    gc.collect()
    assert llama.apply_rotary_pos_emb is not before["llama.apply_rotary_pos_emb"]
    assert "quantkit" in AttentionInterface._global_mapping
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out_before)

    del second, llama_tiny, calib, model
    gc.collect()
    assert patches.active() == 0
    _assert_same_state(before, _process_state())


def test_with_block_undoes_the_changes_at_its_end():
    from quantkit import patches
    from transformers.masking_utils import AttentionMaskInterface

    before = _process_state()
    with quantkit.quantize(TinyAttention(), "fp8", calibration=_tiny_batches(6), per_layer=False) as qm:
        assert qm.report.passed == bool(qm.report)
        assert patches.active() > 0  # the QuantModuleRegistry entry for TinyAttention
    assert patches.active() == 0
    assert "quantkit" not in AttentionMaskInterface._global_mapping
    _assert_same_state(before, _process_state())


def test_a_forward_loop_calibrates_and_example_inputs_evaluate():
    batches = _tiny_batches(4)
    seen = []

    def forward_loop(model):
        for x, b in batches:
            seen.append(x.shape)
            model(x, b)

    with quantkit.quantize(TinyAttention(), "fp8", calibration=forward_loop, example_inputs=batches[0],
                           per_layer=False) as qm:
        assert len(seen) == 4
        assert qm.loaded.input_names == ["x", "bias"]
        assert qm.report.cosine > 0.99, qm.report
        assert qm.report.to_dict()["calibration"]["heldout_samples"] == 1
    with quantkit.quantize(TinyAttention(), "fp8", calibration=forward_loop, per_layer=False) as qm:
        assert not qm.report and qm.report.failures[0].startswith("not measured")


def test_importing_quantkit_changes_nothing():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        sys.path.insert(0, %r)
        from tests.process_state import process_state
        before = process_state()
        import quantkit
        for m in pkgutil.walk_packages(quantkit.__path__, "quantkit."):
            if m.name != "quantkit.__main__":
                importlib.import_module(m.name)
        after = process_state()
        changed = [k for k, v in before.items() if (v != after[k] if isinstance(v, dict) else v is not after[k])]
        print("CHANGED", changed)
    """ % str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CHANGED []" in out.stdout, out.stdout


def test_recipe_hash_is_one_in_report_recipe_yaml_and_engine_json(tmp_path):
    from quantkit.runtime.tensorrt.build import _recipe_identity
    from quantkit.recipe import load_recipe

    with quantkit.quantize(TinyAttention(), "balanced", calibration=_tiny_batches(6), per_layer=False) as qm:
        qm.save(tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    yaml_sha = hashlib.sha256((tmp_path / "run" / "recipe.yaml").read_bytes()).hexdigest()
    engine_name, engine_sha = _recipe_identity(tmp_path / "run", {})  # what engine.json records
    assert report["recipe"]["sha256"] == yaml_sha == engine_sha == plan["recipe"]["sha256"]
    assert engine_name == "balanced"
    # The hash is of the resolved recipe: the gate written out, not the recipe as shipped.
    shipped = load_recipe("balanced")
    assert shipped.thresholds.cosine_min is None
    assert shipped.sha256() == yaml_sha != hashlib.sha256(shipped.to_yaml().encode()).hexdigest()
