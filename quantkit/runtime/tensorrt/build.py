"""The strongly typed engine build: parse the ONNX file into a network, add the optimization
profile, build, and write the engine, engine.json and the timing cache atomically.

`build_from_output_dir(OUT)` always writes build_engine.sh first and raises TensorRTUnavailable,
naming that script, where TensorRT cannot be used here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from quantkit.digest import sha256_of_file
from quantkit.errors import ExportError, InputError, QuantkitError, TensorRTUnavailable
from quantkit.outdir import atomic_write_bytes
from quantkit.runtime.tensorrt import backend
from quantkit.runtime.tensorrt.engine_json import METADATA_NAME, EngineMetadata
from quantkit.runtime.tensorrt.files import (
    DEFAULT_WORKSPACE_GIB,
    ENGINE_NAME,
    EXPORT_JSON,
    ONNX_NAME,
    RECIPE_YAML,
    SCRIPT_NAME,
    TIMING_CACHE_NAME,
    check_settings,
    external_data_files,
)
from quantkit.runtime.tensorrt.network import CompileResult, compile_network
from quantkit.runtime.tensorrt.profiles import (
    ShapeProfile,
    as_profile_sets,
    check_profiles_against_inputs,
    graph_input_shapes,
)
from quantkit.runtime.tensorrt.targets import TARGET_SYNTAX, CompileTarget
from quantkit.runtime.tensorrt.script import write_build_script
from quantkit.trt_requirements import Version, format_version, min_tensorrt_version, parse_version, version_at_least

log = logging.getLogger("quantkit.runtime.tensorrt")

# ONNX ops whose output shape depends on data: a CUDA graph cannot be captured around them
# (Torch-TensorRT's CUDA-graph notes: "Not compatible with models that have data-dependent shapes").
_DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}


@dataclass(frozen=True)
class BuildResult:
    """An engine written to disk: its paths, engine.json's content, and what the compile said."""

    engine_path: Path
    metadata_path: Path
    metadata: EngineMetadata
    timing_cache_path: Path | None
    script_path: Path | None = None
    compile: CompileResult | None = None

    @property
    def build_time_s(self) -> float:
        return self.metadata.build_time_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": str(self.engine_path), "engine_json": str(self.metadata_path),
            "script": str(self.script_path) if self.script_path else None,
            "metadata": self.metadata.to_dict(), "compile": self.compile.to_dict() if self.compile else None,
        }


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    profiles: Sequence[ShapeProfile] | Sequence[Sequence[ShapeProfile]],
    *,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
    cuda_graph_friendly: bool = False,
    recipe_name: str | None,
    recipe_sha256: str | None,
    min_version: Version | None = None,
    backend_name: str | None = None,
    targets: Sequence[CompileTarget] = (),
) -> BuildResult:
    """Build a strongly-typed engine from an ONNX file and write it, and engine.json, atomically.

    Datacenter TensorRT (where `tensorrt` imports) builds for the GPU here; else TensorRT-RTX
    compiles ahead of time for `targets` (no GPU needed; one engine for all of them). `profiles` is one list of input shapes,
    or one list per optimization profile (all in one engine); every input with a dynamic
    dimension must be in each. The timing cache (default: timing.cache beside the engine, TensorRT
    only) is loaded when present and saved after the build. Refuses before building when the
    installed TensorRT is older than the graph needs. A graph the parser or builder refuses raises
    ExportError / QuantkitError naming node or layer.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_settings(workspace_gib, opt_level)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found")
    sets = as_profile_sets(profiles)
    timing_cache = Path(timing_cache) if timing_cache else engine_path.parent / TIMING_CACHE_NAME
    needed, reasons = min_tensorrt_version(onnx_path)
    if min_version and tuple(min_version) > needed:
        needed = tuple(min_version)

    be = backend.load_backend(backend_name)
    if be.ahead_of_time:
        targets = list(targets)
        if not targets:
            raise InputError(f"{onnx_path.name}: TensorRT-RTX compiles for named targets and none was given: "
                             f"give --target {TARGET_SYNTAX} (or set the recipe's targets)")
        gpu_name, capability = "", targets[0].compute_capability
    else:
        # TensorRT-RTX versions (1.x) are not on datacenter TensorRT's scale: the floor is TensorRT's.
        if not version_at_least(parse_version(be.version), needed):
            raise TensorRTUnavailable(
                f"{onnx_path.name} needs TensorRT >= {format_version(needed)} ({'; '.join(reasons[1:]) or reasons[0]}); "
                f"this machine has TensorRT {be.version}. No engine was built"
            )
        gpu_name, capability = backend.gpu_identity()
        targets = []
    if cuda_graph_friendly:
        _warn_data_dependent_ops(onnx_path)

    result = compile_network(onnx_path, sets, be, targets=targets, workspace_gib=workspace_gib, opt_level=opt_level,
                             timing_cache=lambda config: _attach_timing_cache(config, timing_cache))
    if not result.parsed:
        raise ExportError(f"{onnx_path}: {'TensorRT-RTX' if be.ahead_of_time else 'TensorRT'}'s ONNX parser "
                          f"refused the graph: " + " | ".join(result.parser_errors))
    if not result.built:
        raise QuantkitError(f"{be.label} could not build an engine from {onnx_path}"
                            + (f" for {', '.join(t.sm for t in targets)}" if targets else "") + f": {result.build_error}")

    metadata_path = engine_path.parent / METADATA_NAME
    # An engine.json left from an earlier engine must never describe this one.
    metadata_path.unlink(missing_ok=True)
    atomic_write_bytes(engine_path, result.engine)
    cache_path = None
    if result.timing_cache is not None:
        atomic_write_bytes(timing_cache, memoryview(result.timing_cache.serialize()))
        cache_path = timing_cache

    from quantkit.version import __version__ as quantkit_version

    meta = EngineMetadata(
        engine_file=engine_path.name,
        engine_sha256=hashlib.sha256(result.engine).hexdigest(),
        engine_bytes=result.engine_bytes,
        gpu_name=gpu_name,
        compute_capability=capability,
        tensorrt_version=be.version,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_of_file(onnx_path),
        onnx_external_data_sha256={
            name: sha256_of_file(onnx_path.parent / name) for name in external_data_files(onnx_path)
        },
        recipe_name=recipe_name,
        recipe_sha256=recipe_sha256,
        profiles=sets,
        builder={
            "strongly_typed": True,
            "builder_optimization_level": opt_level,
            "workspace_gib": workspace_gib,
            "timing_cache": cache_path.name if cache_path else None,
            "cuda_graph_friendly": cuda_graph_friendly,
        },
        build_time_s=round(result.build_seconds, 3),
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        quantkit_version=quantkit_version,
        min_tensorrt_version=format_version(needed),
        min_tensorrt_reasons=list(reasons),
        backend=be.name,
        targets=targets,
        note=" ".join(t.note for t in targets if t.stand_in),
    )
    meta.save(metadata_path)
    log.info("built %s in %.1f s", engine_path, result.build_seconds)
    return BuildResult(engine_path, metadata_path, meta, cache_path, compile=result)


def _attach_timing_cache(config, path: Path):
    data = b""
    if path.is_file():
        data = path.read_bytes()
        log.info("reusing timing cache %s (%d bytes)", path, len(data))
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        # A cache from another GPU or TensorRT does not fit; start a fresh one and overwrite it.
        warnings.warn(f"{path}: timing cache does not fit this GPU/TensorRT; starting a new one", RuntimeWarning)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _warn_data_dependent_ops(onnx_path: Path) -> None:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = sorted({n.op_type for n in model.graph.node if n.op_type in _DATA_DEPENDENT_OPS})
    if found:
        msg = (f"{onnx_path.name}: {', '.join(found)} give data-dependent shapes; a CUDA graph cannot be "
               f"captured around them, so TensorRTRunner(use_cuda_graph=True) will run without one")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)


def _recipe_identity(out_dir: Path, export_info: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(name, sha256) of OUT/recipe.yaml, read as bytes; only its top-level `name:` is looked at."""
    path = out_dir / RECIPE_YAML
    name = export_info.get("recipe_name") or export_info.get("recipe")
    if not path.is_file():
        return (str(name) if isinstance(name, str) else None), None
    data = path.read_bytes()
    try:
        import yaml

        doc = yaml.safe_load(data)
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            name = doc["name"]
    except Exception:  # the recipe's validity is not this module's business; the hash still holds
        pass
    return (str(name) if isinstance(name, str) else None), hashlib.sha256(data).hexdigest()


def _read_export_json(out_dir: Path) -> dict[str, Any]:
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def build_from_output_dir(
    out_dir: str | os.PathLike,
    shapes: Sequence[ShapeProfile] | Sequence[Sequence[ShapeProfile]] | None = None,
    *,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    cuda_graph_friendly: bool = False,
    targets: Sequence[CompileTarget] = (),
    recipe_name: str | None = None,
    recipe_sha256: str | None = None,
    backend_name: str | None = None,
) -> BuildResult:
    """Build OUT/model.engine from OUT/model.onnx; always write OUT/build_engine.sh first.

    Inputs and their dynamic dimensions are read from the ONNX graph (the contract); `shapes` gives
    the build profiles (from --shape or the recipe): one list of input shapes, or one per
    optimization profile. Datacenter TensorRT builds for this GPU; without it TensorRT-RTX
    compiles for `targets`. Where neither can be used here, raises TensorRTUnavailable naming the
    script to run on the target; no engine is written then. The recipe's name and hash default to
    OUT/recipe.yaml's (its bytes are `Recipe.to_yaml()`, so the hash is `Recipe.sha256()`).
    """
    import onnx

    out_dir = Path(out_dir)
    onnx_path = out_dir / ONNX_NAME
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found; run `quantkit export` into {out_dir} first")
    check_settings(workspace_gib, opt_level)
    export_info = _read_export_json(out_dir)
    model = onnx.load(str(onnx_path), load_external_data=False)
    needed, reasons = min_tensorrt_version(model)
    if export_info.get("min_tensorrt_version"):
        try:
            stated = parse_version(str(export_info["min_tensorrt_version"]))
        except ValueError as e:
            raise InputError(f"{out_dir / EXPORT_JSON}: min_tensorrt_version: {e}") from e
        if stated > needed:
            needed = stated
            reasons.append(f"{EXPORT_JSON} says TensorRT >= {format_version(stated)}")

    sets = as_profile_sets(shapes)
    for profile in sets or [[]]:
        check_profiles_against_inputs(graph_input_shapes(model), {p.name: p for p in profile}, str(onnx_path))
    file_name, file_sha = _recipe_identity(out_dir, export_info)
    recipe_name, recipe_sha256 = recipe_name or file_name, recipe_sha256 or file_sha

    script = write_build_script(
        out_dir, ONNX_NAME, ENGINE_NAME, sets, workspace_gib=workspace_gib, opt_level=opt_level,
        min_version=needed, reasons=reasons,
    )
    how = (f"{script} holds the equivalent trtexec command: copy the folder {out_dir} to the target "
           f"(TensorRT >= {format_version(needed)}) and run `bash {SCRIPT_NAME}` there")
    try:
        result = build_engine(
            onnx_path, out_dir / ENGINE_NAME, sets, workspace_gib=workspace_gib, opt_level=opt_level,
            timing_cache=out_dir / TIMING_CACHE_NAME, cuda_graph_friendly=cuda_graph_friendly,
            recipe_name=recipe_name, recipe_sha256=recipe_sha256, min_version=needed,
            backend_name=backend_name, targets=targets,
        )
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(f"{e}. No engine was built; {how}") from e
    return dataclasses.replace(result, script_path=script)
