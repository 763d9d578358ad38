"""What a model is made of, read from its module tree: the repeated blocks (transformer layers).

Neutral ground for `runtime/` (regional compilation) and `verify/` (the per-block reference), which
must not import each other's packages.
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the largest ModuleList whose entries all share one class (transformer layers)."""
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        blocks = list(module)
        if len({type(b) for b in blocks}) != 1:
            continue
        params = sum(p.numel() for b in blocks for p in b.parameters()) + sum(
            b.numel() for blk in blocks for b in blk.buffers())
        if params > best_params:
            best, best_params = blocks, params
    return best
