"""Which samples share a batch, and how they are joined into one (concatenated, padded fields padded).

`batching_for` decides a set's mode from its fields (`examples`: one example per sample, batched
`batch_size` at a time; `calls`: one captured call per batch); `collate` joins examples.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch

from quantkit.calib.codec import Sample, _dtype_name, decode_sample, encode_sample

BATCHING_EXAMPLES = "examples"  # one example per sample: concatenate (and pad) into batches
BATCHING_CALLS = "calls"  # one captured call per sample: replay each alone


def batching_for(fields: Mapping[str, Mapping[str, Any]], declared: str | None = BATCHING_EXAMPLES) -> str:
    """`examples` when so declared and every tensor has a leading dimension of exactly 1, else `calls`."""
    if declared != BATCHING_EXAMPLES:
        return BATCHING_CALLS
    tensors = [f for f in fields.values() if f.get("kind") == "tensor"]
    if not tensors:
        return BATCHING_CALLS
    for f in tensors:
        lo, hi = f.get("shape_min"), f.get("shape_max")
        if not lo or not hi or lo[0] != 1 or hi[0] != 1:
            return BATCHING_CALLS
    return BATCHING_EXAMPLES



def _leaf_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _signature(sample: Sample, pad_values: Mapping[str, Any]) -> str:
    """Samples with equal signatures can be concatenated: same tree, plain values, dtypes and
    shapes, except the non-batch dims of padded fields."""
    tree, tensors = encode_sample(sample)
    shapes = {p: (_dtype_name(t.dtype), t.dim() if _leaf_name(p) in pad_values else list(t.shape[1:]))
              for p, t in tensors.items()}
    return json.dumps([tree, shapes], sort_keys=False, default=str)


def collate(samples: Sequence[Sample], pad_values: Mapping[str, Any] | None = None) -> Sample:
    """One batch from examples: tensors concatenated on dim 0, padded fields right-padded.

    Raises ValueError when the samples cannot share a batch (different trees, plain values or
    shapes outside the padded fields).
    """
    pad_values = pad_values or {}
    if len(samples) == 1:
        return samples[0]
    sig = _signature(samples[0], pad_values)
    for s in samples[1:]:
        if _signature(s, pad_values) != sig:
            raise ValueError("samples differ in structure, plain values or shapes")
    trees_tensors = [encode_sample(s) for s in samples]
    tree = trees_tensors[0][0]
    merged: dict[str, torch.Tensor] = {}
    for path, first in trees_tensors[0][1].items():
        parts = [tt[1][path] for tt in trees_tensors]
        if first.dim() == 0:
            raise ValueError(f"{path}: a 0-dim tensor has no batch dimension")
        pad = pad_values.get(_leaf_name(path))
        if pad is not None:
            target = [max(p.shape[d] for p in parts) for d in range(1, first.dim())]
            padded = []
            for p in parts:
                if list(p.shape[1:]) != target:
                    full = p.new_full((p.shape[0], *target), pad)
                    full[tuple(slice(0, n) for n in p.shape)] = p
                    p = full
                padded.append(p)
            parts = padded
        merged[path] = torch.cat(parts, dim=0)
    return decode_sample(tree, merged.__getitem__)
