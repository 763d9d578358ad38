"""Graph scopes -> module names whatever wraps the model: a thin wrapper that calls a method of the
model it holds (`self.vae.decode(z)`), nested modules, Sequential; the audit of such a model is clean."""

from __future__ import annotations

import json
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


def test_resolver_finds_modules_that_leave_no_scope():
    from quantkit.export.graph import ScopeResolver, module_of_name

    names = ["vae", "vae.decoder", "vae.decoder.mid_block.attentions.0.to_q", "vae.decoder.up.0.conv",
             "vae.encoder.mid_block.attentions.0.to_q", "mlp", "mlp.0", "layers.1.self_attn.q_proj"]
    r = ScopeResolver(names)
    assert r.resolve(("decoder", "mid_block", "attentions.0", "to_q")) == "vae.decoder.mid_block.attentions.0.to_q"
    assert r.resolve(("encoder", "mid_block", "attentions.0", "to_q")) == "vae.encoder.mid_block.attentions.0.to_q"
    assert r.resolve(("mlp", "mlp.0")) == "mlp.0"  # a Sequential is a scope and so is its element
    assert r.resolve(("layers.1", "self_attn", "q_proj")) == "layers.1.self_attn.q_proj"
    assert r.resolve(("decoder", "up.0", "act")) == "vae.decoder.up.0.act"  # unknown tail appended as it reads
    assert r.resolve(("elsewhere", "x")) == "elsewhere.x"
    assert module_of_name("/model/decoder/up.0/conv/Conv", "model", r) == "vae.decoder.up.0.conv"
    assert module_of_name("/model/decoder/up.0/conv/Conv", "model") == "decoder.up.0.conv"  # without names


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
                                    nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)))
        self.to_q, self.to_k, self.to_v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, z):
        h = self.conv_in(z).flatten(2).transpose(1, 2)
        h = self.blocks(h)
        p = torch.softmax(self.to_q(h) @ self.to_k(h).transpose(-1, -2) / 4.0, dim=-1)
        return self.out(p @ self.to_v(h))


class AutoEncoder(nn.Module):
    """Never called itself: its users call `decode`, so the graph has no scope for it."""

    def __init__(self):
        super().__init__()
        self.decoder = Decoder()

    def decode(self, z):
        return self.decoder(z)


class DecodeOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.vae = AutoEncoder()

    def forward(self, z):
        return self.vae.decode(z)


def decode_only():
    from quantkit.models import LoadedModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DecodeOnly().eval()
    return LoadedModel(spec=f"{__file__}:decode_only", model=model, input_names=["z"], output_names=["output"],
                       example_inputs={"z": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))})


def test_wrapped_model_audits_clean(tmp_path):
    """At c5d9469 the audit called every quantized MatMul 'not a layer of the plan' (its scope lacks
    `vae`) and export exited 1 on a correct graph."""
    from quantkit import calib, ptq
    from quantkit.export.audit import audit
    from quantkit.export.onnx_export import export_run
    from quantkit.recipe import load_recipe

    loaded = decode_only()
    result = ptq.quantize(loaded, load_recipe("fp8"), calib.synthetic_set(loaded, n=8, seed=0), batch_size=4,
                          per_layer=False)
    out = tmp_path / "out"
    out.mkdir()
    ptq.save_run(result, out, loaded.spec, "fp32")
    export_run(out, trust_model_code=True)
    plan = json.loads((out / "plan.json").read_text())
    fp8 = sorted(r["name"] for r in plan["layers"] if r["weights"] == "fp8")
    assert fp8 == sorted(["vae.decoder.blocks.0.0", "vae.decoder.blocks.0.2", "vae.decoder.blocks.1.0",
                          "vae.decoder.blocks.1.2", "vae.decoder.to_q", "vae.decoder.to_k", "vae.decoder.to_v",
                          "vae.decoder.out"])
    report = audit(out / "model.onnx", plan)
    assert report.violations == [], report.violations
    modules = {c["module"] for c in report.compute if c["kind"] == "weight" and c["weights"] == "fp8"}
    assert modules == set(fp8), modules
    # Without the plan, the graph's own record of module names resolves the scopes too.
    bare = audit(out / "model.onnx")
    assert {c["module"] for c in bare.compute if c["kind"] == "weight" and c["weights"] == "fp8"} == set(fp8)
