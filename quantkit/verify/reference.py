"""The ONNX Runtime reference run of an export: its outputs against the PyTorch fake-quant model and
against the FP32 reference, on the run's held-out calibration samples: a `ReferenceResult`, which
quantkit.report.render records in report.json.

It holds ORT vs the FP32 reference and vs the fake-quantized PyTorch model per output (end to
end), and ORT vs fake-quant per block, with each transformer block
of the PyTorch model fed the graph's own input to that block (quantkit/verify/blockwise.py says why:
end to end, rounding flips compound and even a right graph drifts). The verdict is per block where the
model has blocks, end to end otherwise. The held-out split is rebuilt exactly as `quantize` made it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from quantkit import console
from quantkit.errors import InputError


@dataclasses.dataclass
class ReferenceResult:
    """ORT vs FP32 and ORT vs fake-quant per output (end to end), and ORT vs fake-quant per block.

    Truthy when ORT matches fake-quant to `cosine_min`: in every block and the head when the model
    has blocks (`per_block`), else end to end."""

    vs_fp32: dict[str, Any]
    vs_fake_quant: dict[str, Any]
    samples: int
    notes: list[str]
    cosine_min: float = 0.9999
    per_block: dict[str, Any] | None = None
    graph: str = "model.onnx"  # the graph's file name in OUT
    seconds: float = 0.0

    @staticmethod
    def _worst(metrics: dict[str, Any]) -> float:
        values = [m.cosine for m in metrics.values() if m.finite]
        return min(values) if values and len(values) == len(metrics) else float("nan")

    @property
    def worst_cosine_vs_fake_quant(self) -> float:
        return self._worst(self.vs_fake_quant)

    @property
    def worst_cosine_per_block(self) -> float:
        return self._worst(self.per_block) if self.per_block else float("nan")

    @property
    def verdict(self) -> str:
        """What the pass/fail reads: "per block" where the model has blocks, else "end to end"."""
        return "per block" if self.per_block else "end to end"

    @property
    def worst_cosine(self) -> float:
        """The worst cosine the verdict reads."""
        return self.worst_cosine_per_block if self.per_block else self.worst_cosine_vs_fake_quant

    def __bool__(self) -> bool:
        return self.worst_cosine >= self.cosine_min

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "notes": self.notes, "cosine_min": self.cosine_min,
                "verdict": self.verdict, "passed": bool(self),
                "vs_fp32": {k: m.to_dict() for k, m in self.vs_fp32.items()},
                "vs_fake_quant": {k: m.to_dict() for k, m in self.vs_fake_quant.items()},
                "per_block": {k: m.to_dict() for k, m in (self.per_block or {}).items()}}


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
                  onnx_path: str | Path | None = None, update_report: bool = True, run=None, heldout=None,
                  fp32_outputs: list | None = None) -> ReferenceResult:
    """Run OUT/model.onnx on ONNX Runtime over the held-out samples and compare (see module docstring).

    `run` (a ptq.QuantizedRun), `heldout` (a CalibrationSet) and `fp32_outputs` (the FP32 model's
    named outputs per batch of `heldout`, as `quantize` measured them) are what is already in memory;
    each left out is rebuilt from the folder."""
    from tqdm.auto import tqdm

    import onnx

    from quantkit.io_names import to_model_outputs
    from quantkit.verify.blockwise import HEAD, find_boundaries, teacher_forced
    from quantkit.metrics import OutputsAccumulator
    from quantkit.models import DTYPES, load_model
    from quantkit.ptq import load_quantized
    from quantkit.verify.ort_copy import verification_runner

    out_dir = Path(out_dir)
    onnx_path = Path(onnx_path) if onnx_path else out_dir / "model.onnx"
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found; run `quantkit export --from {out_dir}` first")
    t0 = time.perf_counter()
    run = run if run is not None else load_quantized(out_dir, "cpu")
    heldout = heldout if heldout is not None else heldout_samples(run)
    if max_samples and len(heldout) > max_samples:
        heldout = heldout.subset(range(max_samples))
    batch_size = batch_size or run.recipe.calibration.batch_size
    reference = None
    if fp32_outputs is None:
        reference = load_model(run.loaded.spec)
        reference.model.to(torch.float32).eval()
    boundaries = find_boundaries(run.loaded.model, onnx.load(str(onnx_path), load_external_data=False))
    runner = verification_runner(onnx_path, extra_outputs=boundaries.tensors if boundaries else None)
    vs_fp32, vs_fq, per_block = OutputsAccumulator(), OutputsAccumulator(), OutputsAccumulator()
    batches = list(heldout.batches(batch_size, device="cpu", dtype=DTYPES[run.dtype]))
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(tqdm(batches, desc="onnxruntime reference", disable=console.is_quiet(),
                                                leave=False)):
            named = named_inputs(run.loaded, args, kwargs)
            fake = {k: v.float() for k, v in run.loaded.named_outputs(run.loaded.model(*args, **kwargs)).items()}
            fp32_args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            fp32_kwargs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
            ref = ({k: v.float() for k, v in fp32_outputs[i].items()} if reference is None else
                   {k: v.float() for k, v in reference.named_outputs(reference.model(*fp32_args, **fp32_kwargs)).items()})
            graph_values = runner.run(named)
            ort = {k: v.float() for k, v in to_model_outputs(graph_values, run.loaded.input_names,
                                                                run.loaded.output_names).items() if k in fake}
            vs_fq.update(fake, ort)
            vs_fp32.update(ref, ort)
            if boundaries:
                pairs, forced = teacher_forced(run.loaded.model, boundaries, graph_values,
                                               lambda: run.loaded.model(*args, **kwargs))
                if pairs:
                    forced = run.loaded.named_outputs(forced)
                    torch_side = {b: pt for b, (pt, _) in pairs.items()}
                    graph_side = {b: g for b, (_, g) in pairs.items()}
                    torch_side.update({f"{HEAD}: {k}": forced[k].float() for k in ort})
                    graph_side.update({f"{HEAD}: {k}": v for k, v in ort.items()})
                    per_block.update(torch_side, graph_side)
    notes = list(runner.notes)
    runner.close()
    if boundaries and not per_block.by_output:
        notes.append("per-block comparison not possible: no block's input/output found in the graph by shape")
    result = ReferenceResult(vs_fp32.result(), vs_fq.result(), len(heldout), notes,
                             per_block=per_block.result() or None, graph=onnx_path.name,
                             seconds=time.perf_counter() - t0)
    if update_report:
        from quantkit.report.render import record

        record(out_dir, "reference", result, pages=False)  # report.md/.html follow with the compile check
    return result


def print_reference(result: ReferenceResult) -> None:
    rows = []
    for label, metrics in (("ORT vs fake-quant, per block", result.per_block or {}),
                           ("ORT vs fake-quant, end to end", result.vs_fake_quant), ("ORT vs FP32", result.vs_fp32)):
        for name, m in metrics.items():
            rows.append((label, name, f"{m.cosine:.6f}" if m.finite else "not finite",
                         f"{m.snr_db:.2f}" if m.finite else "-", f"{m.max_abs_err:.3e}" if m.finite else "-"))
    console.show(console.rows_table(f"ONNX Runtime reference ({result.samples} held-out samples)",
                                    ("comparison", "output", "cosine", "SNR dB", "max abs"), rows))
    for note in result.notes:
        console.info(f"verification copy: {note}")
    basis = "every block and the head, each fed the graph's own input" if result.per_block else "end to end"
    worst = result.worst_cosine
    if result:
        console.info(f"ONNX Runtime matches the fake-quant model ({basis}): worst cosine {worst:.6f} >= {result.cosine_min}")
    else:
        # Not an export failure by itself: the audit decides that. FP16/BF16 graphs round intermediate
        # values at other points than PyTorch does (ONNX spells GELU and friends as several 16-bit
        # nodes), and inside a block those differences flip some FP8/INT8 roundings.
        console.warn(f"ONNX Runtime vs fake-quant ({basis}): worst cosine {worst:.6f} < {result.cosine_min}; "
                     "see report.json onnxruntime_vs_fake_quant_per_block for the block")
