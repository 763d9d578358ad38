"""quantkit: a PyTorch model to a deployable low-precision artifact through one declarative recipe.

The path is recipe -> plan -> protect -> attention Q/DQ -> ModelOpt PTQ -> ONNX -> audit -> TensorRT,
each stage a function in its own module (docs/architecture.md). The Python API is `quantize`,
`load`, `plan` and `collect` (quantkit.api); importing quantkit changes nothing in torch,
transformers or ModelOpt.
"""

from quantkit.api import QuantizedModel, QuantizeReport, collect, load, plan, quantize
from quantkit.version import __version__

__all__ = ["QuantizedModel", "QuantizeReport", "__version__", "collect", "load", "plan", "quantize"]
