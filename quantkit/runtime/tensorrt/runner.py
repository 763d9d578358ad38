"""TensorRTRunner: runs a TensorRT or TensorRT-RTX engine with the Runner interface, after the
engine.json guard, choosing the optimization profile that fits each input; `load_runner_or_fallback`
gives another runner, with a visible warning, where the engine cannot run.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from quantkit.errors import InputError, QuantkitError
from quantkit.runtime.tensorrt import backend
from quantkit.runtime.tensorrt.engine_json import EngineMetadata, check_engine_compatible
from quantkit.runtime.tensorrt.files import METADATA_NAME

if TYPE_CHECKING:
    import torch

log = logging.getLogger("quantkit.runtime.tensorrt")


def _torch_dtype(trt, trt_dtype):
    import torch

    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
        "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
        "FP8": torch.float8_e4m3fn,
    }
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise InputError(f"engine tensor type {trt_dtype} has no torch equivalent this runner can feed")


def _recorded_backend(metadata_path: Path) -> str | None:
    """engine.json's backend (TensorRT when it names none); None without a readable engine.json."""
    try:
        data = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = data.get("backend", backend.TENSORRT) if isinstance(data, dict) else None
    return name if name in (backend.TENSORRT, backend.TENSORRT_RTX) else None


class TensorRTRunner:
    """Runs a TensorRT engine with the Runner interface: named CPU/GPU tensors in, CPU tensors out.

    Uses the TensorRT 10 tensor API (set_input_shape, set_tensor_address, execute_async_v3), which
    TensorRT-RTX shares, on a torch CUDA stream; engine.json's `backend` says which library loads
    the engine. Each batch runs in the first optimization profile its input shapes fit. Device buffers are kept between calls and only grow. With use_cuda_graph,
    the enqueue is captured once per input-shape set and replayed; a capture TensorRT cannot do
    falls back to plain enqueues with a warning.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, metadata_path: str | os.PathLike | None = None,
                 use_cuda_graph: bool = False) -> None:
        import torch

        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise InputError(f"{self.engine_path}: engine not found; build it with `quantkit build --from DIR`")
        metadata_path = Path(metadata_path) if metadata_path else self.engine_path.parent / METADATA_NAME
        # The library first (engine.json names it; one written before TensorRT-RTX was datacenter
        # TensorRT's), so that a machine without it says so before anything else.
        be = backend.load_backend(_recorded_backend(metadata_path))
        trt = be.module
        gpu_name, capability = backend.gpu_identity()
        data = self.engine_path.read_bytes()
        self.metadata: EngineMetadata | None = None
        if metadata_path.is_file():
            self.metadata = EngineMetadata.load(metadata_path)
            if self.metadata.engine_bytes != len(data):
                raise InputError(
                    f"{metadata_path} describes a {self.metadata.engine_bytes}-byte engine but "
                    f"{self.engine_path} has {len(data)} bytes; rebuild with `quantkit build --from DIR`"
                )
            check_engine_compatible(self.metadata, gpu_name, capability, be.version)
        else:
            msg = (f"{self.engine_path}: no {METADATA_NAME} beside it, so only TensorRT's own checks stand "
                   f"between this engine and a GPU it was not built for")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)

        self._trt = trt
        self._logger = backend.logger_for(trt)
        with self._logger.capture() as said:
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            detail = " | ".join(said.errors[-3:]) or "no detail given"
            raise InputError(f"{self.engine_path}: {be.label} could not load this engine ({detail})")
        self._context = self._engine.create_execution_context()
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[str, torch.Tensor] = {}
        self._use_cuda_graph = use_cuda_graph
        self._graph = None
        self._graph_key: tuple | None = None
        self._profiles = int(getattr(self._engine, "num_optimization_profiles", 1) or 1)
        self._profile = 0

    def _buffer(self, name: str, numel: int):
        import torch

        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=self._dtypes[name], device=self._device)
            self._buffers[name] = buf
            self._graph = None  # addresses changed: a captured graph points at the old buffers
        return buf

    def _profile_text(self, name: str, index: int = 0) -> str:
        try:
            lo, mid, hi = self._engine.get_tensor_profile_shape(name, index)
            return f"min {tuple(lo)}, opt {tuple(mid)}, max {tuple(hi)}"
        except Exception:  # only used to enrich an error message
            return "see engine.json"

    def _fits(self, index: int, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        for name, shape in shapes.items():
            lo, _, hi = (tuple(d) for d in self._engine.get_tensor_profile_shape(name, index))
            if len(lo) != len(shape) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
        return True

    def _select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Switch to the first optimization profile these input shapes fit; say so when none does."""
        if self._profiles <= 1 or self._fits(self._profile, shapes):
            return
        for index in range(self._profiles):
            if self._fits(index, shapes):
                if not self._context.set_optimization_profile_async(index, self._stream.cuda_stream):
                    raise QuantkitError(f"{self.engine_path.name}: TensorRT could not switch to profile {index}")
                log.info("%s: input shapes %s run in optimization profile %d", self.engine_path.name, dict(shapes), index)
                self._profile = index
                self._graph = None  # a captured graph belongs to the old profile
                return
        ranges = "; ".join(
            f"profile {i}: " + ", ".join(f"{n} {self._profile_text(n, i)}" for n in shapes) for i in range(self._profiles)
        )
        raise InputError(f"{self.engine_path.name}: input shapes {dict(shapes)} fit none of the engine's "
                         f"{self._profiles} optimization profiles ({ranges}); rebuild with a profile that covers them")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        given, wanted = set(inputs), set(self.input_names)
        if given != wanted:
            raise InputError(
                f"{self.engine_path.name}: inputs {sorted(given)} do not match the engine's {sorted(wanted)}"
            )
        ctx = self._context
        views: dict[str, torch.Tensor] = {}
        # Inputs already on the GPU may still be being written on the caller's stream.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._select_profile({n: tuple(inputs[n].shape) for n in self.input_names})
            for name in self.input_names:
                t = inputs[name]
                want = self._dtypes[name]
                if t.dtype != want and (t.dtype.is_floating_point != want.is_floating_point or want == torch.bool):
                    raise InputError(f"input {name}: got {t.dtype}, the engine takes {want}")
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise InputError(
                        f"input {name}: shape {tuple(t.shape)} is outside the engine's profile "
                        f"({self._profile_text(name, self._profile)})"
                    )
                view = self._buffer(name, t.numel())[: t.numel()].view(t.shape)
                view.copy_(t.to(want), non_blocking=False)
                views[name] = view
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise InputError(f"output {name} has a data-dependent shape {shape}; this runner cannot size it")
                numel = 1
                for d in shape:
                    numel *= d
                views[name] = self._buffer(name, numel)[:numel].view(shape)
            for name, view in views.items():
                ctx.set_tensor_address(name, view.data_ptr())
            self._enqueue(tuple((n, tuple(views[n].shape)) for n in self.input_names))
            outputs = {name: views[name].to("cpu") for name in self.output_names}
        self._stream.synchronize()
        return outputs

    def _enqueue(self, key: tuple) -> None:
        import torch

        handle = self._stream.cuda_stream
        if self._use_cuda_graph and self._graph is not None and key == self._graph_key:
            self._graph.replay()
            return
        if not self._context.execute_async_v3(handle):
            raise QuantkitError(f"{self.engine_path.name}: TensorRT execution failed: "
                                + (" | ".join(self._logger.errors[-3:]) or "no detail given"))
        if not self._use_cuda_graph:
            return
        # The enqueue above, after the shape change, flushed TensorRT's deferred setup, which a
        # capture must not contain; this one only records.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                ok = self._context.execute_async_v3(handle)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
        except Exception as e:  # capture is an optimization; the result above is already correct
            self._use_cuda_graph = False
            msg = f"{self.engine_path.name}: CUDA graph capture failed ({e}); running without one"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
            return
        self._graph, self._graph_key = graph, key


def load_runner_or_fallback(engine_path: str | os.PathLike, fallback_runner, **runner_kwargs):
    """The TensorRT runner for engine_path, or fallback_runner with a visible warning when
    TensorRT is missing or the engine cannot be used here."""
    try:
        return TensorRTRunner(engine_path, **runner_kwargs)
    except InputError as e:  # TensorRTUnavailable is one
        msg = f"TensorRT engine {engine_path} not used ({type(e).__name__}: {e}); running {fallback_runner.name} instead"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return fallback_runner
