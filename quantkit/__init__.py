"""quantkit: a PyTorch model to a deployable low-precision artifact through one declarative recipe.

The path is recipe -> plan -> protect -> attention Q/DQ -> ModelOpt PTQ -> ONNX -> audit -> TensorRT,
each stage a function in its own module (see DESIGN.md).
"""

__version__ = "0.1.0"
