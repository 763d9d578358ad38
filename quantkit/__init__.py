"""quantkit: a PyTorch model to a deployable low-precision artifact through one declarative recipe.

The path is recipe -> plan -> protect -> attention Q/DQ -> ModelOpt PTQ -> ONNX -> audit -> TensorRT,
each stage a function in its own module (docs/architecture.md). The Python API is `quantize`,
`load`, `plan`, `audit` and `collect` (quantkit.api); importing quantkit changes nothing in torch,
transformers or ModelOpt.
"""

import sys
import types

from quantkit.version import __version__

__all__ = ["QuantizedModel", "QuantizeReport", "__version__", "audit", "collect", "load", "plan", "quantize"]


def __getattr__(name: str):
    # The API is imported on first use: `import quantkit` (every CLI run, every spawned rank) stays
    # as cheap as the package's own __init__.
    if name in __all__:
        from quantkit import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`quantkit.plan` and `quantkit.collect` are API functions, and also the names of the stage
    modules quantkit/plan.py and quantkit/collect.py. Importing a submodule sets it as an attribute
    of its package, which would replace the function; the functions stay (the modules are in
    sys.modules, where `from quantkit.plan import Plan` finds them)."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("plan", "collect") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
