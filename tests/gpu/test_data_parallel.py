"""Calibration beyond one GPU (device kind nvidia-h200-x2): 2 NCCL ranks give the 1-GPU amax bit for bit;
`--device-map auto` with a --max-memory below the model's size splits it over 2 GPUs, calibrates the
placed model and exports it to ONNX. Skipped, with the reason, where fewer than 2 GPUs are visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from quantkit import ptq
from quantkit.models import load_model
from quantkit.recipe import load_recipe

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[2]
WIDE = f"{ROOT / 'tests' / 'fixtures' / 'dp_model.py'}:wide_llama"
GPUS = torch.cuda.device_count()

pytestmark = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, {GPUS} visible (run on the device kind "
                                                 "nvidia-h200-x2)")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _quantize(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "quantkit", "quantize", *args, "-q"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _one_gpu_state(model: str, max_samples: int, batch_size: int, dtype: str) -> dict[str, torch.Tensor]:
    """The plain one-process calibration on cuda:0 over the same samples, in the same batches."""
    loaded, recipe = load_model(model), load_recipe("fp8")
    calibration = ptq.open_calibration(loaded, None, False, max_samples)
    calib_part, _ = ptq.split_calibration(calibration, recipe)
    ptq.quantize_model(loaded, recipe, calib_part, dtype=dtype, device=torch.device("cuda", 0), batch_size=batch_size)
    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    del loaded
    torch.cuda.empty_cache()
    return state


def test_two_nccl_ranks_give_the_one_gpu_amax_bit_for_bit(tmp_path):
    out = tmp_path / "dp2"
    _quantize("--recipe", "fp8", "--model", "llama-tiny", "--dtype", "bf16", "--device", "cuda", "--nproc", "2",
              "--max-samples", "160", "--batch-size", "8", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    dp = report["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "nccl"
    calibrated = report["calibration"]["calibration_samples"]
    (calibration_pass,) = dp["passes"]
    assert [r["device"] for r in calibration_pass["ranks"]] == ["cuda:0", "cuda:1"]
    assert sum(r["samples"] for r in calibration_pass["ranks"]) == calibrated == 144  # 160 less 10% held out
    assert calibration_pass["quantizers_reduced"] > 0 and calibration_pass["never_calibrated"] == 0

    saved = torch.load(out / ptq.STATE_FILE, map_location="cpu", weights_only=False)["model_state_dict"]
    single = _one_gpu_state("llama-tiny", 160, 8, "bf16")
    amax = sorted(k for k in single if k.endswith("_amax"))
    assert len(amax) == calibration_pass["quantizers_reduced"], (len(amax), calibration_pass)
    assert sorted(saved) == sorted(single)
    differ = [k for k in amax if not torch.equal(saved[k], single[k])]
    print(f"\n2 NCCL ranks vs 1 GPU: {len(amax)} amax tensors, {len(differ)} differ")
    assert not differ, {k: (saved[k].flatten()[:4], single[k].flatten()[:4]) for k in differ[:5]}


def test_device_map_auto_splits_a_model_over_two_gpus_and_exports(tmp_path):
    from quantkit.placement import fp32_bytes

    budget = 59 * 2**20  # per GPU, below the model's 85 MiB: it cannot sit on either GPU alone
    recipe = tmp_path / "fp8-gate-0.98.yaml"  # random weights: FP8 gives cosine ~0.988 (see the fixture)
    recipe.write_text("name: fp8-gate-0.98\nextends: fp8\nthresholds: {cosine_min: 0.98}\n")
    out = tmp_path / "placed"
    _quantize("--recipe", str(recipe), "--model", WIDE, "--device", "cuda", "--device-map", "auto",
              "--max-memory", "0=59MiB,1=59MiB", "--max-samples", "64", "--batch-size", "8", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    placement = report["placement"]
    total = fp32_bytes(load_model(WIDE).model)
    assert total > budget
    assert placement["mode"] == "auto" and placement["main_device"] == "cuda:0"
    assert set(placement["device_map"].values()) == {"cuda:0", "cuda:1"}, placement["device_map"]
    assert all(k == "lm_head" or k.startswith("model.") and k.count(".") <= 2 for k in placement["device_map"])
    assert sorted(placement["bytes_per_device"]) == ["cuda:0", "cuda:1"]
    assert sum(placement["bytes_per_device"].values()) == total
    assert all(b <= budget for b in placement["bytes_per_device"].values()), placement["bytes_per_device"]
    cosine = report["metrics"]["fake-quant"]["logits"]["cosine"]
    assert cosine >= 0.98, f"cosine {cosine}"

    # The placed calibration computes what one GPU computes (same kernels, activations only moved).
    saved = torch.load(out / ptq.STATE_FILE, map_location="cpu", weights_only=False)["model_state_dict"]
    single = _one_gpu_state(WIDE, 64, 8, "fp32")
    for k in (k for k in single if k.endswith("_amax")):
        torch.testing.assert_close(saved[k], single[k], rtol=1e-6, atol=0, msg=lambda m, k=k: f"{k}: {m}")

    # WIDE is a file.py:function spec: a run folder's code is imported only when trusted
    proc = subprocess.run([sys.executable, "-m", "quantkit", "export", "--from", str(out), "--trust-model-code", "-q"],
                          cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = json.loads((out / "export.json").read_text())
    assert (out / "model.onnx").stat().st_size == info["files"]["model.onnx"] > 0
    assert info["opset"] >= 19 and [i["name"] for i in info["inputs"]] == ["input_ids", "attention_mask"]
    audit = json.loads((out / "audit.json").read_text())
    print(f"\n--device-map auto: {placement['bytes_per_device']} of {total} B; cosine {cosine:.6f}; "
          f"ONNX {info['size_bytes']} B, {info['nodes']} nodes")
    assert audit["passed"] and not audit["violations"]
    # 6 layers x 7 linears + 6 x 2 attention matmuls in FP8 (the CPU export of this fixture gives the same)
    assert audit["counts"]["compute_by_format"]["fp8"] == {"MatMul": 54}
    assert audit["counts"]["attention_matmuls"] == {"with_qdq": 12, "without_qdq": 0}
