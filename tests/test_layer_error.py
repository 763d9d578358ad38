"""Per-layer error: forward hooks compare each planned layer's output with the reference's at the same point.

A copy of the tiny model with one layer's weight perturbed stands in for the quantized model, so the
expected figures can be computed directly: layers before the perturbed one agree exactly, the
perturbed layer's error is what `metrics.compare` gives on its outputs, and later layers inherit it.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from tests.test_export import tiny_model

from quantkit import calib
from quantkit.layer_error import per_layer_error
from quantkit.metrics import compare


def _rows(*names: str, precision: str = "fp8"):
    return [SimpleNamespace(name=n, precision=precision) for n in names]


def test_error_enters_at_the_perturbed_layer_and_flows_downstream():
    loaded = tiny_model()
    reference = loaded.model
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.blocks[1].up.weight.add_(0.01 * torch.randn(candidate.blocks[1].up.weight.shape,
                                                              generator=torch.Generator().manual_seed(1)))
    data = calib.synthetic_set(loaded, n=6, seed=0)
    names = ("blocks.0.q_proj", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head", "not.a.module")
    rows = per_layer_error(reference, candidate, data, _rows(*names), batch_size=4, device="cpu",
                           ref_dtype=torch.float32, q_dtype=torch.float32)

    # A name the model does not have is left out; the others keep their plan index, in order.
    assert [r["name"] for r in rows] == list(names[:5])
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    by = {r["name"]: r for r in rows}
    for name in ("blocks.0.q_proj", "blocks.0.down"):  # upstream of the change: identical outputs
        assert by[name]["cosine"] == pytest.approx(1.0, abs=1e-12) and by[name]["snr_db"] == "inf", by[name]
        assert by[name]["rel_l2"] == 0.0

    # The perturbed layer: exactly metrics.compare on its outputs over all 6 samples (two batches).
    outs = {"ref": [], "cand": []}
    hooks = [reference.blocks[1].up.register_forward_hook(lambda m, a, o: outs["ref"].append(o)),
             candidate.blocks[1].up.register_forward_hook(lambda m, a, o: outs["cand"].append(o))]
    with torch.no_grad():
        for args, kwargs in data.batches(4):
            reference(*args, **kwargs)
            candidate(*args, **kwargs)
    for h in hooks:
        h.remove()
    want = compare(torch.cat(outs["ref"]), torch.cat(outs["cand"]))
    got = by["blocks.1.up"]
    assert got["cosine"] == pytest.approx(want.cosine, rel=1e-12)
    assert got["snr_db"] == pytest.approx(want.snr_db, rel=1e-12)
    assert got["rel_l2"] == pytest.approx(want.rel_l2, rel=1e-12)
    assert 0.99 < got["cosine"] < 1.0 and math.isfinite(got["snr_db"]) and got["finite"] is True

    # Downstream layers see the error (their own weights are untouched).
    for name in ("blocks.1.down", "head"):
        assert by[name]["cosine"] < 1.0 and math.isfinite(by[name]["snr_db"]), by[name]
    assert {r["precision"] for r in rows} == {"fp8"}


def test_hooks_are_removed_and_nonfinite_is_reported():
    loaded = tiny_model()
    reference = loaded.model
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.head.bias[0] = float("nan")
    data = calib.synthetic_set(loaded, n=2, seed=0)
    rows = per_layer_error(reference, candidate, data, _rows("blocks.1.down", "head"), batch_size=2, device="cpu",
                           ref_dtype=torch.float32, q_dtype=torch.float32)
    assert rows[0]["finite"] is True and rows[0]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["finite"] is False and rows[1]["cosine"] is None and rows[1]["snr_db"] is None
    for model in (reference, candidate):
        assert all(not m._forward_hooks for m in model.modules()), "every hook is removed afterwards"
