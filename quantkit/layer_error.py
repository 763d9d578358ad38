"""Per-layer error: where quantization error enters a model and where it grows.

Forward hooks record the output of every planned layer in the FP32 reference and in the quantized
model on the same batch; the two are compared with `metrics.MetricsAccumulator`, batch by batch,
so only one batch of activations is held at a time.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from quantkit.metrics import MetricsAccumulator


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


class _Recorder:
    def __init__(self, model: nn.Module, names: Iterable[str]):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            if name in modules:
                self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            t = _first_tensor(output)
            if t is not None:
                self.outputs[name] = t.detach().float().cpu()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def per_layer_error(reference: nn.Module, quantized: nn.Module, dataset, layer_rows,
                    batch_size: int, device, ref_dtype: torch.dtype, q_dtype: torch.dtype) -> list[dict[str, Any]]:
    """Cosine/SNR of each planned layer's output, quantized vs reference, in model order."""
    names = [row.name for row in layer_rows]
    accs = {n: MetricsAccumulator(reservoir_size=1) for n in names}  # no percentiles needed
    ref_rec, q_rec = _Recorder(reference, names), _Recorder(quantized, names)
    try:
        ref_batches = dataset.batches(batch_size, device=device, dtype=ref_dtype)
        q_batches = dataset.batches(batch_size, device=device, dtype=q_dtype)
        for (ra, rk), (qa, qk) in zip(ref_batches, q_batches):
            ref_rec.outputs.clear()
            q_rec.outputs.clear()
            reference(*ra, **rk)
            quantized(*qa, **qk)
            for n in names:
                if n in ref_rec.outputs and n in q_rec.outputs and ref_rec.outputs[n].shape == q_rec.outputs[n].shape:
                    accs[n].update(ref_rec.outputs[n], q_rec.outputs[n])
    finally:
        ref_rec.close()
        q_rec.close()
    rows = []
    for index, row in enumerate(layer_rows):
        acc = accs[row.name]
        if acc.numel == 0:
            continue
        m = acc.result().to_dict()
        rows.append({"index": index, "name": row.name, "precision": str(row.precision),
                     "cosine": m["cosine"], "snr_db": m["snr_db"], "rel_l2": m["rel_l2"], "finite": m["finite"]})
    return rows
