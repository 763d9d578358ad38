"""Access to the TensorRT libraries: the only module that imports `tensorrt` or `tensorrt_rtx_bindings`,
and only inside functions.

`load_backend()` picks datacenter/Jetson TensorRT where `tensorrt` imports, else TensorRT-RTX (whose
builder compiles ahead of time, without a GPU, for named compute capabilities), else raises
TensorRTUnavailable; `logger_for` gives the one logger per library; `parser_errors` turns the ONNX
parser's errors into lines naming node and op; `gpu_identity()` names the CUDA device.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

from quantkit.errors import TensorRTUnavailable

log = logging.getLogger("quantkit.runtime.tensorrt")

TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
_MODULES = {TENSORRT: "tensorrt", TENSORRT_RTX: "tensorrt_rtx_bindings"}


@dataclass(frozen=True)
class Backend:
    """One TensorRT library: its name in engine.json (`tensorrt` or `tensorrt-rtx`), module, version."""

    name: str
    module: Any
    version: str

    @property
    def ahead_of_time(self) -> bool:
        """TensorRT-RTX builds for named compute capabilities without a GPU; TensorRT builds for the GPU it runs on."""
        return self.name == TENSORRT_RTX

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.ahead_of_time else 'TensorRT'} {self.version}"


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer: OSError, stub wheels)
        raise TensorRTUnavailable(f"TensorRT is not installed here (import tensorrt: {e})") from e
    return trt


def import_tensorrt_rtx():
    try:
        import tensorrt_rtx_bindings as trt
    except Exception as e:  # ImportError, or the libs wheel missing beside the bindings (OSError)
        raise TensorRTUnavailable(f"TensorRT-RTX is not installed here (import tensorrt_rtx_bindings: {e})") from e
    return trt


def load_backend(name: str | None = None) -> Backend:
    """The named backend, or TensorRT where it imports, else TensorRT-RTX; TensorRTUnavailable naming both."""
    importers = {TENSORRT: import_tensorrt, TENSORRT_RTX: import_tensorrt_rtx}
    if name is not None and name not in importers:
        raise ValueError(f"unknown TensorRT backend {name!r}; one of {', '.join(importers)}")
    problems = []
    for candidate in [name] if name else [TENSORRT, TENSORRT_RTX]:
        try:
            module = importers[candidate]()
        except TensorRTUnavailable as e:
            problems.append(str(e))
            continue
        return Backend(candidate, module, str(module.__version__))
    raise TensorRTUnavailable("; ".join(problems))


def available_backend() -> Backend | None:
    try:
        return load_backend()
    except TensorRTUnavailable:
        return None


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and this machine has none visible to torch")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


class _Capture:
    """What one parse/build/load said: errors and warnings, in order."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []


_LOGGERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def logger_for(trt):
    """The one logger of this TensorRT library, created on first use.

    TensorRT-RTX keeps the first logger a process gives it ("The logger passed into
    createInferBuilder differs from one already registered ... the current new logger is
    ignored"), so every builder, parser and runtime gets this same object, and `capture()`
    collects what one step said. Errors and warnings also go to logging.
    """
    if trt in _LOGGERS:
        return _LOGGERS[trt]

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []  # everything since creation, for messages outside a capture
            self._captures: list[_Capture] = []

        @contextlib.contextmanager
        def capture(self) -> Iterator[_Capture]:
            cap = _Capture()
            self._captures.append(cap)
            try:
                yield cap
            finally:
                self._captures.remove(cap)

        def log(self, severity, msg) -> None:
            msg = str(msg)
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                del self.errors[:-20]
                for cap in self._captures:
                    cap.errors.append(msg)
                # A captured error is in the step's result, which names it to the user.
                log.log(logging.INFO if self._captures else logging.ERROR, "TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                for cap in self._captures:
                    cap.warnings.append(msg)
                # A captured warning is recorded in the step's result; only stray ones need a voice.
                log.log(logging.INFO if self._captures else logging.WARNING, "TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    _LOGGERS[trt] = _Logger()
    return _LOGGERS[trt]


def parser_error_ops(parser) -> list[str]:
    """The op type of each node the parser refused ('' where it named none)."""
    return [_call(parser.get_error(i), "node_operator") or "" for i in range(parser.num_errors)]


def parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = _call(err, "node_name") or (f"#{err.node()}" if _call(err, "node") not in (None, -1) else "")
        op = _call(err, "node_operator")
        where = f"node {node}" + (f" ({op})" if op else "") if node else "graph"
        out.append(f"{where}: {_call(err, 'desc') or err}")
    return out


def _call(obj, name: str):
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # an accessor missing from this TensorRT's ParserError is not worth failing over
        return None
