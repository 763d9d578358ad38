"""Access to the TensorRT library: the only module that imports `tensorrt`, and only inside functions.

`import_tensorrt()` returns the module or raises TensorRTUnavailable; `gpu_identity()` names the
CUDA device; `make_logger` keeps TensorRT's errors for our messages; `parser_errors` turns the ONNX
parser's errors into lines naming node and op.
"""

from __future__ import annotations

import logging

from quantkit.errors import TensorRTUnavailable

log = logging.getLogger("quantkit.runtime.tensorrt")


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer: OSError, stub wheels)
        raise TensorRTUnavailable(f"TensorRT is not installed here (import tensorrt: {e})") from e
    return trt


def gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and this machine has none visible to torch")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def make_logger(trt):
    """A TensorRT logger that keeps errors for our messages and forwards the rest to logging."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


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
