"""Autotune: the precision ladder, one step at a time to the target, undoing needless steps, the
recipe it writes (extends the original, verified afresh), and exit 1 naming the best cosine when the
target cannot be reached. On the tiny two-block model of test_export, synthetic samples."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.test_export import tiny_model

from quantkit import autotune, calib, console
from quantkit.cli import main
from quantkit.recipe import Precision, load_recipe, recipe_from_dict

P = Precision


@pytest.fixture(autouse=True)
def _loud_again():
    yield
    console.set_quiet(False)


def test_ladders():
    assert autotune.ladder(P.NVFP4, "fp32") == [P.FP8, P.FP16, P.SKIP]
    assert autotune.ladder(P.NVFP4, "bf16") == [P.FP8, P.SKIP]  # the model's own 16-bit dtype is skip
    assert autotune.ladder(P.INT8, "fp32") == [P.FP16, P.SKIP]
    assert autotune.ladder(P.FP8, "fp16") == [P.SKIP]
    assert autotune.ladder(P.FP16, "fp32") == [P.SKIP]


RECIPE = {"name": "tiny-balanced", "default": "skip", "attention": {"precision": "skip"},
          "calibration": {"heldout_fraction": 0.25, "batch_size": 4},
          "rules": [{"match": ["*.up", "*.down"], "types": ["Linear"], "precision": "nvfp4"},
                    {"match": ["*_proj"], "types": ["Linear"], "precision": "fp8"}]}


# Bytes as the plan counts them (parameters, biases included): the up/down linears in NVFP4 at 4.5
# bits, the 8 projections in FP8 at 1 byte.
START_BYTES = round(2 * (32 * 64 + 64 + 64 * 32 + 32) * (0.5 + 1 / 16)) + 8 * (32 * 32 + 32)


def _run(target, **kw):
    loaded = tiny_model()
    cs = calib.synthetic_set(loaded, n=16, seed=0)
    made = [loaded]
    return autotune.autotune(lambda: made.pop() if made else tiny_model(), recipe_from_dict(RECIPE), cs,
                             target_cosine=target, **kw)


def test_the_ladder_moves_one_step_at_a_time_and_stops_at_the_target(tmp_path):
    console.set_quiet(True)
    probe = _run(-0.5, verify=False)  # the recipe's own cosine: reached, nothing moved, no other rung calibrated
    start = probe.start_cosine
    assert 0.9 < start < 0.999 and probe.changes() == {} and probe.calibrations == 1 and probe.reached
    target = 1 - (1 - start) / 3  # cut the recipe's loss to a third
    result = _run(target)
    assert result.start_cosine == pytest.approx(start, abs=1e-9)
    # 4 NVFP4 linears (ladder nvfp4 -> fp8 -> fp16 -> skip) and 8 FP8 projections (fp8 -> fp16 -> skip)
    assert sorted(len(u.rungs) for u in result.units) == [3] * 8 + [4] * 4
    assert result.calibrations == 2  # the recipe, and the FP8 rung of the NVFP4 layers: none per candidate
    downs = [s for s in result.steps if s["action"] == "down"]
    assert downs, result.steps
    rungs = {u.name: [str(p) for p in u.rungs] for u in result.units}
    position = {name: 0 for name in rungs}
    for s in downs:  # every step moves one unit exactly one rung down its ladder
        assert rungs[s["unit"]][position[s["unit"]]] == s["from"]
        position[s["unit"]] += 1
        assert rungs[s["unit"]][position[s["unit"]]] == s["to"]
    cosines = [s["cosine"] for s in downs]
    assert all(c < target for c in [start, *cosines[:-1]]), "it stops at the first step that reaches the target"
    assert cosines[-1] >= target
    # bytes grow with each step down and are what the ladder says
    assert all(b["linear_bytes"] > a["linear_bytes"] for a, b in zip([result.steps[0], *downs], downs))
    assert result.steps[0]["linear_bytes"] == START_BYTES
    # the verified cosine is a fresh quantize run of the written recipe, and reaches the target
    verified = [s for s in result.steps if s["action"] == "verified"]
    assert len(verified) == 1 and result.reached and result.reached_cosine == verified[0]["cosine"] >= target
    assert result.reached_cosine == pytest.approx(verified[0]["with_swapped_layers"], abs=1e-6)

    autotune.write_outputs(result, tmp_path / "out")
    data = yaml.safe_load((tmp_path / "out" / autotune.RECIPE_FILE).read_text())
    assert data["name"] == "tiny-balanced-autotuned" and data["thresholds"] == {"cosine_min": target}
    moved = {n for r in data["rules"] for n in r["match"]}
    assert moved == set(result.changes())
    saved = json.loads((tmp_path / "out" / autotune.RESULT_FILE).read_text())
    assert saved["reached"] is True and len(saved["steps"]) == len(result.steps)
    assert any(p["pareto"] for p in saved["pareto"]) and saved["calibrations"] == 2
    assert "data:image/png;base64," in (tmp_path / "out" / "report.html").read_text()


def test_an_unreachable_target_exits_1_naming_the_best_cosine(tmp_path, capsys):
    loaded = tiny_model()
    cs_dir = tmp_path / "calib"
    calib.synthetic_set(loaded, n=16, seed=0).save(cs_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    start_bytes = START_BYTES
    code = main(["autotune", "--recipe", str(recipe), "--model", "tests/test_export.py:tiny_model",
                 "--calib", str(cs_dir), "--target", "0.99999", "--max-linear-bytes", str(start_bytes + 2000),
                 "--device", "cpu", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    saved = json.loads((tmp_path / "out" / autotune.RESULT_FILE).read_text())
    best = max(s["cosine"] for s in saved["steps"] if "cosine" in s)
    assert f"target 0.99999 NOT reached: the best cosine found was {best:.6f}" in err
    assert saved["reached"] is False and all(s.get("linear_bytes", 0) <= start_bytes + 2000 for s in saved["steps"])
    assert main(["autotune", "--recipe", str(recipe), "--model", "tests/test_export.py:tiny_model",
                 "--calib", str(cs_dir), "--target", "1.5", "-q"]) == 2
