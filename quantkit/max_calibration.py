"""Max calibration with its statistics kept on the device: the same amax as ModelOpt's own, bit for bit.

ModelOpt's MaxCalibrator.collect runs ~7 small kernels and three NaN/Inf/sign asserts per quantizer
call, and each assert reads a tensor back to the host: a GPU waits for the host on every quantized
layer. `device_max_calibration(loop)` wraps a calibration forward loop: while it runs, each
quantizer calibrating with a plain MaxCalibrator keeps its running |x| max as one device tensor
(one reduction and one in-place maximum per call, no host sync); when the loop ends the maxima are
checked once for NaN/Inf and written into the calibrators, and ModelOpt loads them as it would its own.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from quantkit.errors import CalibrationError

# dtypes whose |x| max torch.linalg.vector_norm(ord=inf) returns exactly, in the input's dtype (what
# ModelOpt's reduce_amax returns); anything else (FP8, which ModelOpt upcasts) stays on ModelOpt's path.
_EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RunningAmax:
    """One quantizer's running max of |x| over the reduce axes of its calibrator's axis.

    Called with every tensor the quantizer sees (in place of MaxCalibrator.collect); the value
    starts from what the calibrator already holds (e.g. the weight pass before the forward loop).
    """

    def __init__(self, name: str, calibrator: Any, fallback: Callable[[Any], None]):
        from quantkit.compat.modelopt import calib_amax, calibrator_axis

        self.name, self.calibrator, self.fallback = name, calibrator, fallback
        self.axis = calibrator_axis(calibrator)
        start = calib_amax(calibrator)
        self.amax: torch.Tensor | None = None if start is None else start.detach().clone()
        self.calls = 0
        self.fallbacks = 0

    def __call__(self, x: torch.Tensor) -> None:
        from quantkit.compat.modelopt import calib_amax, reduce_axis_of

        if x.device.type == "meta" or x.dtype not in _EXACT_DTYPES:
            # ModelOpt's own collect on the value so far, and continue from its result.
            self._sync_into_calibrator()
            self.fallback(x)
            value = calib_amax(self.calibrator)
            self.amax = None if value is None else value.detach().clone()
            self.fallbacks += 1
            return
        dims = reduce_axis_of(x, self.axis)
        # max |x| in one pass: abs and max are exact, so this is maximum(|amax|, |amin|) to the bit,
        # and vector_norm propagates NaN as amax does (checked once, after the loop: _check_finite).
        if dims is None:
            local = torch.linalg.vector_norm(x.detach(), ord=math.inf)
        else:
            local = torch.linalg.vector_norm(x.detach(), ord=math.inf, dim=dims, keepdim=True)
            if local.numel() == 1:
                local = local.squeeze()
        self.calls += 1
        if self.amax is None:
            self.amax = local
        elif local.shape != self.amax.shape:
            raise RuntimeError(f"{self.name}: amax shape changed! ({tuple(self.amax.shape)} -> {tuple(local.shape)})")
        elif local.dtype != self.amax.dtype or local.device != self.amax.device:
            self.amax = torch.maximum(self.amax, local)  # promoted as ModelOpt's torch.max promotes
        else:
            torch.maximum(self.amax, local, out=self.amax)

    def _sync_into_calibrator(self) -> None:
        from quantkit.compat.modelopt import set_calib_amax

        set_calib_amax(self.calibrator, self.amax)

    def finish(self) -> None:
        """Write the running max into the calibrator (None stays None: the quantizer saw nothing)."""
        self._sync_into_calibrator()


def calibrating_max_quantizers(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, calibrator) of every quantizer of `model` collecting statistics now with a plain
    MaxCalibrator (histogram calibrators and tracking ones keep ModelOpt's own collect)."""
    from quantkit.compat.modelopt import calibrator, is_calibrating, is_dynamic, is_plain_max_calibrator

    out = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        cal = calibrator(m)
        if cal is None or id(cal) in seen or not is_calibrating(m) or not is_plain_max_calibrator(cal):
            continue
        if is_dynamic(m):  # dynamic quantizers never collect
            continue
        seen.add(id(cal))
        out.append((name, cal))
    return out


def _check_finite(collectors: list[RunningAmax]) -> None:
    """ModelOpt asserts per call that no amax is NaN or Inf; NaN and Inf survive a running maximum,
    so one check at the end finds the same inputs (one host read per device, for all quantizers)."""
    live = [c for c in collectors if c.amax is not None and c.amax.device.type != "meta"]
    by_device: dict[torch.device, list[RunningAmax]] = {}
    for c in live:
        by_device.setdefault(c.amax.device, []).append(c)
    bad: list[str] = []
    for group in by_device.values():
        flags = torch.stack([~torch.isfinite(c.amax).all() for c in group]).cpu().tolist()
        bad += [c.name for c, flag in zip(group, flags) if flag]
    if bad:
        raise CalibrationError(f"calibration saw NaN or Inf values at {', '.join(bad[:3])}"
                               f"{f' and {len(bad) - 3} more quantizers' if len(bad) > 3 else ''}: the model "
                               "produces non-finite values on these calibration samples (check the inputs and the dtype)")


def device_max_calibration(loop: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """`loop` (a forward_loop for mtq.quantize / mtq.calibrate with algorithm max), with the statistics
    of its plain-max quantizers collected on the device and written into ModelOpt's calibrators at
    its end. Quantizers with other calibrators keep ModelOpt's own collect."""
    from quantkit.compat.modelopt import collect_replaced

    def calibrate(model: nn.Module) -> Any:
        found = calibrating_max_quantizers(model)
        collectors = [RunningAmax(name, cal, cal.collect) for name, cal in found]
        with collect_replaced([cal for _, cal in found], collectors):
            result = loop(model)
        _check_finite(collectors)
        for c in collectors:
            c.finish()
        return result

    calibrate.__qualname__ = f"device_max_calibration({getattr(loop, '__qualname__', type(loop).__name__)})"
    return calibrate
