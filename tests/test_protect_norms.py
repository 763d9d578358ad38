"""GroupNorm / InstanceNorm and unfolded BatchNorm are FP32 protections: in plan.json, and in the graph
of a half-precision model as Cast -> normalization in FLOAT -> Cast, checked by the audit."""

from __future__ import annotations

import json
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


class ConvStack(nn.Module):
    """A VAE / diffusion-policy style conv stack: GroupNorm, InstanceNorm, Conv->BN (folded by
    TensorRT) and a BatchNorm after an activation (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)  # right after its conv: folded, not protected
        self.act = nn.SiLU()
        self.post_bn = nn.BatchNorm2d(16)  # after an activation: TensorRT cannot fold it
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        h = self.norm1(self.conv_in(x))
        h = self.post_bn(self.act(self.bn(self.conv(h))))
        h = self.inorm(h)
        return self.proj(h.mean(dim=(2, 3)))


def conv_stack():
    from quantkit.models import LoadedModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvStack().eval()
        for bn in (model.bn, model.post_bn):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return LoadedModel(spec=f"{__file__}:conv_stack", model=model, input_names=["x"], output_names=["output"],
                       example_inputs={"x": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))})


RECIPE = """
name: linears-fp8
default: skip
rules:
  - types: [Linear]
    precision: fp8
attention: {precision: skip}
"""


def test_protect_finds_groupnorm_instancenorm_and_unfolded_batchnorm():
    from quantkit.protect import protect_model
    from quantkit.recipe import ProtectSpec

    loaded = conv_stack()
    found = {p.name: p.op for p in protect_model(loaded.model, ProtectSpec())}
    assert found == {"norm1": "groupnorm", "post_bn": "batchnorm", "inorm": "groupnorm"}, found
    off = conv_stack()
    assert protect_model(off.model, ProtectSpec(groupnorm=False, batchnorm=False)) == []


def test_fp16_conv_stack_keeps_norms_fp32_in_the_graph(tmp_path):
    from quantkit import calib, ptq
    from quantkit.export.audit import audit
    from quantkit.export.onnx_export import export_run
    from quantkit.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(RECIPE)
    loaded = conv_stack()
    result = ptq.quantize(loaded, load_recipe(tmp_path / "r.yaml"), calib.synthetic_set(loaded, n=8, seed=0),
                          dtype="fp16", batch_size=4, per_layer=False)
    assert loaded.model.norm1.weight.dtype == torch.float32 and loaded.model.conv.weight.dtype == torch.float16
    assert result.report["metrics"]["fake-quant"]["output"]["cosine"] > 0.99
    out = tmp_path / "out"
    out.mkdir()
    ptq.save_run(result, out, loaded.spec, "fp16")
    plan = json.loads((out / "plan.json").read_text())
    assert {(p["name"], p["op"]) for p in plan["protected"]} == {
        ("norm1", "groupnorm"), ("post_bn", "batchnorm"), ("inorm", "groupnorm")}
    export_run(out, trust_model_code=True)
    report = audit(out / "model.onnx", plan)
    assert report.violations == [], report.violations
    norms = {(n["module"], n["kind"]): n["dtype"] for n in report.norms}
    assert norms[("norm1", "groupnorm")] == "float32" and norms[("inorm", "groupnorm")] == "float32"
    assert norms[("post_bn", "batchnorm")] == "float32"
    # The folded BatchNorm stays in the model's dtype (no casts between it and its conv), or is folded away.
    assert norms.get(("bn", "batchnorm"), "float16") == "float16"
