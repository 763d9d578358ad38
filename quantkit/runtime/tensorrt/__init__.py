"""TensorRT: the strongly typed engine build, engine.json, build_engine.sh and a runner.

`backend` is the only module that imports TensorRT or TensorRT-RTX; `profiles` holds build shapes,
`targets` TensorRT-RTX's compute-capability targets, `network` one parse + build, `build` the
engine it writes, `engine_json` the metadata and its guard, `script` the equivalent trtexec
command, `runner` the engine runner. The names below are the API.
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
from quantkit.runtime.tensorrt.network import CompileResult, compile_network
from quantkit.runtime.tensorrt.profiles import (
    PROFILES_SYNTAX,
    SHAPE_SYNTAX,
    ShapeProfile,
    as_profile_sets,
    check_profiles_against_inputs,
    parse_profile_specs,
    parse_shape_spec,
    parse_shape_specs,
    profile_fits,
    profile_sets,
)
from quantkit.runtime.tensorrt.runner import TensorRTRunner, load_runner_or_fallback
from quantkit.runtime.tensorrt.script import write_build_script
from quantkit.runtime.tensorrt.targets import RTX_COMPUTE_CAPABILITIES, TARGET_SYNTAX, CompileTarget, parse_target, targets_for

__all__ = [
    "CompileResult", "CompileTarget", "PROFILES_SYNTAX", "RTX_COMPUTE_CAPABILITIES", "TARGET_SYNTAX", "as_profile_sets",
    "compile_network", "parse_profile_specs", "parse_target", "profile_fits", "profile_sets", "targets_for",
    "BuildResult", "DEFAULT_WORKSPACE_GIB", "ENGINE_NAME", "EngineMetadata", "MAX_OPT_LEVEL", "METADATA_NAME",
    "METADATA_SCHEMA", "ONNX_NAME", "SCRIPT_NAME", "SHAPE_SYNTAX", "ShapeProfile", "TIMING_CACHE_NAME",
    "TensorRTRunner", "build_engine", "build_from_output_dir", "check_engine_compatible",
    "check_profiles_against_inputs", "load_runner_or_fallback", "parse_shape_spec", "parse_shape_specs",
    "write_build_script",
]
