"""Which modules are layers: the leaf modules a plan has a row for, their kind, and the walk over a model's layers.

Shared by quantkit.plan (precision per layer) and quantkit.roles (what each layer does), which both
sit above it; it imports nothing of quantkit.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

# Class names (anywhere in the MRO) of the leaf modules a plan has a row for, and their kind.
LAYER_KINDS: dict[str, str] = {
    "Linear": "linear", "Conv1D": "linear",  # transformers' GPT-2 style Conv1D is a linear layer
    "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
    "ConvTranspose1d": "conv", "ConvTranspose2d": "conv", "ConvTranspose3d": "conv",
    "Embedding": "embedding",
}


def class_names(module: nn.Module) -> list[str]:
    return [c.__name__ for c in type(module).__mro__]


def layer_kind(module: nn.Module) -> str | None:
    for name in class_names(module):
        if name in LAYER_KINDS:
            return LAYER_KINDS[name]
    return None


def iter_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every named layer of `model`, in module order."""
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind and name:
            yield name, module, kind
