"""FP32 guards: softmax, RMSNorm/LayerNorm, GroupNorm/InstanceNorm, unfolded BatchNorm, rotary embeddings and user-declared modules or functions
compute in FP32 inside an FP16/BF16 model and cast back, so that the exported graph carries
Cast -> op(FLOAT) -> Cast, which a strongly-typed TensorRT build keeps. In an FP32 model every guard
is an identity: outputs stay bit-identical. Module names never change, Linear layers stay visible.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from quantkit import attention
from quantkit.errors import InputError
from quantkit.patches import Patches, of_model
from quantkit.recipe import ProtectSpec

HALF = (torch.float16, torch.bfloat16)
_GUARD_FLAG = "_quantkit_guard"  # class attribute of the FP32-guarded classes: the op they protect
_FN_FLAG = "__quantkit_fp32__"  # attribute of an FP32-wrapped function: the original
# Functions that apply rotary embeddings in the modeling files of transformers and most ports of it.
_ROPE_FUNCTION = re.compile(r"^apply_(multimodal_|interleaved_)?(rotary|rope)\w*$")


@dataclass(frozen=True)
class Protection:
    name: str  # module name relative to the model root, or "package.module:function"
    op: str  # "softmax" | "rmsnorm" | "layernorm" | "rope" | "custom"
    module_class: str  # the original class name, or "function"
    how: str


# ---------------------------------------------------------------------------------------------
# Casting


def _half_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.Tensor):
        return value.dtype if value.dtype in HALF else None
    if isinstance(value, (tuple, list)):
        for v in value:
            if (d := _half_dtype(v)) is not None:
                return d
    if isinstance(value, dict):
        return _half_dtype(list(value.values()))
    return None


def _cast(value: Any, src: tuple[torch.dtype, ...], dst: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        # .float() / .to(): an explicit Cast in the exported graph.
        return value.to(dst) if value.dtype in src else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_cast(v, src, dst) for v in value)
    if isinstance(value, list):
        return [_cast(v, src, dst) for v in value]
    if isinstance(value, dict) and type(value) is dict:
        return {k: _cast(v, src, dst) for k, v in value.items()}
    return value


def run_in_fp32(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """fn(*args, **kwargs) with half-precision tensor inputs upcast to FP32 and outputs cast back."""
    low = _half_dtype(args) or _half_dtype(kwargs)
    if low is None:
        return fn(*args, **kwargs)
    out = fn(*_cast(args, HALF, torch.float32), **_cast(kwargs, HALF, torch.float32))
    return _cast(out, (torch.float32,), low)


def _keep_fp32(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dtype in HALF:
            p.data = p.data.float()
    for m in module.modules():
        for key, b in m._buffers.items():
            if b is not None and b.dtype in HALF:
                m._buffers[key] = b.float()


# ---------------------------------------------------------------------------------------------
# Module guards: the instance's class is swapped for an FP32-guarded subclass


_GUARDED: dict[type, type] = {}


def _guarded_class(cls: type, op: str) -> type:
    """A subclass of `cls` whose forward runs in FP32 and whose parameters/buffers stay FP32
    through later `.to(dtype)` / `.half()` calls (as transformers' `_keep_in_fp32_modules`)."""
    if cls in _GUARDED:
        return _GUARDED[cls]
    original_forward = cls.forward
    original_apply = cls._apply

    def forward(self, *args, **kwargs):
        return run_in_fp32(lambda *a, **k: original_forward(self, *a, **k), args, kwargs)

    def _apply(self, fn, *args, **kwargs):
        def keep_fp32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in HALF:
                return t.to(device=out.device)  # moved, never rounded
            return out

        return original_apply(self, keep_fp32, *args, **kwargs)

    guarded = type(f"FP32{cls.__name__}", (cls,), {
        "forward": forward, "_apply": _apply, _GUARD_FLAG: op, "_quantkit_original": cls,
        "__module__": cls.__module__, "__doc__": cls.__doc__})
    _GUARDED[cls] = guarded
    return guarded


def is_guarded(module: nn.Module) -> bool:
    """The module runs under an FP32 guard (it casts its own inputs and outputs)."""
    return getattr(type(module), _GUARD_FLAG, None) is not None


def _guard(module: nn.Module, op: str) -> None:
    if getattr(type(module), _GUARD_FLAG, None) is None:
        if op == "rope":
            _restore_fp32_buffers(module)
        module.__class__ = _guarded_class(type(module), op)
    _keep_fp32(module)


def _restore_fp32_buffers(module: nn.Module) -> None:
    """Rotary frequencies already rounded by `model.to(bf16)`: rebuild them in FP32 from the config.

    transformers' rotary classes are built from the config alone and derive inv_freq from it, so a
    fresh FP32 instance has the exact values. Protecting before the dtype cast makes this unnecessary."""
    half = {k: b for k, b in module.named_buffers() if b.dtype in HALF}
    config = getattr(module, "config", None)
    if not half or config is None:
        return
    try:
        with torch.device("cpu"):
            fresh = type(module)(config)
    except Exception:
        return  # not constructible from its config: the buffers are upcast as they are
    fresh_buffers = dict(fresh.named_buffers())
    for key, b in half.items():
        f = fresh_buffers.get(key)
        if f is not None and f.shape == b.shape and f.dtype == torch.float32:
            owner, _, leaf = key.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._buffers[leaf] = f.to(b.device)


def _source(cls: type) -> str:
    import inspect

    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _has_param_children(module: nn.Module) -> bool:
    return any(any(True for _ in child.parameters()) for child in module.children())


def _folded_batchnorms(model: nn.Module) -> set[int]:
    """BatchNorms registered right after a conv of matching width in the same parent (Conv -> BN, as in
    ResNet's conv1/bn1 and every Conv-BN-Act Sequential): TensorRT folds those into the conv, and a
    guard's casts between the two would stop it. Read from the module structure, not from a trace."""
    folded: set[int] = set()
    for parent in model.modules():
        previous = None
        for child in parent.children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and isinstance(previous, nn.modules.conv._ConvNd) \
                    and getattr(previous, "out_channels", None) == child.num_features:
                folded.add(id(child))
            previous = child
    return folded


def classify(module: nn.Module) -> str | None:
    """Which protectable op a module is, by type and by class name/structure (any library's RMSNorm)."""
    cls = attention.original_class(module)
    name = cls.__name__.lower()
    if isinstance(module, nn.RMSNorm) or "rmsnorm" in name:
        return "rmsnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if re.search(r"layer_?norm(2d|nd)?$", name):
        # T5LayerNorm and kin are RMS norms: no bias, no mean subtraction.
        src = _source(cls)
        rms = not hasattr(module, "bias") and ("pow(2)" in src or "rsqrt" in src or "square" in src)
        return "rmsnorm" if rms else "layernorm"
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) or name.endswith("groupnorm"):
        return "groupnorm"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.Softmax):
        return "softmax"
    if ("rotary" in name or "rope" in name) and "embedding" in name or (
            "rotary" in name and isinstance(getattr(module, "inv_freq", None), torch.Tensor)):
        return "rope"
    return None


_HOW = {
    "rmsnorm": "input upcast to FP32, variance, normalization and weight in FP32, output cast back",
    "layernorm": "input upcast to FP32, mean/variance, normalization and affine in FP32, output cast back",
    "groupnorm": "input upcast to FP32, per-group mean/variance, normalization and affine in FP32, output cast back",
    "batchnorm": "not directly after a conv (TensorRT folds only Conv -> BatchNorm): input upcast to FP32, "
                 "normalization and affine in FP32, output cast back",
    "rope": "frequencies (inv_freq kept FP32) and cos/sin computed in FP32, cast back to the activation dtype",
    "softmax": "softmax computed as Cast(FLOAT) -> Softmax -> Cast back",
    "custom": "declared in protect.modules: inputs upcast to FP32, parameters kept FP32, outputs cast back",
}


# ---------------------------------------------------------------------------------------------
# Function guards: a module-level function replaced by an FP32 wrapper


def fp32_function(fn: Callable) -> Callable:
    """`fn` with half-precision tensor arguments upcast to FP32 and floating outputs cast back."""
    if getattr(fn, _FN_FLAG, None) is not None:
        return fn

    def wrapper(*args, **kwargs):
        return run_in_fp32(fn, args, kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "fn")
    wrapper.__qualname__ = getattr(fn, "__qualname__", wrapper.__name__)
    wrapper.__module__ = getattr(fn, "__module__", None)
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    wrapper.__wrapped__ = fn
    setattr(wrapper, _FN_FLAG, fn)
    return wrapper


def _model_namespaces(model: nn.Module) -> list[types.ModuleType]:
    """The Python modules defining the classes of `model`'s submodules (where their forwards look names up)."""
    seen: dict[str, types.ModuleType] = {}
    for m in model.modules():
        for cls in type(m).__mro__:
            mod = sys.modules.get(cls.__module__)
            if mod is not None and not cls.__module__.startswith(("torch.", "builtins", "modelopt.")):
                seen.setdefault(cls.__module__, mod)
    return list(seen.values())


def _wrap_global(mod: types.ModuleType, attr: str, changes: Patches) -> bool:
    """Replace the module-level function `mod.attr` by its FP32 wrapper while `changes` (or another
    model's) holds it: a modeling file's globals are shared by every model of that family."""
    fn = getattr(mod, attr, None)
    if not callable(fn) or isinstance(fn, type):
        return False
    changes.set_attr(mod, attr, fp32_function(fn))
    return True


def import_installed(name: str) -> types.ModuleType:
    """importlib.import_module(name) without the current folder on the path: `python -m quantkit` puts
    it first, and a recipe must not make quantkit run a file that happens to lie there. Modules
    already imported (the model's own) and installed ones resolve as usual; PYTHONPATH is explicit
    and stays."""
    if name in sys.modules:
        return sys.modules[name]
    cwd = os.getcwd()
    explicit = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path
                   if not (p in ("", ".") or (os.path.abspath(p) == cwd and cwd not in explicit))]
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def _protect_function(spec: str, namespaces: list[types.ModuleType], changes: Patches) -> Protection:
    target, _, attr = spec.rpartition(":")
    try:
        mod = import_installed(target)
    except Exception as e:
        raise InputError(f"protect.functions: {spec!r}: cannot import {target!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"protect.functions: {spec!r}: {target} has no function {attr!r}")
    original = getattr(fn, _FN_FLAG, None) or fn
    _wrap_global(mod, attr, changes)
    # `from pkg.mod import fn` elsewhere bound the original under its own name: rebind those too.
    for ns in namespaces:
        for key, value in list(vars(ns).items()):
            if value is original:
                changes.set_attr(ns, key, getattr(mod, attr))
    return Protection(spec, "custom", "function", "declared in protect.functions: arguments upcast to FP32, "
                      "outputs cast back")


def _user_classes(names: list[str]) -> list[tuple[str, type | None]]:
    out = []
    for entry in names:
        if ":" in entry:
            target, _, attr = entry.rpartition(":")
            try:
                cls = getattr(import_installed(target), attr)
            except Exception as e:
                raise InputError(f"protect.modules: {entry!r}: cannot import: {type(e).__name__}: {e}") from None
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise InputError(f"protect.modules: {entry!r} is not an nn.Module class")
            out.append((entry, cls))
        else:
            out.append((entry, None))
    return out


def _is_user_module(module: nn.Module, user: list[tuple[str, type | None]]) -> bool:
    mro_names = {c.__name__ for c in type(module).__mro__}
    return any((cls is not None and isinstance(module, cls)) or (cls is None and name in mro_names)
               for name, cls in user)


# ---------------------------------------------------------------------------------------------
# Public API


def protect_model(model: nn.Module, spec: ProtectSpec) -> list[Protection]:
    """Apply the FP32 guards `spec` asks for, in place; returns what is protected.

    Recognized without configuration: nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.InstanceNorm*d,
    nn.BatchNorm*d not registered right after a conv (TensorRT folds those), nn.Softmax, any class whose name
    contains "RMSNorm" or ends with "LayerNorm" (RMS when it has no bias), rotary-embedding modules
    ("Rotary…Embedding" or with an inv_freq buffer), the `apply_rotary_pos_emb`-style functions of
    the model's modeling files, and attention softmax (see quantkit.attention). A recipe adds its own:

        protect:
          modules: [MyNorm, "my_pkg.layers:ScaleShift"]   # class name (base classes count) or pkg.mod:Class
          functions: ["my_pkg.ops:rope_apply"]             # module-level function, looked up at call time

    A declared module runs in FP32 as a whole (its Linear children too, still visible to ModelOpt).
    Idempotent: a second call changes nothing and returns the same list. Call after the model is
    cast to its run dtype (or before: its guards then keep full-precision FP32 weights) and before
    mtq.quantize / convert_attention; re-run it identically before mto.restore."""
    ops = set(spec.enabled_ops())
    changes = of_model(model)
    user = _user_classes(spec.modules)
    out: list[Protection] = []
    inside_custom: list[str] = []
    folded = _folded_batchnorms(model) if "batchnorm" in ops else set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside_custom):
            continue  # already computing in FP32 as a whole
        cls_name = attention.original_class(module).__name__
        if user and _is_user_module(module, user):
            _guard(module, "custom")
            out.append(Protection(name, "custom", cls_name, _HOW["custom"]))
            inside_custom.append(f"{name}." if name else "")
            continue
        op = classify(module)
        if op is None or op not in ops:
            continue
        if op != "softmax" and _has_param_children(module):
            continue  # an adaptive norm with its own Linear layers (AdaLayerNorm): not a leaf op
        if op == "batchnorm" and id(module) in folded:
            continue
        _guard(module, op)
        out.append(Protection(name, op, cls_name, _HOW[op]))

    namespaces = _model_namespaces(model)
    if "rope" in ops:
        for ns in namespaces:
            for attr, value in sorted(vars(ns).items()):
                if _ROPE_FUNCTION.match(attr) and callable(value) and not isinstance(value, type):
                    if _wrap_global(ns, attr, changes):
                        out.append(Protection(f"{ns.__name__}:{attr}", "rope", "function",
                                              "rotation applied in FP32 (q, k, cos, sin upcast), results cast back"))
    for fn_spec in spec.functions:
        out.append(_protect_function(fn_spec, namespaces, changes))

    if "softmax" in ops:
        for site in attention.attention_sites(model):
            if site.kind is None or any(site.name.startswith(p) for p in inside_custom):
                continue
            attention.route(site, changes, fp32_softmax=True)
            out.append(Protection(site.name, "softmax", site.module_class,
                                  f"{attention.describe_route(site)}; softmax computed as Cast(FLOAT) -> Softmax -> "
                                  "Cast back (FP32 inputs without quantizers keep the original kernel)"))
    return out
