"""Autotune: the precision ladder (its W4A8 rung), one step at a time to the target (zero-byte steps
first), undoing needless steps, the recipe it writes (extends the original, loads, verified afresh),
and exit 1 naming the best cosine when the target cannot be reached. On the tiny two-block model of
test_export, synthetic samples."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.test_export import tiny_model

from quantkit import autotune, calib, console
from quantkit.autotune import Rung
from quantkit.cli import main
from quantkit.plan import make_plan
from quantkit.recipe import Precision, load_recipe, recipe_from_dict

P = Precision


@pytest.fixture(autouse=True)
def _loud_again():
    yield
    console.set_quiet(False)


def _labels(start, model_dtype, nvfp4_algorithm=None):
    return [r.label for r in autotune.ladder(start, model_dtype, nvfp4_algorithm)]


def test_ladders():
    # by default an NVFP4 rule that names no weight algorithm gets a GPTQ rung, then W4A8 keeps GPTQ
    assert [r.label for r in autotune.ladder(P.NVFP4, "fp32")] == [
        "nvfp4", "nvfp4-gptq", "nvfp4-w4a8-gptq", "fp8", "fp16", "skip"]
    assert _labels(P.NVFP4, "fp32") == ["nvfp4", "nvfp4-w4a8", "fp8", "fp16", "skip"]
    assert _labels(P.NVFP4, "bf16", "awq_lite") == ["nvfp4", "nvfp4-awq_lite", "nvfp4-w4a8-awq_lite", "fp8", "skip"]
    assert _labels(P.NVFP4, "bf16") == ["nvfp4", "nvfp4-w4a8", "fp8", "skip"]  # the model's own 16-bit dtype is skip
    # a calibrator that rewrites the weights (awq, smoothquant) excludes a weight algorithm: no such rung,
    # and every rung's rule is one the recipe schema takes
    for calibrator in ("awq", "smoothquant"):
        rungs = autotune.ladder(Rung(P.NVFP4, P.NVFP4, P.NVFP4, None, calibrator), "fp32")
        assert [r.label for r in rungs] == ["nvfp4", "nvfp4-w4a8", "fp8", "fp16", "skip"]
        assert all(r.rule(["x"]).precision == r.precision for r in rungs)
    assert _labels(P.INT8, "fp32") == ["int8", "fp16", "skip"]
    assert _labels(P.FP8, "fp16") == ["fp8", "skip"]
    assert _labels(P.FP16, "fp32") == ["fp16", "skip"]


def test_the_nvfp4_ladder_starts_from_the_rule_and_its_w4a8_rung_keeps_the_weight_algorithm(tmp_path):
    parent = {"name": "r", "default": "skip", "attention": {"precision": "skip"}, "rules": [
        {"match": ["*.up"], "types": ["Linear"], "precision": "nvfp4", "algorithm": "gptq"},
        {"match": ["*.down"], "types": ["Linear"], "precision": "nvfp4", "activations": "fp8", "algorithm": "gptq"},
        {"match": ["*.q_proj"], "types": ["Linear"], "precision": "nvfp4", "activations": "fp16"}]}
    plan = make_plan(tiny_model().model, recipe_from_dict(parent))
    up, down, q = (Rung.of_row(plan.layer(f"blocks.0.{n}")) for n in ("up", "down", "q_proj"))
    rungs = autotune.ladder(up, "fp32")  # the rule names gptq: no other algorithm's rung is added
    assert [r.label for r in rungs] == ["nvfp4-gptq", "nvfp4-w4a8-gptq", "fp8", "fp16", "skip"]
    assert rungs[1] == Rung(P.NVFP4, P.NVFP4, P.FP8, "gptq") and rungs[2] == Rung.plain(P.FP8)
    assert rungs[1].rule_fields() == {"precision": "nvfp4", "activations": "fp8", "algorithm": "gptq"}
    # The rule already has FP8 activations (or none quantized): no W4A8 rung.
    assert _labels(down, "fp32", "gptq") == ["nvfp4-w4a8-gptq", "fp8", "fp16", "skip"]
    assert _labels(q, "fp32") == ["nvfp4-weight-only", "fp8", "fp16", "skip"]
    assert _labels(q, "fp32", "gptq") == ["nvfp4-weight-only", "nvfp4-weight-only-gptq", "fp8", "fp16", "skip"]
    assert [u.bytes_at(i, "fp32") for u in [autotune.Unit("x", 1600, rungs)] for i in range(5)] == [900, 900, 1600,
                                                                                                     3200, 6400]
    # The rule autotune writes for the W4A8 rung (as override() does) loads through `extends` and plans
    # the layer on that very rung: NVFP4 weights by GPTQ, FP8 activations.
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(
        {"name": "tuned", "extends": "r.yaml", "rules": [{"match": ["blocks.0.up"], **rungs[1].rule_fields()}]}))
    row = make_plan(tiny_model().model, load_recipe(tmp_path / "tuned.yaml")).layer("blocks.0.up")
    assert (row.precision, row.weights, row.activations, row.algorithm) == (P.NVFP4, P.NVFP4, P.FP8, "gptq")
    assert Rung.of_row(row) == rungs[1] and rungs[1].rule(["blocks.0.up"]).activation_precision == P.FP8


def test_free_steps_with_a_gain_go_first_then_gain_per_byte_then_free_steps_without_gain():
    key = autotune._priority  # (gain, weight bytes the step costs)
    free_small, free_big, free_loss = key(1e-7, 0), key(2e-7, 0), key(-1e-6, 0)
    paid_good, paid_loss = key(0.01, 1000), key(-0.001, 1000)
    # A zero-byte step with a tiny gain beats 1e-5 per byte (the old max(1, bytes) cost put it after).
    assert sorted([paid_loss, free_loss, paid_good, free_small, free_big], reverse=True) == [
        free_big, free_small, paid_good, paid_loss, free_loss]
    assert paid_good == (1, pytest.approx(1e-5), 0.01)


def test_a_free_rung_that_measures_no_gain_is_passed_over():
    unit = autotune.Unit("x", 1600, autotune.ladder(P.NVFP4, "fp32", None))  # nvfp4, w4a8, fp8, fp16, skip
    measured = []

    def gain_at(gains):
        return lambda position: measured.append(position) or gains[position]

    assert autotune.measure_next(unit, gain_at({1: -0.002, 2: 0.004}), "fp32") == [(1, -0.002)]
    assert (unit.next_position, unit.next_gain, measured) == (2, 0.004, [1, 2])  # nvfp4 -> fp8 directly
    measured.clear()
    assert autotune.measure_next(unit, gain_at({1: 0.001}), "fp32") == []
    assert (unit.next_position, unit.next_gain, measured) == (1, 0.001, [1])
    unit.position = 2  # a rung that costs bytes is measured, gain or not
    assert autotune.measure_next(unit, gain_at({3: -0.003}), "fp32") == [] and unit.next_position == 3
    attention = autotune.Unit(autotune.ATTENTION_UNIT, 0, [Rung.plain(P.FP8), Rung.plain(P.SKIP)])
    assert autotune.measure_next(attention, lambda p: -0.001, "fp32") == []  # the last rung is never passed
    assert (attention.next_position, attention.next_gain) == (1, -0.001)


RECIPE = {"name": "tiny-balanced", "default": "skip", "attention": {"precision": "skip"},
          "calibration": {"heldout_fraction": 0.25, "batch_size": 4},
          "rules": [{"match": ["*.up", "*.down"], "types": ["Linear"], "precision": "nvfp4"},
                    {"match": ["*_proj"], "types": ["Linear"], "precision": "fp8"}]}


# Bytes as the plan counts them (parameters, biases included): the up/down linears in NVFP4 at 4.5
# bits, the 8 projections in FP8 at 1 byte.
START_BYTES = round(2 * (32 * 64 + 64 + 64 * 32 + 32) * (0.5 + 1 / 16)) + 8 * (32 * 32 + 32)


def _run(target, recipe=None, **kw):
    loaded = tiny_model()
    cs = calib.synthetic_set(loaded, n=16, seed=0)
    made = [loaded]
    kw.setdefault("nvfp4_algorithm", None)  # the GPTQ rung is exercised through the CLI below
    return autotune.autotune(lambda: made.pop() if made else tiny_model(), recipe or recipe_from_dict(RECIPE), cs,
                             target_cosine=target, **kw)


def test_the_ladder_moves_one_step_at_a_time_and_stops_at_the_target(tmp_path):
    console.set_quiet(True)
    path = tmp_path / "tiny-balanced.yaml"  # a file, so that the written recipe's `extends` loads
    path.write_text(yaml.safe_dump(RECIPE))
    recipe = load_recipe(path)
    # the recipe's own cosine: reached, nothing moved, no other rung calibrated
    probe = _run(-0.5, recipe, verify=False)
    start = probe.start_cosine
    assert 0.9 < start < 0.999 and probe.changes() == {} and probe.calibrations == 1 and probe.reached
    target = 1 - (1 - start) / 3  # cut the recipe's loss to a third
    result = _run(target, recipe)
    assert result.start_cosine == pytest.approx(start, abs=1e-9)
    # 4 NVFP4 linears (nvfp4 -> nvfp4-w4a8 -> fp8 -> fp16 -> skip) and 8 FP8 projections (fp8 -> fp16 -> skip)
    rungs = {u.name: [r.label for r in u.rungs] for u in result.units}
    assert sorted(len(r) for r in rungs.values()) == [3] * 8 + [5] * 4
    assert rungs["blocks.0.up"] == ["nvfp4", "nvfp4-w4a8", "fp8", "fp16", "skip"]
    assert result.calibrations == 3  # the recipe, the W4A8 and the FP8 rungs of the NVFP4 layers: none per candidate
    measured = next(s for s in result.steps if s["action"] == "measured")
    assert {n: t for n, t in measured["to"].items() if rungs[n][0] == "nvfp4"} == {
        f"blocks.{i}.{n}": "nvfp4-w4a8" for i in (0, 1) for n in ("up", "down")}
    downs = [s for s in result.steps if s["action"] == "down"]
    assert downs and not [s for s in result.steps if s["action"] == "passed"], result.steps
    position = {name: 0 for name in rungs}
    for s in downs:  # every step moves one unit exactly one rung down its ladder
        assert rungs[s["unit"]][position[s["unit"]]] == s["from"]
        position[s["unit"]] += 1
        assert rungs[s["unit"]][position[s["unit"]]] == s["to"]
    cosines = [s["cosine"] for s in downs]
    assert all(c < target for c in [start, *cosines[:-1]]), "it stops at the first step that reaches the target"
    assert cosines[-1] >= target
    # The four zero-byte W4A8 steps (each measured a gain) come first, largest gain first; then steps that
    # cost bytes (the down linears to FP8: 2080 parameters, 1170 -> 2080 bytes).
    assert result.steps[0]["linear_bytes"] == START_BYTES
    costs = [b["linear_bytes"] - a["linear_bytes"] for a, b in zip([result.steps[0], *downs], downs)]
    assert costs == [0, 0, 0, 0, 910, 910]
    assert [s["to"] for s in downs] == ["nvfp4-w4a8"] * 4 + ["fp8"] * 2
    free_gains = [s["measured_gain"] for s in downs[:4]]
    assert min(free_gains) > 0 and free_gains == sorted(free_gains, reverse=True)
    # the verified cosine is a fresh quantize run of the written recipe, and reaches the target
    verified = [s for s in result.steps if s["action"] == "verified"]
    assert len(verified) == 1 and result.reached and result.reached_cosine == verified[0]["cosine"] >= target
    assert result.reached_cosine == pytest.approx(verified[0]["with_swapped_layers"], abs=1e-6)

    autotune.write_outputs(result, tmp_path / "out")
    data = yaml.safe_load((tmp_path / "out" / autotune.RECIPE_FILE).read_text())
    assert data["name"] == "tiny-balanced-autotuned" and data["thresholds"] == {"cosine_min": target}
    assert data["extends"] == str(path)
    moved = {n for r in data["rules"] for n in r["match"]}
    assert moved == set(result.changes())
    assert {str(v) for v in result.changes().values()} == {"nvfp4-w4a8", "fp8"}
    # The written recipe loads and plans every unit on the rung autotune left it on: the W4A8 layers
    # with NVFP4 weights and FP8 activations.
    written = make_plan(tiny_model().model, load_recipe(tmp_path / "out" / autotune.RECIPE_FILE))
    assert {u.name: Rung.of_row(written.layer(u.name)) for u in result.units} == {u.name: u.rung for u in result.units}
    w4a8 = [r for r in written.layers if r.weights == P.NVFP4 and r.activations == P.FP8]
    assert sorted(r.name for r in w4a8) == [n for n, v in result.changes().items() if str(v) == "nvfp4-w4a8"]
    assert all(r.precision == P.NVFP4 for r in w4a8)
    saved = json.loads((tmp_path / "out" / autotune.RESULT_FILE).read_text())
    assert saved["schema"] == "quantkit.autotune/2"
    assert saved["reached"] is True and len(saved["steps"]) == len(result.steps)
    assert {u["unit"]: u["ladder"] for u in saved["units"]} == rungs
    assert {u["unit"]: u["rung"] for u in saved["units"] if u["rung"] != u["ladder"][0]} == saved["changes"]
    assert [s["to"] for s in saved["steps"] if s["action"] == "down"] == [s["to"] for s in downs]
    assert any(p["pareto"] for p in saved["pareto"]) and saved["calibrations"] == 3
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
    # the CLI's default ladder tries GPTQ weights on the NVFP4 rule (which names no algorithm), W4A8 with them
    ladders = {u["unit"]: u["ladder"] for u in saved["units"]}
    assert ladders["blocks.0.up"] == ["nvfp4", "nvfp4-gptq", "nvfp4-w4a8-gptq", "fp8", "fp16", "skip"]
    assert saved["calibrations"] == 4  # the recipe, GPTQ, W4A8 + GPTQ, FP8
    assert main(["autotune", "--recipe", str(recipe), "--model", "tests/test_export.py:tiny_model",
                 "--calib", str(cs_dir), "--target", "1.5", "-q"]) == 2
