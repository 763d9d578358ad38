"""Attention masks in an exported graph as transformers' eager (sdpa) forward uses them.

With the sdpa implementation, transformers leaves out a mask the kernel can do without: over a batch
without padding, a plain causal or bidirectional mask becomes None, and the attention module's own
`is_causal` then decides (`sdpa_attention_forward`: causal iff more than one query and
`module.is_causal`). Under tracing it cannot read the padding, so it always materializes the mask.
Where the module's `is_causal` and the mask's kind disagree, eager PyTorch and the traced graph
compute different attentions: PaliGemma's Gemma (`use_bidirectional_attention=True`: its attentions
are not causal, its mask is) attends bidirectionally in PyTorch over an unpadded batch and causally in
the graph; ORT then differs from PyTorch by far more than any rounding.

`mark` (from quantkit's mask function) tags a mask materialized only because of tracing with the
in-graph condition under which eager would have left it out; `as_eager` (from quantkit's attention)
applies, under that condition, what eager does with no mask. Outside tracing nothing is tagged, so
eager PyTorch runs exactly as before.
"""

from __future__ import annotations

from typing import Any

import torch

_MARK = "_quantkit_eager_skip"  # tensor attribute: (kind, no_padding) of a mask eager would have left out


def _tracing() -> bool:
    from transformers.utils.import_utils import is_tracing

    return bool(is_tracing() or torch.onnx.is_in_onnx_export())


def _size(value: Any) -> int | None:
    """A length as an int: traced, transformers passes shapes as 0-d tensors (constant in the trace)."""
    if isinstance(value, int):
        return value
    if torch.is_tensor(value) and value.dim() == 0 and not value.is_floating_point():
        return int(value)
    return None


def mark(mask: Any, original: str, **kwargs: Any) -> Any:
    """Tag `mask` (made by the `original` mask function from the mask-interface `kwargs`) with when
    eager sdpa would have returned None. Anything unexpected (another transformers' arguments, a float
    mask) leaves the mask as it is."""
    q_length, kv_length = _size(kwargs.get("q_length")), _size(kwargs.get("kv_length"))
    if (original != "sdpa" or not torch.is_tensor(mask) or mask.dtype != torch.bool or q_length is None
            or kv_length is None or not _tracing()):
        return mask
    local_size = kwargs.get("local_size")
    if local_size is not None and not isinstance(local_size, int):
        return mask
    if kwargs.get("allow_is_causal_skip") and (q_length == 1 or kv_length == q_length):
        kind = "causal"
    elif kwargs.get("allow_is_bidirectional_skip"):
        kind = "bidirectional"
    else:
        return mask
    padding = kwargs.get("attention_mask")
    if padding is None:
        no_padding = torch.ones((), dtype=torch.bool, device=mask.device)
    elif padding.dim() != 2:
        return mask  # a prepared 4D mask is used as it is, eager or traced
    else:
        # the keys this mask covers, as transformers' skip test reads them (shorter: padded, so not skipped)
        offset = _size(kwargs.get("kv_offset") or 0)
        if offset is None or padding.shape[-1] < offset + kv_length:
            return mask
        no_padding = padding[:, offset:offset + kv_length].bool().all()
    setattr(mask, _MARK, (kind, no_padding, local_size))
    return mask


def as_eager(mask: Any, module: Any, query: torch.Tensor, key: torch.Tensor, is_causal: bool | None) -> Any:
    """The mask eager PyTorch would have used: for a tagged mask, where no token is padded, what sdpa
    does with None for this module; else `mask` itself."""
    tag = getattr(mask, _MARK, None) if torch.is_tensor(mask) else None
    if tag is None:
        return mask
    kind, no_padding, local_size = tag
    if int(query.shape[-2]) == 1:
        return mask  # one query: a causal mask allows every key, as no mask does
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    none_is_causal = bool(causal)  # sdpa_attention_forward's rule for no mask (more than one query)
    if none_is_causal == (kind == "causal"):
        return mask  # None would have meant what the mask says
    # Eager leaves a sliding-window mask out only while the keys fit in the window: decided in the
    # graph, like the padding, so that a graph with a dynamic sequence length follows eager at any length.
    skip = no_padding
    if local_size is not None:
        skip = skip & (torch.as_tensor(key.shape[-2], device=mask.device) < local_size)
    none_mask = torch.ones_like(mask)  # the mask's own (traced) shape: a dynamic sequence axis stays dynamic
    if none_is_causal:
        none_mask = none_mask.tril()  # sdpa's is_causal: top-left aligned
    # And/Or/Not rather than a boolean Where, which ONNX Runtime's CPU provider has no kernel for
    return (none_mask & skip) | (mask & ~skip)
