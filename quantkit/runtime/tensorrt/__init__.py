"""TensorRT: the strongly typed engine build, engine.json, build_engine.sh and a runner.

`backend` is the only module that imports the TensorRT library; `profiles` holds build shapes,
`build` the network build and the engine it writes, `engine_json` the metadata and its guard,
`script` the equivalent trtexec command, `runner` the engine runner. The names below are the API.
"""

from quantkit.runtime.tensorrt.build import BuildResult, build_engine, build_from_output_dir
from quantkit.runtime.tensorrt.engine_json import METADATA_SCHEMA, EngineMetadata, check_engine_compatible
from quantkit.runtime.tensorrt.files import (
    DEFAULT_WORKSPACE_GIB,
    ENGINE_NAME,
    MAX_OPT_LEVEL,
    METADATA_NAME,
    ONNX_NAME,
    SCRIPT_NAME,
    TIMING_CACHE_NAME,
)
from quantkit.runtime.tensorrt.profiles import (
    SHAPE_SYNTAX,
    ShapeProfile,
    check_profiles_against_inputs,
    parse_shape_spec,
    parse_shape_specs,
)
from quantkit.runtime.tensorrt.runner import TensorRTRunner, load_runner_or_fallback
from quantkit.runtime.tensorrt.script import write_build_script

__all__ = [
    "BuildResult", "DEFAULT_WORKSPACE_GIB", "ENGINE_NAME", "EngineMetadata", "MAX_OPT_LEVEL", "METADATA_NAME",
    "METADATA_SCHEMA", "ONNX_NAME", "SCRIPT_NAME", "SHAPE_SYNTAX", "ShapeProfile", "TIMING_CACHE_NAME",
    "TensorRTRunner", "build_engine", "build_from_output_dir", "check_engine_compatible",
    "check_profiles_against_inputs", "load_runner_or_fallback", "parse_shape_spec", "parse_shape_specs",
    "write_build_script",
]
