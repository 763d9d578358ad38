"""The process-wide objects quantkit may change while a model is quantized, read without importing
quantkit (tests/test_api.py compares them before, during and after)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def process_state() -> dict[str, object]:
    """The shared objects quantkit may change while a model is quantized."""
    import transformers.models.bert.modeling_bert as bert
    import transformers.models.llama.modeling_llama as llama
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return {
        "torch.matmul": torch.matmul, "torch.bmm": torch.bmm, "Tensor.__matmul__": torch.Tensor.__matmul__,
        "F.softmax": F.softmax, "torch.softmax": torch.softmax, "Tensor.softmax": torch.Tensor.softmax,
        "F.scaled_dot_product_attention": F.scaled_dot_product_attention, "Module._apply": nn.Module._apply,
        "llama.apply_rotary_pos_emb": llama.apply_rotary_pos_emb, "llama.rotate_half": llama.rotate_half,
        "bert.__dict__": dict(vars(bert)),
        "AttentionInterface": dict(AttentionInterface._global_mapping),
        "AttentionMaskInterface": dict(AttentionMaskInterface._global_mapping),
        "QuantModuleRegistry": dict(QuantModuleRegistry._registry),
        "tensor_quant.dynamic_block_quantize_op": tensor_quant.dynamic_block_quantize_op,
    }
