"""A whole forward recorded as one CUDA graph per input signature, and replayed.

`torch.compile(mode="reduce-overhead")` records one graph per compiled region; between the regions (a
decoder's layers, its embedding, mask and head) the host runs Python and launches kernels, and at
small batches the GPU waits on it: an 8-10 ms FP8 decoder forward had 1.4 ms of idle GPU inside it
(BENCHMARKS.md). `CUDAGraphForward` records everything one call launches - compiled regions (compiled
without CUDA graphs of their own) and eager code alike - and replays it: one launch per forward.

A graph replays the same kernels on the same addresses. So each input tensor is copied into a static
buffer, the outputs are the graph's own tensors (overwritten by the next replay of the same signature:
copy what must outlive it; each signature has its own memory, so replaying one leaves another's
outputs alone), and a signature - every tensor input's shape, dtype and device, every other input's
type and value (None, bool, int, float, str, dtype, device, or tuples of these: an object such as a KV
cache would be mutated by the warm-up and read by reference, not replayed) - is recorded once, on its
first call. Recording runs one at a time in a process (it swaps transformers' mask globals). The
forward must not read the device from the host (`.item()`, a branch on a value); capture refuses such
code and CaptureError names the signature. Weights
changed after a signature was recorded are seen by its replays only if changed in place.
transformers' mask code decides from values whether to build a mask; see
quantkit.compat.transformers.masks_for_capture for how its capture is kept exact.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Hashable

import torch

from quantkit.errors import QuantkitError

WARMUP_CALLS = 2  # before capture, on a side stream: lazy initialization and compilation happen there
# Each recorded signature keeps its graph and its activations' memory. Inputs whose shapes keep changing
# (text of every length) would record without end: past this many, new signatures run unrecorded.
MAX_GRAPHS = 16
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)
_RECORDING = threading.Lock()  # masks_for_capture swaps module globals: one recording at a time


class CaptureError(QuantkitError):
    """A forward could not be recorded as one CUDA graph."""

    exit_code = 2


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(_plain(v) for v in value))


def _value_key(name: str, value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return (name, "tensor", tuple(value.shape), value.dtype, str(value.device))
    if not _plain(value):
        raise CaptureError(f"CUDAGraphForward: input {name!r} is a {type(value).__name__}, which a recorded graph "
                           "cannot replay (its state would be read by reference and changed by the warm-up); pass "
                           "tensors and plain values (None, bool, int, float, str, dtype, device, tuples of these)")
    return (name, "value", repr(value))  # repr: 1, True and 1.0 differ, and a NaN matches itself


class _Recorded:
    def __init__(self, graph: torch.cuda.CUDAGraph, static: dict[str, Any], output: Any):
        self.graph, self.static, self.output = graph, static, output


class CUDAGraphForward:
    """`fn(**inputs)` as one CUDA graph per input signature: the first call of a signature warms up and
    records it, every call replays it (outputs: the graph's own tensors, under inference mode). Replays
    run on the caller's current stream, one at a time. Past `max_graphs` signatures, new ones run as
    plain calls (warned once): pad inputs to a few fixed shapes instead."""

    def __init__(self, fn: Callable[..., Any], warmup: int = WARMUP_CALLS, max_graphs: int = MAX_GRAPHS):
        if not torch.cuda.is_available():
            raise CaptureError("CUDAGraphForward: CUDA graphs need a CUDA device; none is available")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Recorded] = {}
        self.unrecorded_calls = 0

    @torch.inference_mode()  # the static buffers are inference tensors, whatever the caller's mode
    def __call__(self, **inputs: Any) -> Any:
        key = tuple(_value_key(name, inputs[name]) for name in sorted(inputs))
        recorded = self.graphs.get(key)
        if recorded is None and len(self.graphs) >= self.max_graphs:
            if not self.unrecorded_calls:
                warnings.warn(f"CUDAGraphForward: {len(self.graphs)} input signatures recorded (max_graphs); "
                              "calls of new ones run without a graph. Pad inputs to a few fixed shapes, or raise "
                              "max_graphs if the GPU memory allows", stacklevel=2)
            self.unrecorded_calls += 1
            return self.fn(**inputs)
        if recorded is None:
            with _RECORDING:
                recorded = self.graphs[key] = self._record(inputs, key)
        else:
            for name, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    recorded.static[name].copy_(value)
        recorded.graph.replay()
        return recorded.output

    def _record(self, inputs: dict[str, Any], key: tuple) -> _Recorded:
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor) and not value.is_cuda:
                raise CaptureError(f"CUDAGraphForward: input {name!r} is on {value.device}; a CUDA graph reads "
                                   "its inputs from the GPU: move them there first")
        static = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        masks = _mask_context(static)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with masks:
                with torch.cuda.stream(stream):
                    for _ in range(self.warmup):
                        self.fn(**static)
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph):  # its own memory pool: no other graph's replay writes there
                    output = self.fn(**static)
        except QuantkitError:
            raise
        except Exception as e:  # torch reports capture failures as RuntimeError / AcceleratorError
            shapes = ", ".join(f"{k[0]} {list(k[2])}" if k[1] == "tensor" else f"{k[0]}={k[2]!r}" for k in key)
            raise CaptureError(f"CUDAGraphForward: the forward for ({shapes}) could not be recorded as one CUDA "
                               f"graph: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. A captured "
                               "forward must not read GPU values on the host (.item(), branches on values) nor "
                               "contain regions compiled with CUDA graphs of their own (mode='reduce-overhead'); "
                               "per-layer graphs (torch.compile(mode='reduce-overhead')) are the fallback") from e
        return _Recorded(graph, static, output)


def _mask_context(inputs: dict[str, Any]) -> contextlib.AbstractContextManager:
    """transformers' masks taken one way in warm-up and capture: built on the device when a mask or
    positions come in (their values may change between replays), else left out as eager leaves them."""
    from quantkit.compat.transformers import MASK_DECIDING_INPUTS, masks_for_capture

    return masks_for_capture(materialize=any(isinstance(inputs.get(name), torch.Tensor)
                                             for name in MASK_DECIDING_INPUTS))
