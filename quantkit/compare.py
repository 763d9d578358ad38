"""`quantkit compare OUT`: every runtime of a quantize output folder against one reference, per output.

On the run's held-out samples it runs the FP32 model, the fake-quant PyTorch model, ONNX Runtime
(OUT/model.onnx from `quantkit export`), TensorRT (OUT/model.engine + engine.json, where TensorRT
imports) and torch-fp8 (the FP8 linears as real FP8 GEMMs, torch._scaled_mm, on an SM 8.9+ GPU with
--device cuda); a runtime whose prerequisites are missing here is recorded as "not available: <why>".
Metrics against FP32 refresh report.json/md/html (the report's gate); against another reference
(--against) they go under report.json's `comparisons/<reference>`. The recipe saved in the folder
sets the thresholds, and the comparison asked for is judged by them (the CLI's exit code).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from quantkit import console
from quantkit.errors import InputError, QuantkitError
from quantkit.metrics import Metrics, Thresholds, Verdict, judge

REFERENCES = ("fp32", "fake-quant", "onnxruntime", "tensorrt")
CANDIDATES = ("fake-quant", "onnxruntime", "tensorrt", "torch-fp8")


class RuntimeUnavailable(Exception):
    """A runtime's prerequisites (its file, its library, a GPU) are missing here: not a failure."""


@dataclasses.dataclass
class RuntimeStatus:
    name: str
    available: bool
    reason: str | None = None  # why it is not available
    error: str | None = None  # why it failed while running (a failure, unlike unavailability)
    samples: int = 0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.available and self.error is None

    def describe(self) -> str:
        if self.error:
            return f"failed: {self.error}"
        return "ran" if self.available else f"not available: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        d = {"available": self.available, "reason": self.reason, "error": self.error, "samples": self.samples,
             "seconds": round(self.seconds, 3), "notes": self.notes}
        return {k: v for k, v in d.items() if v is not None}


@dataclasses.dataclass
class Comparison:
    """Each candidate runtime against `against`, per output; truthy when the recipe's thresholds are met."""

    out_dir: Path
    against: str
    thresholds: Thresholds
    samples: int
    runtimes: dict[str, RuntimeStatus]  # every runtime tried, the references included
    metrics: dict[str, dict[str, Metrics]]  # candidate -> output -> metrics against `against`
    verdict: Verdict
    report_passed: bool  # the report's own gate: every measured runtime against FP32
    vs_fp32: dict[str, dict[str, Metrics]] = dataclasses.field(default_factory=dict)  # runtime -> output -> vs FP32
    histograms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # runtime -> output -> errors vs FP32
    ort_vs_fake_quant: dict[str, Metrics] | None = None  # when both ran
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.verdict)

    def rows(self) -> list[tuple[str, ...]]:
        th = self.thresholds
        rows = []
        for name, status in self.runtimes.items():
            if name == self.against or (name == "fp32" and self.against != "fp32"):
                continue
            if name not in self.metrics:
                rows.append((name, "—", "—", "—", "—", "—", status.describe()))
                continue
            for output, m in self.metrics[name].items():
                if not m.finite:
                    rows.append((name, output, "not finite", "-", "-", "-", f"FAIL: {m.reason}"))
                    continue
                fails = m.failures(th)
                rows.append((name, output, f"{m.cosine:.6f}", f"{m.snr_db:.2f}", f"{m.mse:.3e}",
                             f"{m.max_abs_err:.3e}", "pass" if not fails else "FAIL: " + "; ".join(fails)))
        return rows


# ---------------------------------------------------------------------------------------------
# The output folder


def _read_json(path: Path, what: str) -> Any:
    from quantkit.textlimits import check_depth, read_text_limited

    try:
        data = json.loads(read_text_limited(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: corrupt {what} (invalid JSON at line {e.lineno} column {e.colno}: {e.msg}); "
                         "re-run `quantkit quantize --out` for this folder") from None
    except RecursionError:
        raise InputError(f"{path}: corrupt {what} (nested too deeply to read)") from None
    check_depth(data, path, what)
    return data


def check_run_folder(out_dir: str | Path) -> dict[str, Any]:
    """The folder's report.json, after checking that everything `compare` reads is there and readable."""
    from quantkit.ptq import RUN_FILE, STATE_FILE

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such folder; pass the --out folder of `quantkit quantize`")
    for name in (RUN_FILE, STATE_FILE, "recipe.yaml", "report.json"):
        if not (out_dir / name).is_file():
            raise InputError(f"{out_dir / name}: not found; {out_dir} is not a complete quantize output folder "
                             "(re-run `quantkit quantize --out` for it)")
    run = _read_json(out_dir / RUN_FILE, "run record")
    if not isinstance(run, dict) or "model" not in run or "dtype" not in run:
        raise InputError(f"{out_dir / RUN_FILE}: corrupt run record (needs 'model' and 'dtype')")
    report = _read_json(out_dir / "report.json", "report")
    if not isinstance(report, dict) or not isinstance(report.get("calibration"), dict):
        raise InputError(f"{out_dir / 'report.json'}: corrupt report (no 'calibration' section to rebuild the "
                         "held-out samples from); re-run `quantkit quantize --out` for this folder")
    return report


def _load_run(out_dir: Path, device: torch.device):
    from quantkit.ptq import STATE_FILE, load_quantized

    try:
        return load_quantized(out_dir, device)
    except QuantkitError:
        raise
    except Exception as e:  # a truncated or foreign modelopt_state.pth: unpickling/restore errors of many types
        detail = (str(e).splitlines() or ["no detail"])[0].split(". ")[0][:200]
        raise InputError(f"{out_dir / STATE_FILE}: cannot be restored onto the model ({type(e).__name__}: {detail}); "
                         "re-run `quantkit quantize --out`") from None


# ---------------------------------------------------------------------------------------------
# Runtimes: each opens or says why it cannot, then maps one batch (args, kwargs) to named outputs


def _to_device(args: tuple, kwargs: dict[str, Any], device: torch.device) -> tuple[tuple, dict[str, Any]]:
    move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


class _TorchRuntime:
    def __init__(self, name: str, loaded, model: torch.nn.Module, device: torch.device):
        self.name, self.loaded, self.model, self.device = name, loaded, model, device
        self.notes: list[str] = []

    @torch.no_grad()
    def run_batch(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        args, kwargs = _to_device(args, kwargs, self.device)
        out = self.loaded.named_outputs(self.model(*args, **kwargs))
        return {k: v.detach().float().cpu() for k, v in out.items()}

    def close(self) -> None:
        pass


class _GraphRuntime:
    """A Runner (runtime/) fed by input name; only the model's named outputs are compared."""

    def __init__(self, runner, loaded):
        self.name, self.runner, self.loaded = runner.name, runner, loaded
        self.notes: list[str] = list(getattr(runner, "notes", []))

    def run_batch(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        from quantkit.verify.reference import named_inputs

        from quantkit.io_names import to_model_outputs

        out = to_model_outputs(self.runner.run(named_inputs(self.loaded, args, kwargs)), self.loaded.input_names,
                               self.loaded.output_names)
        missing = [n for n in self.loaded.output_names if n not in out]
        if missing:
            raise QuantkitError(f"{self.name} returned no {missing} (it gave {sorted(out)})")
        return {n: out[n].float().cpu() for n in self.loaded.output_names}

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if close:
            close()


def _open_onnxruntime(run, out_dir: Path, device: torch.device) -> _GraphRuntime:
    from quantkit.runtime.tensorrt import ONNX_NAME

    path = out_dir / ONNX_NAME
    if not path.is_file():
        raise RuntimeUnavailable(f"no {ONNX_NAME} in {out_dir} (export one with `quantkit export --from {out_dir}`)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeUnavailable(f"onnxruntime is not installed ({e})") from None
    from quantkit.verify.ort_copy import UnsupportedGraph, verification_runner

    try:
        return _GraphRuntime(verification_runner(path), run.loaded)
    except UnsupportedGraph as e:  # e.g. TensorRT custom ops: not something ORT can check
        raise RuntimeUnavailable(str(e)) from None


def _open_tensorrt(run, out_dir: Path, device: torch.device) -> _GraphRuntime:
    from quantkit.runtime.tensorrt import ENGINE_NAME, METADATA_NAME, TensorRTRunner

    engine, metadata = out_dir / ENGINE_NAME, out_dir / METADATA_NAME
    if not engine.is_file():
        # Say first that TensorRT itself is missing: an engine would not run here either. find_spec
        # looks without importing (tensorrt is imported only in runtime/tensorrt/backend.py).
        if importlib.util.find_spec("tensorrt") is None:
            raise RuntimeUnavailable(f"TensorRT is not installed here, and there is no {ENGINE_NAME} in {out_dir} "
                                     f"(on a machine with TensorRT and a GPU: `quantkit build --from {out_dir}`, "
                                     "then compare there)")
        raise RuntimeUnavailable(f"no {ENGINE_NAME} in {out_dir} (build one with `quantkit build --from {out_dir}` "
                                 "where TensorRT is installed)")
    if not metadata.is_file():
        raise RuntimeUnavailable(f"{metadata} is missing, so the engine's GPU and TensorRT version are unknown "
                                 f"(rebuild with `quantkit build --from {out_dir}`)")
    try:
        runner = TensorRTRunner(engine, metadata)
    except InputError as e:  # TensorRTUnavailable (no tensorrt, no GPU) or an engine built for another GPU
        raise RuntimeUnavailable(str(e)) from None
    return _GraphRuntime(runner, run.loaded)


def _open_torch_fp8(run, out_dir: Path, device: torch.device) -> _GraphRuntime:
    """Real FP8 GEMMs in PyTorch (runtime/torch_fp8.py) on a second copy: the runner converts in place."""
    from quantkit import ptq
    from quantkit.runtime.torch_fp8 import FP8_MIN_CAPABILITY, TorchFP8Runner

    if device.type != "cuda":
        raise RuntimeUnavailable("runs FP8 GEMMs on the GPU (torch._scaled_mm): needs --device cuda and an "
                                 "SM 8.9+ GPU (Ada, Hopper, Blackwell)")
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        raise RuntimeUnavailable(f"{torch.cuda.get_device_name(device)} (SM {cap[0]}{cap[1]}) has no FP8 tensor cores "
                                 "(needs SM 8.9+: Ada, Hopper, Blackwell)")
    fresh = ptq.load_quantized(out_dir, device)
    try:
        runner = TorchFP8Runner(fresh.loaded, device=device)
    except InputError as e:  # e.g. a recipe without static per-tensor FP8 linears
        raise RuntimeUnavailable(str(e)) from None
    return _GraphRuntime(runner, run.loaded)


def _open_fp32(run, out_dir: Path, device: torch.device) -> _TorchRuntime:
    from quantkit.models import load_model

    reference = load_model(run.loaded.spec)
    reference.model.to(device=device, dtype=torch.float32).eval()
    return _TorchRuntime("fp32", reference, reference.model, device)


def _open_fake_quant(run, out_dir: Path, device: torch.device) -> _TorchRuntime:
    return _TorchRuntime("fake-quant", run.loaded, run.loaded.model, device)


_OPENERS: dict[str, Callable[[Any, Path, torch.device], Any]] = {
    "fp32": _open_fp32, "fake-quant": _open_fake_quant, "onnxruntime": _open_onnxruntime, "tensorrt": _open_tensorrt,
    "torch-fp8": _open_torch_fp8}


# ---------------------------------------------------------------------------------------------
# Comparing


def parse_runtimes(values: Sequence[str] | None) -> list[str] | None:
    """`--runtime a,b --runtime c` -> [a, b, c], checked against CANDIDATES; None when not given."""
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise InputError(f"--runtime {','.join(unknown)}: not a runtime; use {', '.join(CANDIDATES)}")
    return list(dict.fromkeys(names))


def compare(out_dir: str | Path, *, against: str = "fp32", runtimes: Sequence[str] | None = None,
            max_samples: int | None = None, batch_size: int | None = None, device: str | torch.device = "cpu",
            update_report: bool = True, model: str | None = None, trust_model_code: bool | None = None) -> Comparison:
    """Run the runtimes of OUT on its held-out samples, compare them with `against`, update OUT's reports.

    runtimes: the candidates to run (default: all of CANDIDATES, unavailable ones recorded as
    such); one named here that cannot run is an InputError, as is an `against` that cannot run.
    model / trust_model_code: see quantkit.ptq.load_quantized (run.json's code spec is not run otherwise).
    """
    from quantkit import ptq

    with ptq.model_trust(model, trust_model_code):
        return _compare(out_dir, against=against, runtimes=runtimes, max_samples=max_samples, batch_size=batch_size,
                        device=device, update_report=update_report)


def _compare(out_dir: str | Path, *, against: str, runtimes: Sequence[str] | None, max_samples: int | None,
             batch_size: int | None, device: str | torch.device, update_report: bool) -> Comparison:
    from quantkit import ptq
    from quantkit.errors import require_positive
    from quantkit.verify.reference import heldout_samples
    from quantkit.models import DTYPES

    require_positive("--max-samples", max_samples)
    require_positive("--batch-size", batch_size)
    if against not in REFERENCES:
        raise InputError(f"--against {against}: use one of {', '.join(REFERENCES)}")
    explicit = set(runtimes or ())
    wanted = list(runtimes) if runtimes else list(CANDIDATES)
    out_dir = Path(out_dir)
    report = check_run_folder(out_dir)
    device = torch.device(device)
    t_start = time.perf_counter()
    run = _load_run(out_dir, device)
    heldout = heldout_samples(run)
    if max_samples and len(heldout) > max_samples:
        heldout = heldout.subset(range(max_samples))
    batch_size = batch_size or run.recipe.calibration.batch_size
    thresholds = Thresholds.of_recipe(run.recipe)

    # fp32 always runs: the report's metrics are against it, whatever --against says.
    names = ["fp32"] + [n for n in CANDIDATES if n in wanted or n == against]
    status: dict[str, RuntimeStatus] = {}
    opened: dict[str, Any] = {}
    for name in names:
        try:
            opened[name] = _OPENERS[name](run, out_dir, device)
            status[name] = RuntimeStatus(name, True, notes=list(opened[name].notes))
        except RuntimeUnavailable as e:
            status[name] = RuntimeStatus(name, False, reason=str(e))
            if name in explicit or name == against:
                flag = "--against" if name == against else "--runtime"
                raise InputError(f"{flag} {name}: not available: {e}") from None
        except QuantkitError:
            raise
        except Exception as e:  # the artifact is there but does not load (a broken model.onnx): a failure
            if name in ("fp32", "fake-quant", against):
                raise
            status[name] = RuntimeStatus(name, True, error=f"cannot load: {type(e).__name__}: {e}")

    outputs: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in opened}
    try:
        from tqdm.auto import tqdm

        fp32_batches = heldout.batches(batch_size, device="cpu", dtype=torch.float32)
        run_batches = heldout.batches(batch_size, device="cpu", dtype=DTYPES[run.dtype])
        total = len(heldout.batch_groups(batch_size))
        for (a32, k32), (a, k) in tqdm(zip(fp32_batches, run_batches), total=total, desc="compare",
                                       disable=console.is_quiet(), leave=False):
            for name, rt in opened.items():
                if status[name].error:
                    continue
                t0 = time.perf_counter()
                try:
                    outputs[name].append(rt.run_batch(a32, k32) if name == "fp32" else rt.run_batch(a, k))
                except Exception as e:  # a runtime that breaks on a batch fails; the others go on
                    if name in ("fp32", against):
                        raise QuantkitError(f"the reference {name} failed on the held-out samples: "
                                            f"{type(e).__name__}: {e}") from None
                    status[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    outputs[name].clear()
                status[name].seconds += time.perf_counter() - t0
    finally:
        for rt in opened.values():
            rt.close()
    for name in opened:
        status[name].samples = len(heldout) if status[name].ran else 0

    ran = [n for n in CANDIDATES if n in opened and status[n].ran]
    vs_fp32 = {n: ptq.compare_runs(outputs["fp32"], outputs[n]) for n in ran}
    if against == "fp32":
        metrics = vs_fp32
    else:
        metrics = {n: ptq.compare_runs(outputs[against], outputs[n]) for n in ran if n != against}
    failed = [f"{n}: failed: {status[n].error}" for n in status if status[n].error]
    if not metrics and not failed:
        why = "; ".join(f"{n}: {s.describe()}" for n, s in status.items() if n not in ("fp32", against))
        raise InputError(f"{out_dir}: nothing to compare with {against} here ({why})")
    verdict = judge(metrics, thresholds)
    if failed:
        verdict = Verdict(False, thresholds, verdict.metrics, (*verdict.failures, *failed))

    comparison = Comparison(
        out_dir, against, thresholds, len(heldout), status, metrics, verdict, bool(report.get("passed")),
        vs_fp32=vs_fp32, histograms={n: ptq.error_histograms(outputs["fp32"], outputs[n]) for n in vs_fp32},
        ort_vs_fake_quant=(ptq.compare_runs(outputs["fake-quant"], outputs["onnxruntime"])
                           if "fake-quant" in vs_fp32 and "onnxruntime" in vs_fp32 else None),
        seconds=time.perf_counter() - t_start)
    if update_report:
        from quantkit.report.render import record

        # report.json/.md/.html refreshed: metrics vs FP32 per runtime, runtime status, the gate.
        comparison.report_passed = bool(record(out_dir, "comparison", comparison)["passed"])
    return comparison


def print_comparison(result: Comparison) -> None:
    th = result.thresholds
    gate = f"cosine >= {th.cosine_min}" + (f", SNR >= {th.snr_min_db} dB" if th.snr_min_db is not None else "")
    console.show(console.rows_table(
        f"against {result.against} on {result.samples} held-out samples ({gate}, from the recipe)",
        ("runtime", "output", "cosine", "SNR dB", "MSE", "max abs", "verdict"), result.rows()))
    verdict = "PASSED" if result else "FAILED: " + "; ".join(result.verdict.failures)
    print(f"{verdict} · report: {result.out_dir}/report.json, report.md, report.html")
