"""ONNX Runtime: runs an exported graph on the CPU provider, as written.

Sessions run with graph optimizations off: ONNX Runtime 1.32's optimizer gave wrong results on FP8
Q/DQ graphs already at level BASIC. The copy of a graph with TensorRT custom ops rewritten for ONNX
Runtime is made in `quantkit.verify.ort_copy`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto

_NUMPY_INPUT = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
                TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.INT8: np.int8,
                TensorProto.UINT8: np.uint8, TensorProto.BOOL: np.bool_}


class OnnxRuntimeRunner:
    """Runs an ONNX graph (by path, so external data is found) on ONNX Runtime's CPU provider, as
    written. `quantkit.verify.ort_copy.verification_runner` opens one over the graph's verification
    copy (TensorRT custom ops rewritten); `notes` then says what the copy changed."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, optimization: str = "disable", threads: int | None = None,
                 label: str | os.PathLike | None = None, notes: list[str] | None = None, keep=None):
        import onnxruntime as ort

        self.path = Path(label if label is not None else path)  # what messages name: the graph the user has
        self.notes: list[str] = list(notes or [])
        self._tmp = keep  # a temporary folder holding `path`, removed with the runner
        model_path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # unused-initializer notices are expected in a verification copy
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        }[optimization]
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        graph = onnx.load(str(model_path), load_external_data=False).graph
        self._input_types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.input}

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name}: inputs {missing} not given (the graph takes {self.input_names})")
        feeds = {}
        for name in self.input_names:
            value = inputs[name]
            array = value.detach().cpu()
            if array.dtype == torch.bfloat16:
                array = array.float()
            array = array.numpy()
            want = _NUMPY_INPUT.get(self._input_types.get(name))
            if want is not None and array.dtype != want:
                array = array.astype(want)
            feeds[name] = array
        results = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(np.ascontiguousarray(r)) for name, r in zip(self.output_names, results)}

    def close(self) -> None:
        self.session = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
