"""The README's Python API example, taken from README.md itself so the two cannot drift, run as
written on its custom two-input nn.Module fed from a DataLoader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"the Python API section should hold one python block, has {len(blocks)}"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = python_example()
    assert "DataLoader" in code and "def forward(self, obs, state)" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)

    run = tmp_path / "runs" / "policy-fp8"
    report = json.loads((run / "report.json").read_text())
    assert report["passed"] is True and report["recipe"]["name"] == "fp8"
    assert report["metrics"]["fake-quant"]["output"]["cosine"] >= 0.99
    assert report["calibration"]["samples_total"] == 16  # one sample per DataLoader batch
    assert json.loads((run / "audit.json").read_text())["passed"] is True
    export = json.loads((run / "export.json").read_text())
    assert [i["name"] for i in export["inputs"]] == ["obs", "state"]
    assert report["onnxruntime_vs_fake_quant"]["output"]["cosine"] >= 0.999
    assert namespace["actions"].shape == (1, 8)
    # The reloaded policy is the quantized one: same outputs, bit for bit.
    again, qm = namespace["again"], namespace["qm"]
    obs, state = torch.randn(4, 64), torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(again.model(obs, state), qm.model(obs, state))
    layers = {r["name"]: r["precision"] for r in again.plan.to_dict()["layers"]}
    assert layers["obs"] == layers["mlp.2"] == "fp8"
