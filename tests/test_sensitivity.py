"""Sensitivity: units, quantizer switches, and the acceptance tests on the Llama-architecture built-in
model: `quantkit sensitivity` ranks llama-tiny's layers by damage, and its suggested recipe (which
`extends:` the analysed one, balanced or fp8), quantized afresh, reaches the target cosine that the
full recipe misses."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.test_export import tiny_model, write_recipe

from quantkit import console
from quantkit.cli import main

TARGET = 0.998  # fp8 on llama-tiny with 16 samples: 0.9945 with every layer quantized
BALANCED_TARGET = 0.99  # the CLI's default; balanced on llama-tiny with 16 samples: 0.9865 with every layer quantized


@pytest.fixture(autouse=True)
def _loud_again():
    yield
    console.set_quiet(False)


def test_llama_tiny_suggestion_reaches_the_target(tmp_path, capsys):
    from quantkit import ptq
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    out = tmp_path / "sens"
    assert main(["sensitivity", "--recipe", "fp8", "--model", "llama-tiny", "--max-samples", "16",
                 "--granularity", "layer", "--target", str(TARGET), "--device", "cpu", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sensitivity.json").read_text())

    # 4 decoder layers x 7 linears in FP8 (lm_head stays FP16) and the attention matmuls: 29 units.
    ranking = result["ranking"]
    assert len(ranking) == 29 and sum(u["attention"] for u in ranking) == 1
    damages = [u["damage"] for u in ranking]
    assert damages == sorted(damages, reverse=True), "ranked by damage, most damaging first"
    assert all(u["damage"] == pytest.approx(1 - u["cosine"]) for u in ranking)
    assert damages[0] > 5 * damages[-1] > 0, "the units differ: the ranking means something"
    assert result["full_cosine"] == pytest.approx(0.9945, abs=5e-4)
    assert result["full_cosine"] < TARGET <= result["reached_cosine"], result["steps"]
    assert result["reached"] is True and result["steps"][-1]["verified"] is True
    assert 1 <= len(result["keep"]) < 28, "keeps some layers, not all"
    top = ranking[0]["unit"]
    assert top in result["keep"] or (top == "attention matmuls" and result["keep_attention"])

    # The printed table: rank 1 is the most damaging unit, with its cosine.
    row = next(line for line in printed.splitlines() if line.count("│") > 3 and line.split("│")[1].strip() == "1")
    cells = [c.strip() for c in row.strip().strip("│").split("│")]
    assert cells[1] == top and cells[3] == f"{ranking[0]['cosine']:.6f}" and cells[5] == "yes"

    # The suggestion is a recipe that extends fp8; quantized afresh it reaches the target.
    suggestion = out / "suggested-recipe.yaml"
    data = yaml.safe_load(suggestion.read_text())
    assert data["extends"] == "fp8" and data["name"] == "fp8-sensitive"
    assert data["rules"][0]["match"] == result["keep"] and data["rules"][0]["precision"] == "skip"
    recipe = load_recipe(suggestion)
    loaded = load_model("llama-tiny")
    calibration = ptq.open_calibration(loaded, None, False, 16)
    q = ptq.quantize(loaded, recipe, calibration, device="cpu", per_layer=False)
    plan = {row.name: str(row.precision) for row in q.plan.layers}
    assert all(plan[name] == "skip" for name in result["keep"])
    assert sum(p == "fp8" for p in plan.values()) == 28 - len(result["keep"])
    cos = q.report["metrics"]["fake-quant"]["logits"]["cosine"]
    assert cos >= TARGET, f"suggested recipe cosine {cos}"
    assert cos == pytest.approx(result["reached_cosine"], abs=1e-6)
    assert q.passed


def test_balanced_on_llama_tiny_suggestion_applied_with_quantize_reaches_the_target(tmp_path, capsys):
    """The issue's case through the CLI: sensitivity --recipe balanced, then quantize --recipe <the suggestion>."""
    out = tmp_path / "sens"
    assert main(["sensitivity", "--recipe", "balanced", "--model", "llama-tiny", "--max-samples", "16",
                 "--granularity", "layer", "--device", "cpu", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["target_cosine"] == BALANCED_TARGET
    # 12 NVFP4 MLP linears + 16 FP8 attention projections (lm_head and embeddings FP16) + the FP8 attention matmuls.
    ranking = result["ranking"]
    assert len(ranking) == 29 and sum(u["attention"] for u in ranking) == 1
    damages = [u["damage"] for u in ranking]
    assert damages == sorted(damages, reverse=True) and damages[0] > 5 * damages[-1] > 0
    assert result["full_cosine"] == pytest.approx(0.9865, abs=1e-3)
    assert result["full_cosine"] < BALANCED_TARGET <= result["reached_cosine"], result["steps"]
    assert 1 <= len(result["keep"]) <= 6 and result["reached"] is True
    keep = set(result["keep"])
    assert keep <= {u["unit"] for u in ranking[:6]}, "what is kept comes from the top of the ranking"
    heldout = result["heldout_samples"]
    assert result["samples"] == 16 and 1 <= heldout < 16
    assert (f"keeping {len(keep)} layer(s) in higher precision reaches {BALANCED_TARGET} "
            f"({result['reached_cosine']:.6f} on {heldout} held-out of 16 samples)") in " ".join(printed.split())

    # Applied as a recipe override: the YAML extends balanced, and `quantize --recipe` on it reaches the target.
    suggestion = out / "suggested-recipe.yaml"
    data = yaml.safe_load(suggestion.read_text())
    assert data["extends"] == "balanced" and data["name"] == "balanced-sensitive"
    assert f"on {heldout} held-out of 16 samples" in suggestion.read_text().splitlines()[1]
    assert sorted(data["rules"][0]["match"]) == sorted(keep) and data["rules"][0]["precision"] == "skip"
    run = tmp_path / "run"
    assert main(["quantize", "--recipe", str(suggestion), "--model", "llama-tiny", "--max-samples", "16",
                 "--device", "cpu", "--out", str(run), "-q"]) == 0
    plan = {row["name"]: row["precision"] for row in json.loads((run / "plan.json").read_text())["layers"]}
    assert all(plan[name] == "skip" for name in keep)
    assert sum(p == "nvfp4" for p in plan.values()) + sum(p == "fp8" for p in plan.values()) == 28 - len(keep)
    report = json.loads((run / "report.json").read_text())
    cos = report["metrics"]["fake-quant"]["logits"]["cosine"]
    assert cos >= BALANCED_TARGET, f"suggested recipe cosine {cos}"
    assert cos == pytest.approx(result["reached_cosine"], abs=1e-6)
    assert report["recipe"]["name"] == "balanced-sensitive" and report["passed"] is True
    assert report["coverage"]["by_precision"]["unquantized"]["layers"] == len(keep)
    assert report["calibration"]["heldout_samples"] == heldout, "quantize evaluates on the same held-out samples"


def test_units_and_switches_on_the_tiny_model(tmp_path):
    """Switching quantizers by unit: only the unit's own quantizers are on; restore() gives the recipe back."""
    from quantkit import calib, ptq
    from quantkit.recipe import load_recipe
    from quantkit.sensitivity import QuantizerSwitches, make_units, resolve_granularity

    loaded = tiny_model()
    recipe = load_recipe(write_recipe(tmp_path, "fp8"))
    plan = ptq.quantize_model(loaded, recipe, calib.synthetic_set(loaded, n=4, seed=0), dtype="fp32",
                              device=torch.device("cpu"), batch_size=4)
    assert resolve_granularity("auto", plan) == "layer"
    assert [len(make_units(plan, g)) for g in ("rule", "block", "layer")] == [1, 2, 12]
    blocks = make_units(plan, "block")
    assert [u.name for u in blocks] == ["blocks.0", "blocks.1"] and len(blocks[0].layers) == 6
    units = make_units(plan, "layer")
    switches = QuantizerSwitches(loaded.model, plan, units)
    modules = dict(loaded.model.named_modules())
    enabled = lambda: {n for n, m in modules.items() if n.endswith("_quantizer") and m.is_enabled}  # noqa: E731
    original = enabled()
    assert len(original) == 24  # weight and input quantizer of 12 FP8 linears
    up = next(u for u in units if u.name == "blocks.1.up")
    assert sorted(switches.quantizers_of(up)) == ["blocks.1.up.input_quantizer", "blocks.1.up.weight_quantizer"]
    switches.only([up])
    assert enabled() == {"blocks.1.up.input_quantizer", "blocks.1.up.weight_quantizer"}
    with torch.no_grad():
        x = loaded.example_inputs["x"]
        one = loaded.model(x)
        switches.only([])
        none = loaded.model(x)
    switches.restore()
    assert enabled() == original
    assert not torch.equal(one, none), "a unit's quantizers change the output"


def test_unreachable_target_keeps_everything_and_says_so(tmp_path):
    """With the head in FP16, no suggestion reaches cosine 1.0: all units end up kept and reached is False."""
    from quantkit import calib
    from quantkit.recipe import load_recipe
    from quantkit.sensitivity import analyse

    path = write_recipe(tmp_path, "fp8")
    path.write_text(path.read_text().replace("precision: skip\nattention", "precision: fp16\nattention"))
    recipe = load_recipe(path)
    loaded = tiny_model()
    result = analyse(tiny_model, recipe, calib.synthetic_set(loaded, n=10, seed=0), target_cosine=1.0,
                     granularity="block")
    assert [u.name for u in result.units] and len(result.units) == 2
    assert result.reached is False and not result
    assert sorted(result.keep) == sorted(n for u in result.units for n in u.layers)
    assert result.full_cosine < result.reached_cosine < 1.0
    assert result.override()["extends"] == str(path.resolve())
