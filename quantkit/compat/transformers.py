"""transformers internals quantkit relies on: a config's attention implementation field (set per
config, so only the module that owns it changes), the class-wide attention and mask registries
(transformers offers `register` but no way to take an entry back), a model's `_no_split_modules`,
and the mask code's tracing and packed-sequence checks while a CUDA graph is recorded.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from quantkit.compat import require

PACKAGE = "transformers"


def attn_implementation(config: Any) -> Any:
    """The config's attention implementation ("eager", "sdpa", ...; None when it has none)."""
    return getattr(config, "_attn_implementation", None)


def has_attn_implementation(config: Any) -> bool:
    return config is not None and hasattr(config, "_attn_implementation")


def set_attn_implementation(config: Any, value: Any) -> None:
    """Set the field on this config only (a dict {"": name} keeps sub-configs as they are)."""
    require(type(config), "_attn_implementation", PACKAGE, type(config).__name__)
    config._attn_implementation = value


def register_attention(name: str, attention: Callable, mask: Callable) -> Callable[[], None]:
    """Register `name` in AttentionInterface and AttentionMaskInterface (masking_utils checks the
    class-wide mapping); returns the undo, which puts back what `name` mapped to before."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    saved = []
    for interface, fn in ((AttentionInterface, attention), (AttentionMaskInterface, mask)):
        mapping = require(interface, "_global_mapping", PACKAGE, interface.__name__)
        saved.append((mapping, mapping.get(name, None), name in mapping))
        interface.register(name, fn)

    def undo() -> None:
        for mapping, before, had in saved:
            if had:
                mapping[name] = before
            else:
                mapping.pop(name, None)
    return undo


def no_split_modules(model: Any) -> list[str]:
    """The block classes a PreTrainedModel must not be split inside (accelerate's no_split_module_classes)."""
    return list(getattr(model, "_no_split_modules", None) or [])


# Inputs from which transformers' mask code decides, by reading their values on the host, whether to
# materialize a mask (padding in the 2D mask, packed sequences in the positions).
MASK_DECIDING_INPUTS = ("attention_mask", "position_ids")


@contextlib.contextmanager
def masks_for_capture(materialize: bool) -> Iterator[None]:
    """Make transformers' mask code take one path during a CUDA-graph capture and the forwards that
    warm it up, and never read the device from the host there. Swaps module globals of
    transformers.masking_utils: one recording at a time (quantkit.runtime.cuda_graph holds a lock), and
    no other thread may run a transformers model meanwhile (a capture forbids their CUDA work anyway).

    transformers decides from values whether a forward needs a mask (padding, packed sequences) and
    5.x counts a stream capture as tracing (`masking_utils.is_tracing`), so a captured forward would
    materialize a mask its warm-up left out - another path, recompiled compiled regions in the middle
    of the capture, and a masked (slower) attention kernel. With `materialize` False (the inputs carry
    no attention mask and no positions, so the decision depends on shapes only): on 5.x capture does
    not count as tracing and packed-sequence detection answers "not packed" (the model made the
    positions itself), which is what eager answers, so the mask is left out as in eager; 4.x never
    counted capture as tracing and needs nothing. With `materialize` True (a mask or positions come
    in, and the graph must honour whatever values later replays bring) the causal-skip test answers
    "keep the mask" without reading it, and 5.x's mask code traces, in the warm-up too: the mask is
    computed on the device, in the graph, from the input buffers.
    Does nothing where transformers' mask code has not been imported."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None:
        yield
        return
    saved: list[tuple[str, Any]] = []

    def swap(name: str, value: Any) -> None:
        saved.append((name, require(masking, name, PACKAGE, "transformers.masking_utils")))
        setattr(masking, name, value)

    try:
        v5 = hasattr(masking, "is_tracing")  # transformers 5: module-level is_tracing, capture included
        if materialize:
            swap("_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)
            if v5:
                swap("is_tracing", lambda tensor=None: True)
        elif v5:
            swap("is_tracing", _tracing_not_capturing)
            swap("find_packed_sequence_indices", lambda position_ids: None)
        yield
    finally:
        for name, value in reversed(saved):
            setattr(masking, name, value)


def _tracing_not_capturing(tensor: Any = None) -> bool:
    """transformers' is_tracing without its stream-capture clause: compiling, jit or fx tracing, fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing()
                or (isinstance(tensor, torch.Tensor) and is_fake(tensor)) or isinstance(tensor, torch.fx.Proxy))
