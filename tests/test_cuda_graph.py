"""A whole forward as one CUDA graph (quantkit/runtime/cuda_graph.py): what runs without a GPU - the
signature keys, the refusals, and transformers' mask code under a (simulated) stream capture, kept to
one path by quantkit.compat.transformers.masks_for_capture. The recording itself: tests/gpu/test_cuda_graph.py."""

from __future__ import annotations

import sys

import pytest
import torch

import transformers.masking_utils as masking
from quantkit.compat.transformers import masks_for_capture
from quantkit.models import load_model
from quantkit.runtime import cuda_graph
from quantkit.runtime.cuda_graph import CaptureError, CUDAGraphForward


@pytest.fixture(scope="module")
def llama():
    return load_model("llama-tiny").model.eval()


def _masks(sdpa_masks) -> list:
    """The masks transformers' sdpa mask function returned (None: left out); see tests/conftest.py."""
    return [mask for _, mask in sdpa_masks]


def _capturing(monkeypatch):
    """transformers asks torch whether the current stream is capturing: answer yes, as during a capture."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _logits(model, **inputs):
    with torch.inference_mode():  # no KV cache, as the runtime runs single forwards (compile_model)
        return model(**inputs, use_cache=False).logits


IDS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


# transformers 5 counts a stream capture as tracing (a module-level is_tracing); 4.x never did.
V5 = hasattr(masking, "is_tracing")


def _patched_names():
    return tuple(getattr(masking, name, None) for name in ("is_tracing", "find_packed_sequence_indices",
                                                           "_ignore_causal_mask_sdpa"))


@pytest.mark.skipif(not V5, reason="transformers 4.x does not count a capture as tracing: nothing to show")
def test_a_capture_without_the_context_takes_another_mask_path(llama, sdpa_masks, monkeypatch):
    """The problem the context solves: eager leaves the causal mask out, a capture materializes it."""
    _logits(llama, input_ids=IDS)
    _capturing(monkeypatch)
    _logits(llama, input_ids=IDS)
    eager, captured = _masks(sdpa_masks)
    assert eager is None
    assert isinstance(captured, torch.Tensor) and captured.dtype == torch.bool and captured.dim() == 4


def test_left_out_under_capture_as_in_eager_when_no_mask_comes_in(llama, sdpa_masks, monkeypatch):
    eager = _logits(llama, input_ids=IDS)
    before = _patched_names()
    _capturing(monkeypatch)
    with masks_for_capture(materialize=False):
        captured = _logits(llama, input_ids=IDS)
    eager_mask, captured_mask = _masks(sdpa_masks)
    assert (eager_mask is None) == (captured_mask is None)  # the eager path, whatever it is
    assert eager_mask is None or not V5  # 5.x (and 4.57, measured) eager: no mask without padding
    assert torch.equal(captured, eager)  # the same path, the same kernels
    assert _patched_names() == before


def test_materialized_from_the_inputs_when_a_mask_comes_in(llama, sdpa_masks):
    """With a mask among the inputs the graph must honour any padding later replays bring: the mask
    is built in the warm-up (not capturing) as in the capture, from the mask tensor's values."""
    padded = torch.ones_like(IDS)
    padded[0, :5] = 0
    full = torch.ones_like(IDS)
    want_padded, want_full = _logits(llama, input_ids=IDS, attention_mask=padded), _logits(llama, input_ids=IDS,
                                                                                           attention_mask=full)
    assert isinstance(_masks(sdpa_masks)[0], torch.Tensor)
    assert _masks(sdpa_masks)[1] is None or not V5  # 5.x eager: built for padding only
    before = _patched_names()
    with masks_for_capture(materialize=True):
        got_padded = _logits(llama, input_ids=IDS, attention_mask=padded)
        got_full = _logits(llama, input_ids=IDS, attention_mask=full)
    assert all(isinstance(m, torch.Tensor) and m.dim() == 4 for m in _masks(sdpa_masks)[2:]) and len(sdpa_masks) == 4
    assert torch.equal(_masks(sdpa_masks)[2], _masks(sdpa_masks)[0])
    assert torch.equal(got_padded, want_padded) and _patched_names() == before
    # a causal mask with nothing padded is the causal attention eager ran without one
    torch.testing.assert_close(got_full, want_full, rtol=1e-5, atol=1e-5)


def test_without_transformers_mask_code_nothing_is_touched(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers.masking_utils")
    before = _patched_names()
    with masks_for_capture(materialize=True):
        assert _patched_names() == before


def test_the_mask_policy_follows_the_inputs(monkeypatch):
    chosen = []
    monkeypatch.setattr("quantkit.compat.transformers.masks_for_capture", lambda materialize: chosen.append(materialize))
    for inputs in ({"input_ids": IDS}, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)},
                   {"input_ids": IDS, "position_ids": torch.arange(24)[None]}, {"input_ids": IDS, "attention_mask": None}):
        cuda_graph._mask_context(inputs)
    assert chosen == [False, True, True, False]


def test_signatures_key_on_shape_dtype_device_and_plain_values():
    key = cuda_graph._value_key
    assert key("x", torch.zeros(2, 3)) == key("x", torch.ones(2, 3))
    assert key("x", torch.zeros(2, 3)) != key("x", torch.zeros(3, 2))
    assert key("x", torch.zeros(2, 3)) != key("x", torch.zeros(2, 3, dtype=torch.bfloat16))
    assert key("n", 1) != key("n", 2) and key("n", None) == ("n", "value", "None")
    assert len({key("n", 1), key("n", True), key("n", 1.0)}) == 3  # equal in Python, not the same input
    assert key("f", float("nan")) == key("f", float("nan"))  # a NaN value finds its recording again
    assert key("t", (1, "a", torch.float16)) == key("t", (1, "a", torch.float16))
    with pytest.raises(CaptureError, match="'cache' is a list"):
        key("cache", [1, 2])
    from transformers import DynamicCache

    with pytest.raises(CaptureError, match="'past_key_values' is a DynamicCache, which a recorded graph cannot replay"):
        key("past_key_values", DynamicCache())
    with pytest.raises(CaptureError, match="is a tuple"):
        key("pair", (torch.zeros(1), 1))  # a tensor inside would be read by reference, not copied


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refused_without_cuda():
    with pytest.raises(CaptureError, match="need a CUDA device") as e:
        CUDAGraphForward(lambda **kw: None)
    assert e.value.exit_code == 2


def test_the_runner_leaves_out_an_all_ones_cpu_mask_of_a_transformers_model(llama):
    """What TorchFP8Runner replays: an all-ones mask read on the CPU is dropped (transformers' sdpa path
    drops it too), a padded one, one already on a device, or a model without a transformers config keep it."""
    from types import SimpleNamespace

    from quantkit.runtime.torch_fp8 import TorchFP8Runner

    drop = TorchFP8Runner._without_full_mask
    runner = SimpleNamespace(model=llama)
    ones, padded = torch.ones_like(IDS), torch.ones_like(IDS)
    padded[0, 0] = 0
    assert set(drop(runner, {"input_ids": IDS, "attention_mask": ones})) == {"input_ids"}
    assert drop(runner, {"input_ids": IDS, "attention_mask": padded})["attention_mask"] is padded
    assert set(drop(runner, {"input_ids": IDS})) == {"input_ids"}
    plain = SimpleNamespace(model=torch.nn.Linear(2, 2))
    assert drop(plain, {"x": IDS, "attention_mask": ones})["attention_mask"] is ones
    meta = ones.to("meta")
    assert drop(runner, {"input_ids": IDS, "attention_mask": meta})["attention_mask"] is meta
