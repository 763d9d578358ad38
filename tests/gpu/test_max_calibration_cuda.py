"""Max calibration with the statistics on the device, on CUDA: bitwise ModelOpt's amax, and no host sync.

(The CPU half is tests/test_max_calibration.py.)
"""

import math
import warnings

import pytest
import torch

from quantkit.max_calibration import RunningAmax
from quantkit.recipe import load_recipe
from tests.tiny import amaxes_both_ways

warnings.filterwarnings("ignore")


def _decoder():
    """A small Llama decoder with fixed-seed random weights, no tokenizer (nothing to carry to the GPU machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.models import LoadedModel

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    return LoadedModel(spec="tiny-decoder", model=model, input_names=["input_ids", "attention_mask"],
                       output_names=["logits"], example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                       family="llama")


@pytest.fixture(scope="module")
def calib():
    from quantkit.calib import CalibrationSet

    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 1024, (1, 64), generator=g),
                "attention_mask": torch.ones(1, 64, dtype=torch.long)} for _ in range(48)]
    return CalibrationSet.from_samples(samples, {"batching": "examples"})


@pytest.mark.parametrize("recipe_name,dtype", [("fp8", "bf16"), ("balanced", "bf16"), ("nvfp4", "fp32")])
def test_amax_bitwise_equal_to_modelopt_on_cuda(calib, recipe_name, dtype):
    recipe = load_recipe(recipe_name)
    ours, theirs = amaxes_both_ways(_decoder, recipe, calib, dtype=dtype, device=torch.device("cuda"), batch_size=16)
    assert set(ours) == set(theirs) and len(theirs) >= 4 * 7  # 4 layers x 7 linears, weight and input
    differ = [n for n in theirs if ours[n].dtype != theirs[n].dtype or not torch.equal(ours[n], theirs[n])]
    assert differ == [], differ[:5]
    assert all(a.device.type == "cuda" for a in ours.values())


class _Cal:
    """Stands in for a MaxCalibrator: what RunningAmax reads from and writes into."""

    def __init__(self, axis):
        self._axis, self._calib_amax = axis, None


@pytest.mark.parametrize("axis", [None, 0])
def test_running_amax_makes_no_host_sync_and_matches_reduce_amax(axis):
    from modelopt.torch.quantization.utils import convert_quantization_axis_to_reduce_axis, reduce_amax

    cal = _Cal(axis)
    acc = RunningAmax("q", cal, fallback=None)
    xs = [torch.randn(64, 256, device="cuda", dtype=torch.bfloat16) * (i + 1) * (-1) ** i for i in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the collect raises
    try:
        for x in xs:
            acc(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = None
    for x in xs:
        local = reduce_amax(x, axis=convert_quantization_axis_to_reduce_axis(x, axis))
        want = local if want is None else torch.max(want, local)
    assert acc.amax.dtype == want.dtype == torch.bfloat16 and acc.amax.shape == want.shape
    assert torch.equal(acc.amax, want)
    # NaN survives to the end (where max_calibration checks once), as ModelOpt's per-call assert would see it
    x = xs[0].clone()
    x[3, 7] = math.nan
    acc(x)
    assert torch.isnan(acc.amax).any()
