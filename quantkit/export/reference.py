"""The ONNX Runtime reference run of an export: its outputs against the PyTorch fake-quant model and
against the FP32 reference, on the run's held-out calibration samples, written into report.json.

report["metrics"]["onnxruntime"] = {output: metrics vs the FP32 reference} and
report["onnxruntime_vs_fake_quant"] = {output: metrics vs the fake-quantized PyTorch model}. The
held-out split is rebuilt exactly as `quantize` made it (same set, same size, same seed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from quantkit import console
from quantkit.errors import InputError


@dataclasses.dataclass
class ReferenceResult:
    """ORT vs FP32 and ORT vs fake-quant, per output; truthy when ORT matches fake-quant to `cosine_min`."""

    vs_fp32: dict[str, Any]
    vs_fake_quant: dict[str, Any]
    samples: int
    notes: list[str]
    cosine_min: float = 0.9999

    @property
    def worst_cosine_vs_fake_quant(self) -> float:
        values = [m.cosine for m in self.vs_fake_quant.values() if m.finite]
        return min(values) if len(values) == len(self.vs_fake_quant) else float("nan")

    def __bool__(self) -> bool:
        return self.worst_cosine_vs_fake_quant >= self.cosine_min

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "notes": self.notes,
                "vs_fp32": {k: m.to_dict() for k, m in self.vs_fp32.items()},
                "vs_fake_quant": {k: m.to_dict() for k, m in self.vs_fake_quant.items()}}


def heldout_samples(run):
    """The held-out split of a loaded run, rebuilt exactly as `quantize` made it (same set, size and seed)."""
    from quantkit import ptq

    info = run.report.get("calibration", {}) if isinstance(run.report, dict) else {}
    total = info.get("samples_total")
    calibration = ptq.open_calibration(run.loaded, info.get("path"), bool(info.get("synthetic")), total)
    _, heldout = ptq.split_calibration(calibration, run.recipe)
    return heldout


def named_inputs(loaded, args, kwargs) -> dict[str, torch.Tensor]:
    named = dict(zip(loaded.input_names, args))
    named.update({k: v for k, v in kwargs.items() if k in loaded.input_names})
    return named


def reference_run(out_dir: str | Path, *, max_samples: int | None = None, batch_size: int | None = None,
                  onnx_path: str | Path | None = None, update_report: bool = True) -> ReferenceResult:
    """Run OUT/model.onnx on ONNX Runtime over the held-out samples and compare (see module docstring)."""
    from tqdm.auto import tqdm

    from quantkit.metrics import OutputsAccumulator
    from quantkit.models import DTYPES, load_model
    from quantkit.outdir import atomic_write_json
    from quantkit.ptq import load_quantized
    from quantkit.runtime.onnxruntime import OnnxRuntimeRunner

    out_dir = Path(out_dir)
    onnx_path = Path(onnx_path) if onnx_path else out_dir / "model.onnx"
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found; run `quantkit export --from {out_dir}` first")
    t0 = time.perf_counter()
    run = load_quantized(out_dir, "cpu")
    heldout = heldout_samples(run)
    if max_samples and len(heldout) > max_samples:
        heldout = heldout.subset(range(max_samples))
    batch_size = batch_size or run.recipe.calibration.batch_size
    reference = load_model(run.loaded.spec)
    reference.model.to(torch.float32).eval()
    runner = OnnxRuntimeRunner(onnx_path)
    vs_fp32, vs_fq = OutputsAccumulator(), OutputsAccumulator()
    batches = list(heldout.batches(batch_size, device="cpu", dtype=DTYPES[run.dtype]))
    with torch.no_grad():
        for args, kwargs in tqdm(batches, desc="onnxruntime reference", disable=console.is_quiet(), leave=False):
            named = named_inputs(run.loaded, args, kwargs)
            fake = {k: v.float() for k, v in run.loaded.named_outputs(run.loaded.model(*args, **kwargs)).items()}
            fp32_args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            fp32_kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
            ref = {k: v.float() for k, v in reference.named_outputs(reference.model(*fp32_args, **fp32_kwargs)).items()}
            ort = {k: v.float() for k, v in runner.run(named).items() if k in fake}
            vs_fq.update(fake, ort)
            vs_fp32.update(ref, ort)
    notes = list(runner.notes)
    runner.close()
    result = ReferenceResult(vs_fp32.result(), vs_fq.result(), len(heldout), notes)
    if update_report:
        path = out_dir / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        report.setdefault("metrics", {})["onnxruntime"] = {k: m.to_dict() for k, m in result.vs_fp32.items()}
        report["onnxruntime_vs_fake_quant"] = {k: m.to_dict() for k, m in result.vs_fake_quant.items()}
        report.setdefault("onnxruntime", {}).update(
            {"graph": onnx_path.name, "samples": result.samples, "verification_copy": notes,
             "graph_optimization": "disabled (ORT_DISABLE_ALL)", "seconds": round(time.perf_counter() - t0, 2)})
        atomic_write_json(path, report)
    return result


def print_reference(result: ReferenceResult) -> None:
    rows = []
    for label, metrics in (("ORT vs fake-quant", result.vs_fake_quant), ("ORT vs FP32", result.vs_fp32)):
        for name, m in metrics.items():
            rows.append((label, name, f"{m.cosine:.6f}" if m.finite else "not finite",
                         f"{m.snr_db:.2f}" if m.finite else "-", f"{m.max_abs_err:.3e}" if m.finite else "-"))
    console.show(console.rows_table(f"ONNX Runtime reference ({result.samples} held-out samples)",
                                    ("comparison", "output", "cosine", "SNR dB", "max abs"), rows))
    for note in result.notes:
        console.info(f"verification copy: {note}")
