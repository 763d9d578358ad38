"""Precision islands cast at their boundaries: a layer whose weights end up in another dtype than
its neighbours' (an FP16 lm_head whose weight is tied to the embedding, inside an FP32 model) hands
its neighbours their own dtype. PaliGemma goes through `collect --runner` -> quantize -> export on
inputs collected from images and a prompt, the way a pi0 user records them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import families  # noqa: E402
from tiny import example_generator, quantize_synthetic, seeded_model  # noqa: E402

PROMPT = [17, 42, 99, 7, 3, 11]


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids):
        return self.lm_head(self.mlp(self.embed(input_ids)))


def tied_lm():
    return seeded_model(f"{__file__}:tied_lm", TiedLM,
                        {"input_ids": torch.randint(0, 64, (1, 9), generator=example_generator())}, ["logits"])


def test_tied_fp16_head_casts_the_embedding_at_its_boundaries():
    """The fp8 recipe's FP16 head rule casts lm_head, and with it the tied embedding weight: at c5d9469
    the embedding then fed FP16 into the FP32 MLP ("mat1 and mat2 must have the same dtype")."""
    loaded = tied_lm()
    result = quantize_synthetic(loaded, "fp8")
    assert loaded.model.embed.weight.dtype == torch.float16
    seen = {}
    loaded.model.mlp[0].register_forward_pre_hook(lambda m, a: seen.update({"mlp.0": a[0].dtype}))
    with torch.no_grad():
        out = loaded.model(loaded.example_inputs["input_ids"])
    assert seen["mlp.0"] == torch.float32 and out.dtype == torch.float32
    # Planned FP16 with its tied head (one precision for a shared weight), or sealed as an island.
    assert str(result.plan.layer("embed").precision) == "fp16" or any(
        w.startswith("embed: its weights are float16 in a fp32 model") for w in result.plan.warnings)
    assert result.report["metrics"]["fake-quant"]["logits"]["cosine"] > 0.99


class LearnedQueries(nn.Module):
    """ACT's decoder queries: an nn.Embedding whose weight the parent reads, never calling it."""

    def __init__(self):
        super().__init__()
        self.query = nn.Embedding(8, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        q = self.query.weight[None].expand(x.shape[0], -1, -1)
        return self.head(torch.softmax(q @ self.proj(x).transpose(1, 2), dim=-1) @ x)


def learned_queries():
    return seeded_model(f"{__file__}:learned_queries", LearnedQueries,
                        {"x": torch.randn(2, 5, 32, generator=example_generator())}, ["output"])


EMBEDDINGS_FP16 = """
name: embeddings-fp16
default: skip
rules:
  - types: [Linear]
    precision: fp8
  - types: [Embedding]
    precision: fp16
attention: {precision: skip}
"""


def test_fp16_rule_on_a_weight_read_without_a_call_is_not_applied(tmp_path):
    """At c5d9469 the FP16 embedding handed `self.query.weight` in FP16 to FP32 matmuls ("expected m1
    and m2 to have the same dtype"); a layer the model never calls has no boundary to cast at."""
    (tmp_path / "r.yaml").write_text(EMBEDDINGS_FP16)
    loaded = learned_queries()
    result = quantize_synthetic(loaded, tmp_path / "r.yaml")
    row = result.plan.layer("query")
    assert str(row.precision) == "skip" and "reads its weights without calling it" in row.note
    assert loaded.model.query.weight.dtype == torch.float32
    assert str(result.plan.layer("proj").precision) == "fp8"
    assert any(w.startswith("query: planned fp16") for w in result.plan.warnings)
    assert result.report["metrics"]["fake-quant"]["output"]["cosine"] > 0.99


def pali_runner(model, row):
    """An image and a prompt -> PaliGemma's inputs, as a pi0 data pipeline makes them."""
    import numpy as np

    image = row["image"].convert("RGB").resize((32, 32))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    ids = torch.tensor([[families.PALIGEMMA_IMAGE_TOKEN] * 16 + PROMPT])
    dtype = next(model.parameters()).dtype
    return model(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=torch.ones_like(ids))


def test_paligemma_collect_runner_quantize_export(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from quantkit.cli import main
    from quantkit.export.audit import audit

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    spec = f"{families.HERE}:paligemma"
    calib_dir, out = tmp_path / "calib", tmp_path / "out"
    assert main(["collect", "--model", spec, "--data", str(images), "--runner", f"{__file__}:pali_runner",
                 "--out", str(calib_dir), "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    manifest = json.loads((calib_dir / "manifest.json").read_text())
    assert manifest["samples"] == 12 and manifest["synthetic"] is False
    rc = main(["quantize", "--recipe", "fp8", "--model", spec, "--calib", str(calib_dir), "--out", str(out),
               "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["synthetic"] is False
    assert report["metrics"]["fake-quant"]["logits"]["cosine"] > 0.99
    plan = json.loads((out / "plan.json").read_text())
    rows = {r["name"]: r for r in plan["layers"]}
    heads = [n for n, m in families.paligemma().model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(heads) == 1  # SigLIP's pooling head: its projections are layers of the plan
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert rows[f"{heads[0]}.{proj}"]["kind"] == "linear" and rows[f"{heads[0]}.{proj}"]["precision"] != "skip"
    # pi0 deploys PaliGemma on Thor. transformers' image-token merge (masked_scatter) exports a NonZero, which
    # TensorRT-RTX lacks and Jetson TensorRT has: the compile check says "not checked" for thor (for an RTX
    # target it fails naming the node: tests/test_compile_check.py).
    assert main(["export", "--from", str(out), "--trust-model-code", "--target", "thor", "-q"]) == 0, capsys.readouterr().err
    check = json.loads((out / "report.json").read_text())["compile_check"]
    assert check["verdict"] == "not checked" and check["failures"] == []
    assert [t["refused_ops"] for t in check["targets"]] == [["NonZero"]]
    result = audit(out / "model.onnx", plan)
    assert result.violations == []
    # 2 SigLIP and 2 Gemma layers; the pooling head feeds no graph output (PaliGemma reads the patch tokens).
    assert result.counts["softmax"] == {"float32": 4}
