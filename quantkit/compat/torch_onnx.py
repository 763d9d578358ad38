"""torch.onnx internals quantkit relies on: the TorchScript exporter's symbolic helpers, which
torch 2.9 moved under `torch.onnx._internal.torchscript_exporter`."""

from __future__ import annotations

import types
from typing import Any

from quantkit.compat import CompatError, installed, require


def torchscript_helpers() -> tuple[Any, Any, Any]:
    """(_type_utils, symbolic_helper, _causal_attention_mask) of the TorchScript exporter."""
    try:  # torch >= 2.9
        from torch.onnx._internal.torchscript_exporter import _type_utils, symbolic_helper
        from torch.onnx._internal.torchscript_exporter.symbolic_opset14 import _causal_attention_mask
    except ImportError:
        try:  # torch 2.8
            from torch.onnx import _type_utils, symbolic_helper
            from torch.onnx.symbolic_opset14 import _causal_attention_mask
        except ImportError:
            raise CompatError(f"torch {installed('torch')}: the TorchScript ONNX exporter's _type_utils, "
                              "symbolic_helper and symbolic_opset14._causal_attention_mask are missing; quantkit "
                              "supports torch >=2.8") from None
    return _type_utils, symbolic_helper, _causal_attention_mask


def symbolic_helpers() -> types.SimpleNamespace:
    """What a TorchScript symbolic needs, under public names: parse_args, is_none, maybe_get_const,
    tensor_rank, JitScalarType and causal_attention_mask (each checked to exist)."""
    type_utils, sym, causal = torchscript_helpers()

    def req(obj: Any, name: str) -> Any:
        return require(obj, name, "torch", "torch.onnx symbolic_helper")

    return types.SimpleNamespace(
        parse_args=req(sym, "parse_args"), is_none=req(sym, "_is_none"), maybe_get_const=req(sym, "_maybe_get_const"),
        tensor_rank=req(sym, "_get_tensor_rank"), JitScalarType=req(type_utils, "JitScalarType"),
        causal_attention_mask=causal)


def initializer_dedup_pass() -> tuple[Any, str]:
    """(the namespace the TorchScript exporter calls `_jit_pass_onnx_deduplicate_initializers` on, that name).

    The exporter calls it as `_C._jit_pass_onnx_deduplicate_initializers(graph, params, is_train)`: in eval
    mode it merges initializers of equal value, in training mode only those sharing storage."""
    try:  # torch >= 2.9
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:
        from torch.onnx import utils
    name = "_jit_pass_onnx_deduplicate_initializers"
    c = require(utils, "_C", "torch", "torch.onnx utils")
    require(c, name, "torch", "torch._C")
    return c, name
