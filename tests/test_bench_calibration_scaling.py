"""scripts/bench_calibration_scaling.py on the CPU: its --smoke --device cpu mode runs the same code as
the GPU benchmark (bench_gpu's decoder, 1 process vs 2 ranks, here over gloo), so CI checks the logic
and the JSON it writes; it must refuse the GPU benchmark where fewer than 2 GPUs are visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_calibration_scaling.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=dict(env, PYTHONWARNINGS="ignore"),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine can run the real benchmark")
def test_refuses_without_two_gpus():
    proc = _run()
    assert proc.returncode == 2
    assert f"but {torch.cuda.device_count()} CUDA GPU(s) are visible" in proc.stderr
    assert "--smoke --device cpu" in proc.stderr
    proc = _run("--device", "cpu")
    assert proc.returncode == 2 and "add --smoke" in proc.stderr


@pytest.mark.slow
def test_smoke_on_cpu_ranks(tmp_path):
    out = tmp_path / "scaling.json"
    proc = _run("--smoke", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    one, two = report["runs"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["samples"] == two["samples"] == report["samples"] == 64  # bench_gpu's smoke calibration split
    assert two["per_rank_samples"] == [32, 32] and two["backend"] == "gloo"
    assert len(two["per_rank_forward_s"]) == 2 and two["reduce_s"] >= 0
    assert one["calibration_wall_s"] > 0 and two["calibration_wall_s"] > 0
    assert one["ranks"][0]["params"] == report["params"] > 1_000_000
    assert report["amax"] == {"tensors": 36, "values": 36, "differ": 0, "differing": [], "same_names": True,
                              "bitwise_equal": True}
    assert "| CPU ranks | calibration wall s |" in proc.stdout and "bit-equal (36 tensors)" in proc.stdout
