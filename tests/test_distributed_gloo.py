"""Data-parallel calibration for real: `quantize --nproc 2 --device cpu` starts two gloo ranks (torchrun's
engine), and their saved state must equal a one-process run's bit for bit; a failing rank stops the
other and leaves nothing behind. The fixture routes the first samples through a second expert, so
rank 1 never calibrates that expert's quantizers (the case ModelOpt's own amax sync cannot pair up).
(Sharding arithmetic, refusals and --device-map: tests/test_distributed.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit import ptq
from quantkit.calib import CalibrationSet

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "dp_model.py"
SPEC = f"{FIXTURE}:routed_mlp"
sys.path.insert(0, str(FIXTURE.parent))
import dp_model  # noqa: E402

pytestmark = pytest.mark.slow


def _calib_folder(tmp_path: Path) -> Path:
    # 20 samples -> 18 calibrate (2 held out), batches of 3 -> 6 batches, 3 per rank. The first 5
    # samples take expert b: all in rank 0's batches, so rank 1 never calibrates b.
    return dp_model.save_calibration_set(tmp_path / "calib", n=20, routed=5)


def _quantize_cmd(calib: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit", "quantize", "--model", SPEC, "--calib", str(calib), "--recipe",
            "int8-smoothquant", "--batch-size", "3", "--device", "cpu", "--out", str(out), *extra]


def _single_process_state(calib: Path, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    loaded, recipe = load_model(SPEC), load_recipe("int8-smoothquant")
    calib_part, _ = ptq.split_calibration(CalibrationSet.open(calib), recipe)
    if rank0_only:
        calib_part = calib_part.subset(range(9))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        ptq.quantize_model(loaded, recipe, calib_part, dtype="fp32", device=torch.device("cpu"), batch_size=3)
    finally:
        torch.set_num_threads(threads)
    return loaded.model.state_dict()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TQDM_DISABLE"):
        env.pop(k, None)
    return env


def test_two_gloo_ranks_give_the_single_process_state_bit_for_bit(tmp_path):
    calib = _calib_folder(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(_quantize_cmd(calib, out, "--nproc", "2"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Progress: each rank's bar counts its own samples out of the total; rank 0 prints the split and the sum.
    for rank in (0, 1):
        bar = rf"calibrate rank {rank}/2 \(9 of 18 samples\): .*\| \d/9 \["
        assert re.search(bar, proc.stderr), proc.stderr[-2000:]
    stdout = " ".join(proc.stdout.split())
    assert "18 calibrate, in batches of 3: rank 0 9 (3 batches), rank 1 9 (3 batches)" in stdout, stdout[:2000]
    assert re.search(r"calibrated 18 samples on 2 ranks \(rank 0: 9 in [\d.]+ s, rank 1: 9 in [\d.]+ s\)", stdout)
    assert stdout.count("PASSED") == 1  # rank 0 alone reports

    report = json.loads((out / "report.json").read_text())
    dp = report["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "gloo" and dp["samples"] == 18
    assert [(s["rank"], s["batches"], s["samples"]) for s in dp["shards"]] == [(0, 3, 9), (1, 3, 9)]
    (calibration_pass,) = dp["passes"]  # SmoothQuant calibrates once
    assert [r["samples"] for r in calibration_pass["ranks"]] == [9, 9]
    assert calibration_pass["quantizers_reduced"] == 6  # input + weight of up, a, b
    assert calibration_pass["missing_on_some_rank"] == 1  # b.input_quantizer: rank 1 never routed there
    assert report["calibration"]["calibration_samples"] == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "out"]  # no staging folder left by any rank

    saved = torch.load(out / ptq.STATE_FILE, weights_only=False)["model_state_dict"]
    single = _single_process_state(calib)
    assert sorted(saved) == sorted(single)
    for name in single:  # amax, SmoothQuant's pre_quant_scale and the smoothed weights alike
        assert torch.equal(saved[name], single[name]), f"{name}: 2 ranks {saved[name]} vs 1 process {single[name]}"
    assert saved["b.input_quantizer._amax"].numel() == 1 and saved["up.input_quantizer._pre_quant_scale"].numel() == 32

    # Rank 1's shard mattered: rank 0's batches alone give other statistics.
    rank0 = _single_process_state(calib, rank0_only=True)
    assert not torch.equal(rank0["up.input_quantizer._pre_quant_scale"], single["up.input_quantizer._pre_quant_scale"])


def test_a_failing_rank_stops_the_others_and_writes_nothing(tmp_path):
    calib = _calib_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".quantkit-output").write_text("{}")  # an earlier run's folder (quantize replaces only those)
    (out / "previous.txt").write_text("an earlier run")
    proc = subprocess.run(_quantize_cmd(calib, out, "--nproc", "2", "-q"), cwd=ROOT, capture_output=True, text=True,
                          env=_env(QUANTKIT_DP_FAIL_RANK="1"), timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RankFailure: rank 1 of 2 failed: QuantkitError: injected failure on rank 1"), last
    assert "the other ranks were stopped" in last and f"{out} is as it was" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".quantkit-output", "previous.txt"]
    assert (out / "previous.txt").read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "out"]  # no staging folder left behind


def test_bad_input_on_the_ranks_exits_2_and_keeps_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".quantkit-output").write_text("{}")  # an earlier run's folder (quantize replaces only those)
    (out / "previous.txt").write_text("an earlier run")
    proc = subprocess.run(_quantize_cmd(tmp_path / "no-such-set", out, "--nproc", "2", "-q"), cwd=ROOT,
                          capture_output=True, text=True, env=_env(), timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"RankFailure: rank [01] of 2 failed: CalibrationError: .*no-such-set: no such calibration set "
                    r"folder", last), last
    assert f"{out} is as it was" in last and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [".quantkit-output", "previous.txt"]
