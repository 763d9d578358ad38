"""Which tensors an attention computed, followed through reshapes: read during quantkit.roles' probe forward.

A linear inside an attention site is its output projection when it reads what the attention
produced: F.scaled_dot_product_attention's output, or the matmul of a softmax's probabilities with
V (an eager attention), carried through ops that only move, cast or scale values (view, reshape,
transpose, contiguous, dropout, slicing, a gate's multiply). A linear called after the attention that
reads something else (a whole-block site's MLP, fed by the residual stream) is not. A TorchFunctionMode
sees every torch function and Tensor method of the forward, so the rule holds however the model is
written (its own matmuls, transformers' eager or sdpa attention functions, diffusers' processors).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionFlow"]

_SDPA = {"scaled_dot_product_attention"}
_SOFTMAX = {"softmax", "_softmax"}
_MATMUL = {"matmul", "bmm", "__matmul__", "__rmatmul__", "einsum"}
# Ops whose output holds the input's values moved, cast, masked or scaled: what an attention's output
# or probabilities go through on the way to P·V or to the output projection. Nothing that mixes in a
# linear's weights (F.linear) or adds another stream (the residual `x + ...`) is here.
_CARRY = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "transpose_", "swapaxes", "permute", "movedim",
    "contiguous", "flatten", "unflatten", "squeeze", "unsqueeze", "t", "to", "type", "type_as", "float", "half",
    "bfloat16", "double", "clone", "detach", "__getitem__", "narrow", "split", "chunk", "unbind",
    "dropout", "masked_fill", "masked_fill_", "mul", "mul_", "__mul__", "__rmul__", "div", "div_", "__truediv__",
}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class AttentionFlow(TorchFunctionMode):
    """Tags, for one forward, the tensors an attention produced (kind "attn") and the softmax
    probabilities on their way to P·V (kind "probs"), each with the attention site it ran in
    (`site()`: the innermost site module running, or None) and the number of linear calls made so far
    (`calls()`), the time of the attention within the site."""

    def __init__(self, site: Callable[[], str | None], calls: Callable[[], int]):
        super().__init__()
        self._site, self._calls = site, calls
        # id -> (kind, site, weakref): a tag goes when its tensor does (so an id is never read for a new
        # tensor, and nothing is kept alive: the probabilities of every layer would add up).
        self._tags: dict[int, tuple[str, str | None, Any]] = {}
        self.computed_at: dict[str, list[int]] = {}  # site -> linear-call counts at each attention output
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The probe's own hooks (fingerprints of inputs) run untracked: their ops are none of the model's."""
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def _tag(self, value: Any, kind: str, site: str | None) -> None:
        for t in _tensors(value):
            key = id(t)
            self._tags[key] = (kind, site, weakref.ref(t, lambda _, key=key: self._tags.pop(key, None)))

    def _tag_of(self, args: Any, kwargs: Any, kind: str | None = None) -> tuple[str, str | None] | None:
        for t in _tensors(args) + _tensors(kwargs):
            tag = self._tags.get(id(t))
            if tag is not None and (kind is None or tag[0] == kind):
                return tag[0], tag[1]
        return None

    def attention_output_of(self, t: Any) -> str | None:
        """The site whose attention computed `t` (through moves and casts), or None."""
        tag = self._tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return tag[1] if tag is not None and tag[0] == "attn" else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        name = getattr(func, "__name__", "")
        if name in _SDPA or (name in _MATMUL and self._tag_of(args, kwargs, "probs") is not None):
            site = self._site()
            self._tag(out, "attn", site)
            if site is not None:
                self.computed_at.setdefault(site, []).append(self._calls())
        elif name in _SOFTMAX:
            self._tag(out, "probs", self._site())
        elif name in _CARRY:
            tag = self._tag_of(args, kwargs)
            if tag is not None:
                self._tag(out, *tag)
        return out
