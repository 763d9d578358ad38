"""Block by block: does the graph compute each transformer block as the PyTorch model does?

End to end, two runtimes of one quantized model drift apart even when both are right: their float
summation orders differ by an ulp, an ulp flips an FP8/INT8 rounding now and then, and the flips
compound layer by layer (MiniLM, FP8, FP32 graph: every quantizer of layer 0 agrees at cosine
0.9999998 and the output at 0.998; nudging PyTorch's own embedding output by 1e-7 moves its output
as far). So the end-to-end cosine cannot tell a wrong graph from a right one. Here each block of the
PyTorch model is fed the very tensor the graph fed its block (forward pre-hook), its output is
compared with the graph's, and the graph's output is passed on (forward hook); the part after the
last block ("head") is checked the same way, and so is each block's input (the stem before the first
block, whatever the parent computes between blocks). A block that computes something else — a missing Q/DQ,
a wrong scale, a Softmax in the wrong precision — shows at once; rounding noise does not compound.

The blocks are those of the largest ModuleList of one class (`repeated_blocks`); each is found in the
graph by its scope (`/model/layers.3/...`), and its input and output tensors are the ones crossing that
scope with the shape PyTorch sees. A model with no such blocks is compared end to end only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

from quantkit.export.graph import GraphIndex, scope_boundary
from quantkit.model_structure import repeated_blocks

HEAD = "head"


@dataclasses.dataclass
class BlockBoundaries:
    """Per block (module name): candidate graph tensors for its input and its output."""

    blocks: list[str]
    entering: dict[str, list[str]]
    leaving: dict[str, list[str]]

    @property
    def tensors(self) -> list[str]:
        names: list[str] = []
        for block in self.blocks:
            for name in self.entering[block] + self.leaving[block]:
                if name not in names:
                    names.append(name)
        return names


def block_names(model: nn.Module) -> list[str]:
    """The repeated blocks' module names; none when one block object is used twice (shared weights:
    its hooks would fire per use, and the export names the second use apart)."""
    blocks = repeated_blocks(model)
    ids = {id(b) for b in blocks}
    if len(ids) != len(blocks):
        return []
    return [name for name, m in model.named_modules() if id(m) in ids]


def find_boundaries(model: nn.Module, graph: Any) -> BlockBoundaries | None:
    """The blocks of `model` and the graph tensors crossing each one's scope; None when the graph
    has no scope for some block (exported without names) or the model has no repeated blocks."""
    blocks = block_names(model)
    if not blocks:
        return None
    index = graph if isinstance(graph, GraphIndex) else GraphIndex.build(graph)
    entering, leaving = {}, {}
    for block in blocks:
        inputs, outputs = scope_boundary(index, block)
        if not outputs:
            return None
        entering[block], leaving[block] = inputs, outputs
    # By structure, not by value: a block's output is what the next block reads (or a graph output),
    # its input what the previous block wrote — where the graph says so.
    returned = set(index.graph_outputs)
    last = blocks[-1]  # the last block's output is what the head reads: not consumed by any block
    in_blocks = {t for b in blocks for t in entering[b]}
    tail = [t for t in leaving[last] if t not in in_blocks]
    if tail:
        leaving[last] = tail
    for prev, nxt in zip(blocks, blocks[1:]):
        chained = [t for t in leaving[prev] if t in entering[nxt] or t in returned]
        if chained:
            leaving[prev] = chained
        fed = [t for t in entering[nxt] if t in leaving[prev]]
        if fed:
            entering[nxt] = fed
    return BlockBoundaries(blocks, entering, leaving)


def _hidden(value: Any) -> torch.Tensor | None:
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)) and value and torch.is_tensor(value[0]):
        return value[0]
    return None


def _with_hidden(value: Any, hidden: torch.Tensor) -> Any:
    if torch.is_tensor(value):
        return hidden
    if hasattr(value, "_fields"):  # a namedtuple
        return value._replace(**{value._fields[0]: hidden})
    return type(value)([hidden, *value[1:]]) if isinstance(value, (tuple, list)) else value


def _pick(graph_values: Mapping[str, torch.Tensor], names: list[str], like: torch.Tensor) -> torch.Tensor | None:
    """The one graph tensor among `names` with `like`'s shape; None when none or several have it
    (never chosen by closeness to the value under test: that would grade the check on a curve)."""
    same = [graph_values[n] for n in names if n in graph_values and tuple(graph_values[n].shape) == tuple(like.shape)]
    return same[0] if len(same) == 1 else None


# Dtypes whose block outputs get an update comparison. In BF16 the residual add rounds at 2^-8 of the
# residual stream, which lands in the update when the update is small against it (simulated: cosine
# 0.9976 at 3 % with one large channel, where the output measures 1.0): rounding, not a wrong graph.
_UPDATE_DTYPES = (torch.float32, torch.float64, torch.float16)


def teacher_forced(model: nn.Module, boundaries: BlockBoundaries, graph_values: Mapping[str, torch.Tensor],
                   forward: Callable[[], Any]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Any]:
    """Run `forward()` with each block fed the graph's input and passing the graph's output on.

    Returns ({name: (PyTorch tensor, graph tensor)}, the model's result after the last block was
    given the graph's output). Names: each block's output under the block's name, and each block's
    input as "<block> input" — PyTorch's own input there (for the first block: what the stem before
    it computed; for the others: the previous block's graph output through whatever the parent does
    in between) against the graph's, so no part of the model goes unchecked; and, where input and output
    have one shape and the run is FP32/FP16, the block's update ("<block> update": output less the fed
    input). Blocks whose tensors
    could not be matched by shape, or that ran more than once, are left out."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fed_inputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def pre_hook(block: str):
        def hook(module, args, kwargs):
            calls[block] = calls.get(block, 0) + 1
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not torch.is_tensor(hidden):
                return None
            fed = _pick(graph_values, boundaries.entering[block], hidden)
            if fed is None:
                return None
            fed_inputs[block] = fed.float()
            pairs[f"{block} input"] = (hidden.detach().float().cpu(), fed_inputs[block])
            fed = fed.to(device=hidden.device, dtype=hidden.dtype)
            if args:
                return (fed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fed}
        return hook

    def post_hook(block: str):
        def hook(module, args, kwargs, output):
            hidden = _hidden(output)
            if hidden is None:
                return None
            graph_out = _pick(graph_values, boundaries.leaving[block], hidden)
            if graph_out is None:
                return None
            pairs[block] = (hidden.detach().float().cpu(), graph_out.float())
            fed = fed_inputs.get(block)
            if fed is not None and fed.shape == graph_out.shape and hidden.dtype in _UPDATE_DTYPES:
                # What the block adds to its input: a residual block's output is mostly its input, which
                # hides a wrong attention or MLP inside it (a cosine of 0.9996 over a causal-vs-bidirectional
                # attention); both sides were fed the same input, so the update is compared alone too.
                pairs[f"{block} update"] = (hidden.detach().float().cpu() - fed, graph_out.float() - fed)
            return _with_hidden(output, graph_out.to(device=hidden.device, dtype=hidden.dtype))
        return hook

    try:
        for block in boundaries.blocks:
            module = model.get_submodule(block)
            handles.append(module.register_forward_pre_hook(pre_hook(block), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(block), with_kwargs=True))
        result = forward()
    finally:
        for h in handles:
            h.remove()
    for block, n in calls.items():
        if n != 1:  # a block called twice in one forward: one graph scope cannot stand for both calls
            pairs.pop(block, None)
            pairs.pop(f"{block} input", None)
            pairs.pop(f"{block} update", None)
    return pairs, result
