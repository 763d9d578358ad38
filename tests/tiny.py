"""Small models for the tests that build one in a function (`file.py:function` specs) and quantize it
on synthetic samples: made under seed 0 without touching the caller's RNG."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def seeded_model(spec: str, build: Callable[[], nn.Module], example: dict[str, torch.Tensor], outputs: list[str]):
    """A LoadedModel of `build()` in eval mode, its weights drawn under seed 0 (the global RNG is
    left as it was), named `spec`, with `example` as its example inputs."""
    from quantkit.models import LoadedModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().eval()
    return LoadedModel(spec=spec, model=model, input_names=list(example), output_names=outputs,
                       example_inputs=example)


def example_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def quantize_synthetic(loaded, recipe, *, per_layer: bool = False):
    """ptq.quantize of `loaded` under `recipe` (a name or a YAML path) on 8 synthetic samples, batches of 4."""
    from quantkit import calib, ptq
    from quantkit.recipe import load_recipe

    return ptq.quantize(loaded, load_recipe(str(recipe)), calib.synthetic_set(loaded, n=8, seed=0), batch_size=4,
                        per_layer=per_layer)


def amaxes_both_ways(make_loaded, recipe, calib, **quantize_kwargs):
    """(quantkit's device statistics, ModelOpt's own max calibration): each quantizer's amax after
    ptq.quantize_model of a fresh `make_loaded()` on the same samples, once each way."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from quantkit import ptq

    got = {}
    for device_stats in (False, True):
        loaded = make_loaded()
        ptq.quantize_model(loaded, recipe, calib, device_stats=device_stats, **quantize_kwargs)
        got[device_stats] = {n: m._amax.detach().clone() for n, m in loaded.model.named_modules()
                             if isinstance(m, TensorQuantizer) and "_amax" in m._buffers}
    return got[True], got[False]
