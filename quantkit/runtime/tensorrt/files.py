"""The files of an export/build folder and the builder settings every build path shares.

File names (model.onnx, model.engine, engine.json, build_engine.sh, timing.cache), the default
workspace and optimization-level limits and their check, and the external data files of a graph.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import InputError

ONNX_NAME = "model.onnx"
ENGINE_NAME = "model.engine"
METADATA_NAME = "engine.json"
SCRIPT_NAME = "build_engine.sh"
TIMING_CACHE_NAME = "timing.cache"
EXPORT_JSON = "export.json"
RECIPE_YAML = "recipe.yaml"

DEFAULT_WORKSPACE_GIB = 4.0
MAX_OPT_LEVEL = 5  # trtexec --help: "integers from 0 to the maximum optimization level, which is currently 5"


def check_settings(workspace_gib: float, opt_level: int) -> None:
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= MAX_OPT_LEVEL:
        raise InputError(f"builder optimization level must be an integer 0..{MAX_OPT_LEVEL}, got {opt_level!r}")
    if not isinstance(workspace_gib, (int, float)) or isinstance(workspace_gib, bool) or not workspace_gib > 0:
        raise InputError(f"workspace must be a positive number of GiB, got {workspace_gib!r}")


def external_data_files(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)
