"""A whole forward recorded as one CUDA graph and replayed (quantkit/runtime/cuda_graph.py): a
transformers decoder, BF16 and through the FP8 runner, compiled per layer; replays give what direct
calls of the same compiled model give, for new input values, masks and shapes.

Skipped, with the reason, without CUDA (tests/gpu/conftest.py).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from quantkit.models import load_model
from quantkit.runtime.cuda_graph import CaptureError, CUDAGraphForward
from quantkit.runtime.torch_fp8 import compile_model


def _cos(a, b) -> float:
    # in float64: over millions of values a float32 cosine of a tensor with itself is 1 ± 2e-4
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _ids(shape, seed):
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed)).cuda()


def _captured_masks(sdpa_masks) -> list:
    """The sdpa masks transformers built while a stream was capturing (None: left out); tests/conftest.py."""
    return [mask for capturing, mask in sdpa_masks if capturing]


def _bf16_llama():
    model = load_model("llama-tiny").model.to("cuda", torch.bfloat16).eval()
    return compile_model(model)  # per layer, no CUDA graphs of its own


def test_replays_give_the_direct_calls_outputs_and_leave_the_mask_out(sdpa_masks):
    model = _bf16_llama()
    graphed = CUDAGraphForward(model)
    a, b = _ids((2, 64), 0), _ids((2, 64), 1)
    with torch.inference_mode():
        got_a = graphed(input_ids=a).logits.clone()
        got_b = graphed(input_ids=b).logits.clone()  # the same graph, new values
        got_a_again = graphed(input_ids=a).logits.clone()
        want_a, want_b = model(input_ids=a).logits, model(input_ids=b).logits
        longer = graphed(input_ids=_ids((1, 128), 2)).logits.clone()  # a new signature, a second graph
        want_longer = model(input_ids=_ids((1, 128), 2)).logits
    assert len(graphed.graphs) == 2
    assert _captured_masks(sdpa_masks) == [None, None]  # as eager: SDPA's causal kernel, no materialized mask
    assert got_a.shape == (2, 64, model.config.vocab_size) and got_a.dtype == torch.bfloat16
    eq = [(g == w).float().mean().item() for g, w in ((got_a, want_a), (got_b, want_b), (longer, want_longer))]
    print(f"one graph vs direct calls: bytes equal {eq}")
    assert torch.equal(got_a, got_a_again)
    for got, want in ((got_a, want_a), (got_b, want_b), (longer, want_longer)):
        assert _cos(got, want) >= 0.99999
    assert min(eq) >= 0.99
    assert _cos(got_a, got_b) < 0.99  # b's replay computed b, not a again


def test_a_mask_among_the_inputs_is_built_in_the_graph_from_its_values(sdpa_masks):
    model = _bf16_llama()
    graphed = CUDAGraphForward(model)
    ids = _ids((2, 64), 3)
    first, second = torch.ones_like(ids), torch.ones_like(ids)
    first[0, :10] = 0
    second[1, :30] = 0
    with torch.inference_mode():
        got_first = graphed(input_ids=ids, attention_mask=first).logits.clone()
        got_second = graphed(input_ids=ids, attention_mask=second).logits.clone()  # replayed, other padding
        want_first = model(input_ids=ids, attention_mask=first).logits
        want_second = model(input_ids=ids, attention_mask=second).logits
    captured = _captured_masks(sdpa_masks)
    assert len(graphed.graphs) == 1 and len(captured) == 1 and captured[0].dim() == 4
    for got, want, mask in ((got_first, want_first, first), (got_second, want_second, second)):
        real = mask.bool()  # the logits of padding positions are not compared (nothing to attend to)
        assert torch.isfinite(got[real]).all()
        assert _cos(got[real], want[real]) >= 0.99999, _cos(got[real], want[real])
    both = first.bool()[1] & second.bool()[1]
    assert _cos(got_first[1][both], got_second[1][both]) < 0.999  # row 1's padding changed, and its logits did


def test_a_forward_that_reads_the_device_is_refused_with_the_signature():
    def reads_back(x):
        return x * 2 if x.sum().item() > 0 else x

    graphed = CUDAGraphForward(reads_back)
    with pytest.raises(CaptureError, match=r"for \(x \[4, 8\]\) could not be recorded") as e:
        graphed(x=torch.ones(4, 8, device="cuda"))
    assert e.value.exit_code == 2
    with pytest.raises(CaptureError, match="is on cpu"):
        graphed(x=torch.ones(4, 8))
    assert torch.ones(3, device="cuda").sum().item() == 3  # the failed capture left CUDA usable


def test_replaying_one_signature_leaves_anothers_outputs_alone_in_or_out_of_inference_mode():
    graphed = CUDAGraphForward(lambda x: (x * 2 + 1) * 3)
    with torch.inference_mode():  # recorded in inference mode ...
        big = graphed(x=torch.ones(1 << 22, device="cuda"))
    small = graphed(x=torch.ones(1 << 20, device="cuda"))  # ... and outside it
    assert torch.equal(small, torch.full((1 << 20,), 9.0, device="cuda"))
    graphed(x=torch.full((1 << 22,), 2.0, device="cuda"))  # replays the big one with other values
    assert torch.equal(small, torch.full((1 << 20,), 9.0, device="cuda"))
    assert torch.equal(big, torch.full((1 << 22,), 15.0, device="cuda"))  # its own outputs: overwritten


def test_past_max_graphs_new_signatures_run_unrecorded():
    graphed = CUDAGraphForward(lambda x: x * 2 + 1, max_graphs=2)
    for n in (1, 2):
        assert torch.equal(graphed(x=torch.full((n,), 3.0, device="cuda")), torch.full((n,), 7.0, device="cuda"))
    with pytest.warns(UserWarning, match="2 input signatures recorded"):
        third = graphed(x=torch.full((3,), 3.0, device="cuda"))
    again = graphed(x=torch.full((4,), 1.0, device="cuda"))
    assert torch.equal(third, torch.full((3,), 7.0, device="cuda")) and torch.equal(again, torch.full((4,), 3.0, device="cuda"))
    assert len(graphed.graphs) == 2 and graphed.unrecorded_calls == 2
    assert torch.equal(graphed(x=torch.full((2,), 0.0, device="cuda")), torch.ones(2, device="cuda"))  # still replayed


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell)")
def test_the_fp8_runner_records_its_whole_forward():
    pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt")
    import quantkit
    from quantkit.calib import builtin_set
    from quantkit.runtime.torch_fp8 import TorchFP8Runner

    llama = load_model("llama-tiny")
    with quantkit.quantize(llama, "fp8", calibration=builtin_set(llama).subset(range(6)), per_layer=False,
                           device="cuda", dtype="bf16") as qm:
        plain = TorchFP8Runner(dataclasses.replace(qm.loaded, model=copy.deepcopy(qm.model)))
        whole = TorchFP8Runner(qm.loaded, compile=False)
        ids = torch.randint(0, 1000, (2, 96), generator=torch.Generator().manual_seed(0))
        whole.fuse({"input_ids": ids})
        with pytest.raises(ValueError, match="reduce-overhead"):
            whole.compile(cuda_graph=True, mode="reduce-overhead")
        whole.compile(cuda_graph=True)
        got = whole.run({"input_ids": ids})["logits"]
        again = whole.run({"input_ids": ids})["logits"]
        want = plain.run({"input_ids": ids})["logits"]
        short = whole.run({"input_ids": ids[:1, :32]})["logits"]
        want_short = plain.run({"input_ids": ids[:1, :32]})["logits"]
        # an all-ones mask is left out, as transformers' sdpa path does: the same recording
        full = whole.run({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["logits"]
        assert len(whole.graphed.graphs) == 2
        padded = torch.ones_like(ids)
        padded[0, :16] = 0
        got_padded = whole.run({"input_ids": ids, "attention_mask": padded})["logits"]
        want_padded = plain.run({"input_ids": ids, "attention_mask": padded})["logits"]
    assert torch.equal(full, got)
    real = padded.bool()
    assert _cos(got_padded[real], want_padded[real]) >= 0.99999
    assert whole.graphed is not None and len(whole.graphed.graphs) == 3
    assert got.shape == (2, 96, llama.model.config.vocab_size) and got.device.type == "cpu"
    assert torch.equal(got, again) and torch.isfinite(got).all()
    print(f"FP8 runner one graph vs compiled: cosine {_cos(got, want):.7f}, bytes equal "
          f"{(got == want).float().mean().item():.6f}; short {_cos(short, want_short):.7f}")
    assert _cos(got, want) >= 0.99999 and _cos(short, want_short) >= 0.99999
