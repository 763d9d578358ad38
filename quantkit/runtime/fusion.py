"""Horizontal fusion: sibling linears that read the same tensor run as one GEMM (q/k/v, gate/up).

Deployment runtimes run a transformer's q/k/v projections as one GEMM and gate/up as another; this
does the same to any PyTorch model without touching its code. One probe forward (`run`) records which
linears are called, one after the other, with the very same input tensor and the same parent module;
each such group is replaced by members of one `FusedSiblings` module that holds the concatenated
weight. The first member called computes every member's output in one GEMM, the others take theirs.

Why it pays: small-N GEMMs (a GQA model's k/v at N = 256) leave most of an H100 idle, and an FP8
group quantizes its input once instead of once per member. A member called with another input than
its leader's (a caller that does not follow the probe's order) computes the group again, so results
stay right in any call order; the work saved assumes, as transformer code does, that the input is
not modified in place between sibling calls. torch.compile traces through the members: one GEMM in
the graph (tests/test_torch_fp8.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch import nn


class FusedSiblings(nn.Module):
    """One module computing several siblings' outputs at once: `fused(x).split(sizes, -1)`."""

    def __init__(self, fused: nn.Module, sizes: list[int]):
        super().__init__()
        self.fused = fused
        self.sizes = list(sizes)
        # The last input and its outputs, kept from the first member's call until the last member's.
        self.last_input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fused(x).split(self.sizes, dim=-1)

    def clear(self) -> None:
        self.last_input = self.outputs = None


class FusedMember(nn.Module):
    """Stands where one of the fused linears was; returns that linear's slice of the group's output."""

    def __init__(self, group: FusedSiblings, index: int, name: str):
        super().__init__()
        if index == 0:
            self.group = group  # registered once, on the leader, so .to()/state_dict see it once
        else:
            object.__setattr__(self, "group", group)
        self.index = index
        self.original_name = name
        self.in_features = getattr(group.fused, "in_features", None)
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group.last_input is not x:
            group.outputs = group(x)
            group.last_input = x
        out = group.outputs[self.index]
        if self.index == len(group.sizes) - 1:
            group.clear()  # hold no activations between forwards (the parent's hook clears it too)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """This layer's rows of the joined weight (code that reads `.weight.dtype` keeps working)."""
        start = sum(self.group.sizes[:self.index])
        return self.group.fused.weight[start:start + self.out_features]

    def extra_repr(self) -> str:
        return f"{self.original_name}: outputs {self.index + 1} of {len(self.group.sizes)} of a fused GEMM"


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def probe(run: Callable[[], Any], handles: list[Any]) -> None:
    """One probe forward, `run()`, in inference mode; the hooks in `handles` are removed after it, raise or not."""
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()


def shared_input_groups(model: nn.Module, run: Callable[[], Any],
                        fusable: Callable[[nn.Module], bool]) -> list[list[str]]:
    """Names of sibling modules called one after another with one input tensor, in call order.

    Only modules `fusable` accepts take part; a module called more than once in the probe (shared
    weights, loops) is left out, since one call site could not stand for its others."""
    calls: list[tuple[str, bool]] = []  # (name, same input as the call before)
    previous: list[Any] = [None]  # a reference, not an id: a freed tensor's id may come back
    # Modules with hooks of their own (accelerate's offload, user hooks) are left alone: a fused
    # group would not run them.
    candidates = {name: m for name, m in model.named_modules()
                  if name and fusable(m) and not (m._forward_hooks or m._forward_pre_hooks)}

    def hook(name: str):
        def record(module, args):
            x = args[0] if args else None
            calls.append((name, x is not None and x is previous[0]))
            previous[0] = x
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in candidates.items()]
    try:
        probe(run, handles)
    finally:
        previous[0] = None
    times = Counter(name for name, _ in calls)
    groups: list[list[str]] = []
    current: list[str] = []
    for name, same in calls:
        if current and same and times[name] == 1 and _parent(name) == _parent(current[0]) and name not in current:
            current.append(name)
            continue
        if len(current) > 1:
            groups.append(current)
        current = [name] if times[name] == 1 else []
    if len(current) > 1:
        groups.append(current)
    return groups


def concat_linears(linears: list[nn.Linear]) -> nn.Linear | None:
    """One nn.Linear computing all of `linears` (same in_features, dtype, device; biases all or none)."""
    first = linears[0]
    if any(type(m) is not nn.Linear for m in linears):
        return None
    if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
           or m.weight.device != first.weight.device or (m.bias is None) != (first.bias is None) for m in linears):
        return None
    out = sum(m.out_features for m in linears)
    fused = nn.Linear(first.in_features, out, bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


@torch.no_grad()
def fuse_shared_input_linears(model: nn.Module, run: Callable[[], Any], fusable: Callable[[nn.Module], bool],
                              concat: Callable[[list[nn.Module]], nn.Module | None]) -> list[list[str]]:
    """Fuse every group of siblings `shared_input_groups` finds and `concat` can join, in place.

    `concat(modules)` returns the one module that computes all of them (outputs concatenated on the
    last dimension) or None when they cannot be joined. Returns the groups that were fused."""
    fused_groups = []
    for names in shared_input_groups(model, run, fusable):
        modules = [model.get_submodule(n) for n in names]
        joined = concat(modules)
        if joined is None:
            continue
        group = FusedSiblings(joined, [m.out_features for m in modules])
        for i, name in enumerate(names):
            model.set_submodule(name, FusedMember(group, i, name))
        # Whatever order the members ran in, the cache ends with the parent's forward.
        parent = model.get_submodule(_parent(names[0])) if _parent(names[0]) else model
        parent.register_forward_hook(lambda module, args, output, group=group: group.clear())
        fused_groups.append(names)
    return fused_groups


def fuse_bf16_linears(model: nn.Module, run: Callable[[], Any]) -> list[list[str]]:
    """The same fusion for plain nn.Linear layers: the unquantized baseline fused the way FP8 is."""
    return fuse_shared_input_linears(model, run, fusable=lambda m: type(m) is nn.Linear, concat=concat_linears)
