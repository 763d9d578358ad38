"""transformers internals quantkit relies on: a config's attention implementation field (set per
config, so only the module that owns it changes), the class-wide attention and mask registries
(transformers offers `register` but no way to take an entry back), a model's `_no_split_modules`.
"""

from __future__ import annotations

from typing import Any, Callable

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
