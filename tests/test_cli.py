"""The command line as a user meets it: exit codes, one-line errors, the plan table and JSON."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from quantkit.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None):
    """The real entry point in a subprocess: exit code, stdout, stderr."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, cwd=cwd or REPO,
                       env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def plan_json():
    code, out, err = run_cli("plan", "--recipe", "balanced", "--json")
    assert code == 0, err
    return json.loads(out)


def test_plan_json_on_default_model(plan_json):
    cov = plan_json["coverage"]["by_precision"]
    # MiniLM-L6: 6 layers x (2 MLP linears in NVFP4, q/k/v/o in FP8); embeddings and pooler in FP16.
    assert cov["nvfp4"]["layers"] == 12
    assert cov["fp8"]["layers"] == 24
    assert cov["fp16"]["layers"] == 4
    assert plan_json["recipe"]["name"] == "balanced"
    row = next(r for r in plan_json["layers"] if r["name"] == "encoder.layer.3.intermediate.dense")
    assert row["precision"] == "nvfp4" and row["rule"].startswith("rules[0]") and row["shape"] == [1536, 384]
    assert plan_json["unmatched_rules"] == []


def test_plan_table_on_default_model():
    code, out, err = run_cli("plan", "--recipe", "balanced")
    assert code == 0, err
    assert "encoder.layer.5.output.dense" in out
    assert "coverage by precision" in out
    lines = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") > 3}
    assert "nvfp4" in lines and "fp8" in lines and "fp16" in lines
    assert "12" in lines["nvfp4"] and "24" in lines["fp8"]
    # every layer is planned, and the table says so rather than leaving the row out
    assert [c.strip() for c in lines["unquantized"].split("│")[2:4]] == ["0", "0"]


def test_plan_strict_fails_on_rule_that_matches_nothing(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("name: r\nrules:\n  - {match: '*.ffn.*', precision: fp8}\n")
    code, out, err = run_cli("plan", "--recipe", str(r), "--strict")
    assert code == 2
    assert "PlanError:" in err and "rules[0] (*.ffn.*) matched no layer" in err
    assert "Traceback" not in err
    code, out, err = run_cli("plan", "--recipe", str(r))
    assert code == 0 and "matched no layer" in err


@pytest.mark.parametrize("args,expected", [
    (["plan", "--recipe", "nope"], "RecipeError: nope: no such recipe file or shipped recipe"),
    (["plan", "--recipe", "balanced", "--model", "no.such.module:make"],
     "ModelSpecError: no.such.module:make: cannot import 'no.such.module'"),
    (["plan", "--recipe", "balanced", "--model", "minilmm"], "Did you mean minilm"),
])
def test_bad_input_exits_2_with_one_line(args, expected, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_bad_recipe_file_via_subprocess(tmp_path):
    r = tmp_path / "bad.yaml"
    r.write_text("name: bad\nrules:\n  - match: '*'\n    precision: fp6\n")
    code, out, err = run_cli("plan", "--recipe", str(r))
    assert code == 2
    assert err.strip() == (f"RecipeError: {r}: rules[0].precision: 'fp6' is not one of nvfp4, fp8, int8, fp16, "
                           "bf16, fp32, skip (alias fp4 = nvfp4)")


def test_model_from_python_file(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""\
        import torch
        from torch import nn
        def make():
            m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
            return m, {"input": torch.randn(2, 32)}
        """))
    code, out, err = run_cli("plan", "--recipe", "fp8", "--model", f"{f}:make", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [r["name"] for r in plan["layers"]] == ["0", "2"]
    assert {r["precision"] for r in plan["layers"]} == {"fp8"}


def test_model_file_with_positional_example_and_two_outputs(tmp_path):
    # A bare tensor example was fed as `input=` (TypeError for forward(self, x)), and only the first of
    # several outputs was evaluated and exported.
    from quantkit.models import load_model

    f = tmp_path / "twohead.py"
    f.write_text(textwrap.dedent("""\
        import torch
        from torch import nn
        class TwoHead(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 1)
            def forward(self, x):
                h = self.body(x)
                return self.a(h), self.b(h)
        def make():
            return TwoHead(), torch.randn(2, 8)
        def make_tuple():
            return TwoHead(), (torch.randn(2, 8), torch.randn(2, 8))
        """))
    loaded = load_model(f"{f}:make")
    assert loaded.input_names == ["x"] and loaded.output_names == ["output_0", "output_1"]
    outs = loaded.run(loaded.example_inputs)
    assert {k: tuple(v.shape) for k, v in outs.items()} == {"output_0": (2, 3), "output_1": (2, 1)}
    code, out, err = run_cli("plan", "--recipe", "fp8", "--model", f"{f}:make_tuple")
    assert code == 2 and "2 example inputs" in err and "takes 1" in err, err


def test_quantizing_recipe_that_reaches_no_layer_is_refused(tmp_path):
    # fp8 quantizes Linear layers; a conv-only model would otherwise "pass" with cosine 1.0 and MSE 0.
    f = tmp_path / "convnet.py"
    f.write_text(textwrap.dedent("""\
        import torch
        from torch import nn
        def make():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)), \\
                torch.randn(1, 3, 16, 16)
        """))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".quantkit-output").write_text("{}")  # an earlier run's folder: quantize may replace it, if it runs
    (out / "keep.txt").write_text("from before")
    code, _, err = run_cli("quantize", "--recipe", "fp8", "--model", f"{f}:make", "--synthetic", "--max-samples", "8",
                           "--device", "cpu", "--out", str(out), "-q")
    assert code == 2, err
    assert "PlanError: recipe fp8 quantizes no layer of" in err and "quantkit plan --recipe fp8" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".quantkit-output", "keep.txt"]  # nothing destroyed


def test_recipes_lists_shipped():
    code, out, err = run_cli("recipes")
    assert code == 0
    for n in ("balanced", "fp8", "nvfp4", "int8-smoothquant", "fp16"):
        assert n in out


def test_hf_image_model_folder_gets_a_pixel_values_example(tmp_path):
    # An image model folder has no tokenizer: its example input (export, --synthetic) comes from its config.
    from transformers import ViTConfig, ViTModel

    from quantkit.models import load_model

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=16, num_channels=3)
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    loaded = load_model(str(tmp_path / "vit"))
    assert loaded.input_names == ["pixel_values"] and loaded.output_names == ["last_hidden_state"]
    assert tuple(loaded.example_inputs["pixel_values"].shape) == (1, 3, 32, 32)
    out = loaded.run(loaded.example_inputs)["last_hidden_state"]
    assert tuple(out.shape) == (1, 5, 32)  # 4 patches + CLS
