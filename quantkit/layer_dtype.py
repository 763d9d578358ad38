"""Plain-dtype precisions per layer: a layer the plan puts in FP16/BF16/FP32 runs in that dtype.

The layer's parameters are cast, its floating inputs are cast on the way in and its outputs cast
back to the surrounding dtype on the way out, with forward hooks, so the exported graph shows the
Cast nodes that a strongly-typed TensorRT build keeps. `seal_islands` gives the same boundary casts
to any other module whose own weights ended up in another dtype (shared with a layer the plan casts).
Module names and classes do not change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.recipe import FORMATS, Precision

_HOOK_FLAG = "_quantkit_layer_dtype"


def _cast_tree(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast_tree(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_tree(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


def set_layer_dtype(module: nn.Module, dtype: torch.dtype, surrounding: torch.dtype) -> bool:
    """Run `module` in `dtype` inside a model that runs in `surrounding`. Returns False if already done."""
    if getattr(module, _HOOK_FLAG, None) is not None or dtype == surrounding:
        return False
    module.to(dtype)
    _cast_at_boundaries(module, dtype, surrounding)
    return True


def _cast_at_boundaries(module: nn.Module, dtype: torch.dtype, surrounding: torch.dtype) -> None:
    def cast_in(mod, args, kwargs):
        return _cast_tree(args, dtype), _cast_tree(kwargs, dtype)

    def cast_out(mod, args, kwargs, output):
        return _cast_tree(output, surrounding)

    module.register_forward_pre_hook(cast_in, with_kwargs=True)
    module.register_forward_hook(cast_out, with_kwargs=True)
    setattr(module, _HOOK_FLAG, dtype)


def _own_dtype(module: nn.Module) -> torch.dtype | None:
    """The one floating dtype of the module's own parameters (not its children's), else None."""
    dtypes = {p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def seal_islands(model: nn.Module, model_dtype: torch.dtype) -> list[tuple[str, torch.dtype]]:
    """Boundary casts for every module whose own weights ended up in another dtype than the model's
    without being a planned island: a weight shared with a layer the plan casts (tied embedding and
    lm_head) changes dtype under the other module too, which then hands its neighbours tensors of the
    wrong dtype ("mat1 and mat2 must have the same dtype"). FP32 guards cast for themselves."""
    from quantkit.protect import is_guarded

    sealed = []
    for name, module in model.named_modules():
        if getattr(module, _HOOK_FLAG, None) is not None or is_guarded(module):
            continue
        dtype = _own_dtype(module)
        if dtype is not None and dtype != model_dtype:
            _cast_at_boundaries(module, dtype, model_dtype)
            sealed.append((name, dtype))
    return sealed


def island_rows(rows: list[Any], model_dtype: torch.dtype) -> list[Any]:
    """The plan rows that put a layer in a plain dtype other than the model's."""
    out = []
    for row in rows:
        fmt = FORMATS[row.precision]
        if row.precision == Precision.SKIP or fmt.quantized or fmt.torch_dtype is None:
            continue
        if getattr(torch, fmt.torch_dtype) != model_dtype:
            out.append(row)
    return out


@torch.no_grad()
def called_modules(model: nn.Module, example: dict[str, Any]) -> set[str]:
    """Names of the modules one forward on `example` calls."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: called.add(name))
               for name, m in model.named_modules()]
    try:
        model(**example)
    finally:
        for h in handles:
            h.remove()
    return called


def apply_layer_dtypes(model: nn.Module, rows: list[Any], model_dtype: torch.dtype,
                       called: set[str] | None = None) -> list[str]:
    """Apply each plain-dtype row of a plan (fp16/bf16/fp32 differing from the model's dtype).

    With `called` (the modules a probe forward called), a layer the model never calls is left as it
    is, its row set to skip with a note: its weights are read by another module (ACT's learned queries
    `self.query.weight`), so no cast at its own boundaries could keep the new dtype from leaking. Unless
    the weights are shared with a called layer planned the same (T5's `shared` and the
    `encoder.embed_tokens` the model calls): casting that one casts them, so the row holds."""
    modules = dict(model.named_modules())
    changed = []
    planned = {row.name: row.precision for row in rows}
    for row in island_rows(rows, model_dtype):
        cast_with = [n for n in getattr(row, "shares_weight_with", []) or []
                     if called is not None and n in called and planned.get(n) == row.precision]
        if called is not None and row.name not in called and cast_with:
            row.note = f"not called by the model; its weights are {row.precision} as those of {cast_with[0]}, which is"
            continue
        if called is not None and row.name not in called:
            row.note = (f"planned {row.precision} ({row.rule}), but the model reads its weights without calling "
                        "it: left as the model has it (a cast would leak into the modules reading them)")
            row.precision, row.weights, row.activations = Precision.SKIP, None, None
            continue
        if set_layer_dtype(modules[row.name], getattr(torch, FORMATS[row.precision].torch_dtype), model_dtype):
            changed.append(row.name)
    return changed
