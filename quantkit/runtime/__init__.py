"""Runners with one interface: named input tensors in, named output tensors out.

Each backend lives in its own module and imports its library lazily: `torch_runner` (PyTorch,
FP32 reference or fake-quant), `onnxruntime` (the reference runtime for exported graphs),
`tensorrt` (engine build and run). A runner is anything with `name` and `run(inputs) -> outputs`.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    name: str

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one batch: inputs by name -> outputs by name (torch tensors, on the CPU)."""
        ...
