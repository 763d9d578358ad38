"""Quantized attention: Q·Kᵀ and P·V with ModelOpt TensorQuantizers on Q, K, V (and P), softmax in FP32.

Attention is routed through quantkit's own code path, chosen by what the module's forward calls:
transformers attention modules (the attention interface) run their family's `eager_attention_forward`
with torch.matmul and softmax intercepted; modules calling F.scaled_dot_product_attention (themselves,
or through the processor their forward delegates to, as diffusers' Attention) get explicit matmuls
instead; modules with a two-matmul eager attention get their matmuls intercepted;
torch.nn.MultiheadAttention runs quantkit.multihead's forward (projections exposed as Linears). The
arithmetic of one call lives in quantkit.attention_math; the quantizers (`q/k/v/p_bmm_quantizer`,
ModelOpt's names) are created by `mtq.quantize` itself.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from quantkit import eager_masks, multihead
from quantkit.attention_math import ATTENTION_KERNEL, ROLES, ROUTED_FLAG, SOFTMAX_FLAG, explicit_sdpa, fp32_softmax
from quantkit.attention_math import (MatmulRouter, any_active, bmm_quantizers, needs_explicit, tensor_fp32_softmax,
                                     torch_bmm, torch_sdpa)
from quantkit.compat import modelopt as modelopt_compat
from quantkit.compat import transformers as transformers_compat
from quantkit.patches import Patches, of_model
from quantkit.recipe import AttentionSpec, NamePattern, Precision

IMPLEMENTATION = "quantkit"  # the name registered in transformers' AttentionInterface
_ORIGINAL_ATTN = "_quantkit_original_attn"  # config attribute: implementation to fall back to
_CALLS = "_quantkit_calls"  # instance attribute: forwards run through a swapped-in class (0: never called)


@dataclass(frozen=True)
class AttentionConversion:
    name: str  # module name relative to the model root
    module_class: str
    converted: bool
    via: str  # "quantkit" | "modelopt"
    reason: str | None
    quantizers: dict[str, str]  # "q"/"k"/"v"/"p" -> quantizer module name as mtq.quantize will see it


@contextlib.contextmanager
def _patched(targets: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in targets]
    for obj, name, value in targets:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _softmax_targets() -> list[tuple[Any, str, Any]]:
    return [(torch.nn.functional, "softmax", fp32_softmax), (torch, "softmax", fp32_softmax),
            (torch.Tensor, "softmax", tensor_fp32_softmax)]


@contextlib.contextmanager
def attention_scope(module: nn.Module, *, force_softmax: bool | None = None) -> Iterator[None]:
    """Within it, an eager attention's torch.matmul/bmm/@ carry `module`'s quantizers and softmax runs in FP32."""
    targets = []
    if getattr(module, SOFTMAX_FLAG, False) if force_softmax is None else force_softmax:
        targets += _softmax_targets()
    quantizers = bmm_quantizers(module)
    router = MatmulRouter(module, quantizers) if any_active(quantizers) else None
    if router is not None:
        def tensor_matmul(self: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return router(self, other)

        targets += [(torch, "matmul", router), (torch, "bmm", functools.partial(router, op=torch_bmm)),
                    (torch.Tensor, "__matmul__", tensor_matmul)]
    with _patched(targets):
        yield
    if router is not None:
        router.check()


# ---------------------------------------------------------------------------------------------
# transformers: the `quantkit` attention implementation


def _family_eager(module: nn.Module) -> Callable | None:
    """The `eager_attention_forward` of the modeling file that defines the module's attention class."""
    for cls in type(module).__mro__:
        mod = sys.modules.get(cls.__module__)
        fn = getattr(mod, "eager_attention_forward", None) if mod is not None else None
        if callable(fn):
            return fn
    return None


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


def quantkit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
    """transformers attention function: the family's eager attention, quantized, softmax in FP32.

    With no quantizer on and nothing to upcast it calls the implementation the model had before
    (sdpa or eager), so that protection alone leaves FP32 outputs bit-identical."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = getattr(module, "config", None)
    original = getattr(config, _ORIGINAL_ATTN, "sdpa")
    eager = _family_eager(module)
    if eager is None:
        raise RuntimeError(f"quantkit attention: no eager_attention_forward next to {type(module).__name__}")
    attention_mask = eager_masks.as_eager(attention_mask, module, query, key, kwargs.get("is_causal"))
    if not needs_explicit(module, query):
        fn = eager if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)
    # The sdpa mask is skipped for plain causal attention (the kernel's is_causal does it); eager needs it.
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    kernel = getattr(module, ATTENTION_KERNEL, None)
    if kernel is not None and not args:
        # a runtime's quantized attention kernel (quantkit.runtime.fp8_attention), where it applies
        causal = attention_mask is None and original == "sdpa" and query.shape[2] > 1 and is_causal
        out = kernel(module, query, key, value, attention_mask, causal, kwargs)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    if attention_mask is None and original == "sdpa" and query.shape[2] > 1:
        if is_causal:
            attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                                        device=query.device).tril()[None, None]
    if attention_mask is not None:
        attention_mask = _additive_mask(attention_mask, query.dtype)
    with attention_scope(module):
        return eager(module, query, key, value, attention_mask, *args, **kwargs)


def _quantkit_mask(*args: Any, **kwargs: Any):
    """Mask function of the `quantkit` implementation: the one of the implementation it replaced."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    original = getattr(kwargs.get("config"), _ORIGINAL_ATTN, "sdpa")
    # Traced, the mask is materialized where eager leaves it out: tagged so that attention does as eager.
    return eager_masks.mark(ALL_MASK_ATTENTION_FUNCTIONS[original](*args, **kwargs), original, **kwargs)


def register_transformers_implementation(changes: Patches) -> None:
    """Register `quantkit` in transformers' attention and mask interfaces while `changes` (or any
    other model's) holds it; taken back when the last of them is released."""
    changes.hold(("transformers-attention", IMPLEMENTATION), lambda: transformers_compat.register_attention(
        IMPLEMENTATION, quantkit_attention_forward, _quantkit_mask))


# ---------------------------------------------------------------------------------------------
# Finding attention in a model


@dataclass
class AttentionSite:
    name: str
    module: nn.Module
    kind: str | None  # "interface" | "sdpa" | "eager"; None: an attention quantkit cannot route
    reason: str | None = None

    @property
    def module_class(self) -> str:
        return original_class(self.module).__name__


def original_class(module: nn.Module) -> type:
    cls = type(module)
    while getattr(cls, "_quantkit_original", None) is not None and cls._quantkit_original is not cls:
        cls = cls._quantkit_original
    return cls


def _source_tree(fn: Callable) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None


@functools.lru_cache(maxsize=None)
def _matmul_pattern(fn: Callable) -> tuple[int, int]:
    """(matmul-like ops, softmax calls) written directly in `fn`."""
    tree = _source_tree(fn)
    if tree is None:
        return -1, -1
    mm = sm = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("matmul", "bmm"):
                mm += 1
            elif name in ("baddbmm", "einsum", "mm"):
                mm += 100  # forms quantkit does not intercept
            elif name == "softmax":
                sm += 1
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            mm += 1
    return mm, sm


@functools.lru_cache(maxsize=None)
def _eager_ok(fn: Callable) -> str | None:
    mm, sm = _matmul_pattern(fn)
    if mm == 2 and sm >= 1:
        return None
    where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    if mm < 0:
        return f"the source of {where} is not available"
    return f"{where} does not compute attention as two matmuls around a softmax"


def _calls_sdpa(fn: Callable, names: set[str]) -> bool:
    """`fn` calls F.scaled_dot_product_attention (by that name, or a global bound to it)."""
    glb = getattr(fn, "__globals__", {})
    return "scaled_dot_product_attention" in names or any(glb.get(n) is torch_sdpa for n in names)


def _processor_call(module: nn.Module) -> Callable | None:
    """The attention processor's __call__ when the module's forward delegates to `self.processor(...)`
    (diffusers' Attention: AttnProcessor2_0 calls F.scaled_dot_product_attention), else None."""
    processor = getattr(module, "processor", None)
    if processor is None or not callable(processor):
        return None
    forward = inspect.unwrap(original_class(module).forward)
    code = getattr(forward, "__code__", None)
    if code is None or "processor" not in code.co_names:
        return None
    call = getattr(type(processor), "__call__", None)
    return inspect.unwrap(call) if call is not None else None


def _processor_calls_sdpa(module: nn.Module) -> bool:
    call = _processor_call(module)
    code = getattr(call, "__code__", None)
    return code is not None and _calls_sdpa(call, set(code.co_names))


def _classify(module: nn.Module) -> tuple[str | None, str | None]:
    cls = original_class(module)
    routed = getattr(type(module), ROUTED_FLAG, None)
    if routed:
        return routed, None
    forward = inspect.unwrap(cls.forward)
    code = getattr(forward, "__code__", None)
    names = set(code.co_names) if code is not None else set()
    if "ALL_ATTENTION_FUNCTIONS" in names:
        config = getattr(module, "config", None)
        if not transformers_compat.has_attn_implementation(config):
            return None, f"{cls.__name__} uses the transformers attention interface but has no config to switch"
        eager = _family_eager(module)
        if eager is None:
            return None, f"{cls.__module__} has no eager_attention_forward to run quantized"
        reason = _eager_ok(eager)
        return ("interface", None) if reason is None else (None, reason)
    if _calls_sdpa(forward, names) or _processor_calls_sdpa(module):
        return "sdpa", None
    if isinstance(module, nn.MultiheadAttention):
        return None, "torch.nn.MultiheadAttention whose projections were not exposed (quantkit.multihead)"
    if not cls.__module__.startswith("torch.") and "softmax" in names:
        mm, sm = _matmul_pattern(forward)
        if mm == 2 and sm >= 1:
            return "eager", None
    if cls.__name__.endswith("Attention"):
        return None, ("its forward neither calls the transformers attention interface or "
                      "F.scaled_dot_product_attention nor computes two matmuls around a softmax")
    return None, None


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention in `model`: those quantkit can route (kind set) and attention-named modules it cannot."""
    found: list[AttentionSite] = []
    for name, module in model.named_modules():
        kind, reason = _classify(module)
        if kind is not None or reason is not None:
            found.append(AttentionSite(name, module, kind, reason))
    def wraps_other(site: AttentionSite) -> bool:
        prefix = f"{site.name}." if site.name else ""
        return any(o is not site and o.name.startswith(prefix) for o in found)

    # An unroutable module that merely wraps another attention (BertAttention around BertSelfAttention) is no site.
    return [s for s in found if s.kind is not None or not wraps_other(s)]


# ---------------------------------------------------------------------------------------------
# Routing attention through quantkit


_ROUTED_CLASSES: dict[tuple[type, str], type] = {}


def _routed_class(cls: type, kind: str) -> type:
    key = (cls, kind)
    if key in _ROUTED_CLASSES:
        return _ROUTED_CLASSES[key]
    original_forward = cls.forward
    if kind == "sdpa":
        def forward(self, *args, **kwargs):
            setattr(self, _CALLS, getattr(self, _CALLS, 0) + 1)
            bound = functools.partial(explicit_sdpa, self)
            targets = [(torch.nn.functional, "scaled_dot_product_attention", bound)]
            spaces = [getattr(inspect.unwrap(original_forward), "__globals__", {}),
                      getattr(sys.modules.get(cls.__module__), "__dict__", {})]
            # A forward that delegates to self.processor(...) (diffusers): the processor's module too,
            # looked up per call since set_processor may change it.
            call = _processor_call(self)
            if call is not None:
                spaces.append(getattr(call, "__globals__", {}))
            for space in {id(sp): sp for sp in spaces}.values():
                targets += [(_DictSlot(space), n, bound) for n, v in list(space.items()) if v is torch_sdpa]
            with _patched(targets):
                return original_forward(self, *args, **kwargs)
    else:
        def forward(self, *args, **kwargs):
            setattr(self, _CALLS, getattr(self, _CALLS, 0) + 1)
            with attention_scope(self):
                return original_forward(self, *args, **kwargs)
    routed = type(cls.__name__, (cls,), {"forward": forward, ROUTED_FLAG: kind, "_quantkit_original": cls,
                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    _ROUTED_CLASSES[key] = routed
    return routed


class _DictSlot:
    """setattr/getattr onto a namespace dict (a module's globals), for `_patched`."""

    def __init__(self, space: dict[str, Any]):
        object.__setattr__(self, "_space", space)

    def __getattr__(self, name: str) -> Any:
        return self._space[name]

    def __setattr__(self, name: str, value: Any) -> None:
        self._space[name] = value


def route(site: AttentionSite, changes: Patches, fp32_softmax: bool | None = None) -> None:
    """Send `site` through quantkit's attention. fp32_softmax=None leaves the softmax setting as it is.

    What it changes outside the module (transformers' registry, the module's config) is recorded in
    `changes` and undone with them; the class swap is the module's own."""
    module = site.module
    if site.kind == "interface":
        register_transformers_implementation(changes)
        config = module.config
        current = transformers_compat.attn_implementation(config)
        if current != IMPLEMENTATION:
            object.__setattr__(config, _ORIGINAL_ATTN, current if current in ("eager", "sdpa") else "sdpa")
            # this config only, not its sub-configs
            transformers_compat.set_attn_implementation(config, {"": IMPLEMENTATION})

            def undo(config=config, current=current) -> None:
                if transformers_compat.attn_implementation(config) == IMPLEMENTATION:
                    transformers_compat.set_attn_implementation(config, {"": current})
                config.__dict__.pop(_ORIGINAL_ATTN, None)
            changes.local(undo)
    elif site.kind == multihead.ROUTED_KIND:
        if not multihead.is_exposed(module):
            raise ValueError(f"{site.name}: MultiheadAttention must be exposed (multihead.expose) before routing")
    elif site.kind in ("sdpa", "eager"):
        if not getattr(type(module), ROUTED_FLAG, None):
            module.__class__ = _routed_class(type(module), site.kind)
    else:
        raise ValueError(f"{site.name}: cannot route: {site.reason}")
    if fp32_softmax is not None:
        setattr(module, SOFTMAX_FLAG, bool(fp32_softmax))
    elif not hasattr(module, SOFTMAX_FLAG):
        setattr(module, SOFTMAX_FLAG, False)


def describe_route(site: AttentionSite) -> str:
    if site.kind == "interface":
        return (f"transformers attention implementation '{IMPLEMENTATION}': the family's eager_attention_forward "
                "with explicit Q·Kᵀ and P·V")
    if site.kind == "sdpa":
        return "F.scaled_dot_product_attention replaced by explicit Q·Kᵀ, softmax, P·V"
    if site.kind == multihead.ROUTED_KIND:
        return "nn.MultiheadAttention: q/k/v/out projections as Linear layers, explicit Q·Kᵀ, softmax, P·V"
    return "its two matmuls and softmax intercepted"


# ---------------------------------------------------------------------------------------------
# ModelOpt: quantizers created by mtq.quantize


_QUANTIZER_CLASS: type | None = None


def _quantizer_class() -> type:
    """The ModelOpt QuantModule that gives an attention module its four bmm quantizers.

    Registering it in QuantModuleRegistry (instead of attaching TensorQuantizers ourselves) matters:
    mtq.quantize skips replacing Linear layers when the model already holds any TensorQuantizer."""
    global _QUANTIZER_CLASS
    if _QUANTIZER_CLASS is None:
        from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer

        class QuantkitAttentionQuantizers(QuantModule):
            def _setup(self):
                for role in ROLES:
                    setattr(self, f"{role}_bmm_quantizer", TensorQuantizer())

        _QUANTIZER_CLASS = QuantkitAttentionQuantizers
    return _QUANTIZER_CLASS


def register_quantizers(cls: type, changes: Patches) -> None:
    """Make mtq.quantize (and mto.restore) give instances of `cls` quantkit's bmm quantizers while
    `changes` (or another model's of the same class) holds the registration; what it displaced in
    QuantModuleRegistry is registered again when the last of them is released."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    def apply() -> Callable[[], None]:
        dm = _quantizer_class()
        displaced: list[tuple[type, type, str]] = []  # (nn class, QuantModule, key) taken off
        current = modelopt_compat.registered_exactly(QuantModuleRegistry, cls)
        ours = current is not None and current[0] is dm
        if current is not None and not ours:  # e.g. ModelOpt's own _QuantAttention from an earlier mtq.quantize
            displaced.append((cls, *current))
            QuantModuleRegistry.unregister(cls)
        if not ours:
            QuantModuleRegistry.register({cls: f"quantkit.{cls.__module__}.{cls.__qualname__}"})(dm)
        # A registered base class with the same forward would win the lookup; take it off for this class.
        for _ in range(4):
            hit = modelopt_compat.registered_base(QuantModuleRegistry, cls)
            if hit is cls or hit is None:
                break
            displaced.append((hit, *modelopt_compat.registered_exactly(QuantModuleRegistry, hit)))
            QuantModuleRegistry.unregister(hit)

        def undo() -> None:
            if not ours and modelopt_compat.registered_exactly(QuantModuleRegistry, cls) is not None:
                QuantModuleRegistry.unregister(cls)
            for nn_cls, qm, key in reversed(displaced):
                if modelopt_compat.registered_exactly(QuantModuleRegistry, nn_cls) is None:
                    QuantModuleRegistry.register({nn_cls: key})(qm)
        return undo

    changes.hold(("modelopt-quant-module", cls), apply)


# ---------------------------------------------------------------------------------------------
# Public API


_CONVERTED_FLAG = "_quantkit_attention_quantized"
_CONVERTED_CLASSES: dict[type, type] = {}


def _mark_converted(module: nn.Module) -> None:
    """Give a converted attention its own subclass, the class its bmm quantizers are registered for.

    ModelOpt's QuantModuleRegistry is keyed by class: registering the module's own class (a
    transformers attention, the exposed nn.MultiheadAttention) gave every other instance of it the
    quantizers too, also those of another model in the process whose recipe converts no attention
    (PaliGemma fp16 after fp8: its saved state then held bmm quantizers a fresh load does not make)."""
    cls = type(module)
    if getattr(cls, _CONVERTED_FLAG, False):
        return
    if cls not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[cls] = type(cls.__name__, (cls,), {
            _CONVERTED_FLAG: True, "_quantkit_original": cls, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    module.__class__ = _CONVERTED_CLASSES[cls]


def _quantizer_names(name: str) -> dict[str, str]:
    prefix = f"{name}." if name else ""
    return {r: f"{prefix}{r}_bmm_quantizer" for r in ROLES}


def convert_attention(model: nn.Module, spec: AttentionSpec) -> list[AttentionConversion]:
    """Route the attentions `spec.match` selects through quantkit and register their bmm quantizers.

    Call before mtq.quantize (and again, identically, before mto.restore). The quantizers are created
    by mtq.quantize; their names are in each conversion's `quantizers` ("p" only with
    quantize_softmax_output). precision skip: nothing is converted and [] is returned."""
    if spec.precision == Precision.SKIP:
        return []
    patterns = [NamePattern(p) for p in spec.match]
    changes = of_model(model)
    out = []
    for site in attention_sites(model):
        if not any(p.matches(site.name) for p in patterns):
            continue
        if site.kind is None:
            out.append(AttentionConversion(site.name, site.module_class, False, "quantkit", site.reason, {}))
            continue
        route(site, changes)
        _mark_converted(site.module)
        register_quantizers(type(site.module), changes)
        names = _quantizer_names(site.name)
        roles = ROLES if spec.quantize_softmax_output else ROLES[:3]
        out.append(AttentionConversion(site.name, site.module_class, True, "quantkit", None,
                                       {r: names[r] for r in roles}))
    return out


def verify_attention(model: nn.Module, conversions: list[AttentionConversion]) -> list[str]:
    """After mtq.quantize: one message per converted attention whose quantizers are missing, off or uncalibrated."""
    modules = dict(model.named_modules())
    problems = []
    for c in conversions:
        if not c.converted:
            continue
        module = modules.get(c.name)
        if module is None:
            problems.append(f"{c.name}: attention module not found in the model")
            continue
        config = getattr(module, "config", None)
        kind = getattr(type(module), ROUTED_FLAG, None)
        if kind is None and transformers_compat.attn_implementation(config) != IMPLEMENTATION:
            problems.append(f"{c.name}: attention no longer runs through quantkit (implementation "
                            f"{transformers_compat.attn_implementation(config)!r}); its matmuls bypass the quantizers")
        if kind in ("sdpa", "eager") and not getattr(module, _CALLS, 0):
            continue  # the model never called it (a VAE decoder's unused encoder): nothing to calibrate
        for role, qname in c.quantizers.items():
            q = modules.get(qname)
            if q is None:
                problems.append(f"{qname}: {role} quantizer missing (convert_attention must run before mtq.quantize)")
            elif not getattr(q, "is_enabled", False):
                problems.append(f"{qname}: {role} quantizer is disabled (no quant_cfg entry enabled it)")
            elif getattr(q, "amax", None) is None:
                problems.append(f"{qname}: {role} quantizer was not calibrated (amax is None): the attention "
                                "did not run through quantkit during calibration")
    return problems
