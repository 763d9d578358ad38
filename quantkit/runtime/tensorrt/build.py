"""The strongly typed engine build: parse the ONNX file into a network, add the optimization
profile, build, and write the engine, engine.json and the timing cache atomically.

`build_from_output_dir(OUT)` always writes build_engine.sh first and raises TensorRTUnavailable,
naming that script, where TensorRT cannot be used here.
"""

from __future__ import annotations

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
    sha256_of_file,
)
from quantkit.runtime.tensorrt.profiles import ShapeProfile, check_profiles_against_inputs, graph_input_shapes
from quantkit.runtime.tensorrt.script import write_build_script
from quantkit.trt_requirements import Version, format_version, min_tensorrt_version, parse_version, version_at_least

log = logging.getLogger("quantkit.runtime.tensorrt")

# ONNX ops whose output shape depends on data: a CUDA graph cannot be captured around them
# (Torch-TensorRT's CUDA-graph notes: "Not compatible with models that have data-dependent shapes").
_DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    metadata_path: Path
    metadata: EngineMetadata
    timing_cache_path: Path
    script_path: Path | None = None

    @property
    def build_time_s(self) -> float:
        return self.metadata.build_time_s


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    profiles: Sequence[ShapeProfile],
    *,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    timing_cache: str | os.PathLike | None = None,
    cuda_graph_friendly: bool = False,
    recipe_name: str | None,
    recipe_sha256: str | None,
    min_version: Version | None = None,
) -> BuildResult:
    """Build a strongly-typed engine from an ONNX file and write it, and engine.json, atomically.

    Parses from the file path so model.onnx.data is found. One optimization profile holds every
    input in `profiles`; every input with a dynamic dimension must be in it. The timing cache
    (default: timing.cache beside the engine) is loaded when present and saved after the build.
    Refuses before building when the installed TensorRT is older than the graph needs.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    check_settings(workspace_gib, opt_level)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found")
    timing_cache = Path(timing_cache) if timing_cache else engine_path.parent / TIMING_CACHE_NAME
    needed, reasons = min_tensorrt_version(onnx_path)
    if min_version and tuple(min_version) > needed:
        needed = tuple(min_version)

    trt = backend.import_tensorrt()
    installed = trt.__version__
    if not version_at_least(parse_version(installed), needed):
        raise TensorRTUnavailable(
            f"{onnx_path.name} needs TensorRT >= {format_version(needed)} ({'; '.join(reasons[1:]) or reasons[0]}); "
            f"this machine has TensorRT {installed}. No engine was built"
        )
    gpu_name, capability = backend.gpu_identity()
    if cuda_graph_friendly:
        _warn_data_dependent_ops(onnx_path)

    logger = backend.make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = backend.parser_errors(parser) or logger.errors or ["no detail given"]
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: " + " | ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    _add_profile(builder, config, network, profiles, onnx_path)
    cache = _attach_timing_cache(config, timing_cache)

    log.info("building TensorRT engine from %s (TensorRT %s, %s); this can take minutes",
             onnx_path.name, installed, gpu_name)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_time = time.perf_counter() - start
    if serialized is None:
        detail = " | ".join(logger.errors[-5:]) or "see the TensorRT log above"
        raise QuantkitError(f"TensorRT could not build an engine from {onnx_path}: {detail}")

    metadata_path = engine_path.parent / METADATA_NAME
    # An engine.json left from an earlier engine must never describe this one.
    metadata_path.unlink(missing_ok=True)
    engine_bytes = memoryview(serialized)
    atomic_write_bytes(engine_path, engine_bytes)
    atomic_write_bytes(timing_cache, memoryview(cache.serialize()))

    from quantkit import __version__ as quantkit_version

    meta = EngineMetadata(
        engine_file=engine_path.name,
        engine_sha256=hashlib.sha256(engine_bytes).hexdigest(),
        engine_bytes=engine_bytes.nbytes,
        gpu_name=gpu_name,
        compute_capability=capability,
        tensorrt_version=installed,
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_of_file(onnx_path),
        onnx_external_data_sha256={
            name: sha256_of_file(onnx_path.parent / name) for name in external_data_files(onnx_path)
        },
        recipe_name=recipe_name,
        recipe_sha256=recipe_sha256,
        profiles=list(profiles),
        builder={
            "strongly_typed": True,
            "builder_optimization_level": opt_level,
            "workspace_gib": workspace_gib,
            "timing_cache": timing_cache.name,
            "cuda_graph_friendly": cuda_graph_friendly,
        },
        build_time_s=round(build_time, 3),
        built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        quantkit_version=quantkit_version,
        min_tensorrt_version=format_version(needed),
        min_tensorrt_reasons=list(reasons),
    )
    meta.save(metadata_path)
    log.info("built %s in %.1f s", engine_path, build_time)
    return BuildResult(engine_path, metadata_path, meta, timing_cache)


def _add_profile(builder, config, network, profiles: Sequence[ShapeProfile], onnx_path: Path) -> None:
    by_name = {p.name: p for p in profiles}
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    graph_shapes = {t.name: tuple(int(d) for d in t.shape) for t in inputs}
    check_profiles_against_inputs(graph_shapes, by_name, onnx_path.name)
    if not by_name:
        return
    profile = builder.create_optimization_profile()
    for name, p in by_name.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    if config.add_optimization_profile(profile) < 0:
        raise InputError(f"{onnx_path.name}: TensorRT refused the optimization profile {[p.to_dict() for p in profiles]}")


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
    shapes: Sequence[ShapeProfile] | None = None,
    *,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    cuda_graph_friendly: bool = False,
) -> BuildResult:
    """Build OUT/model.engine from OUT/model.onnx; always write OUT/build_engine.sh first.

    Inputs and their dynamic dimensions are read from the ONNX graph (the contract); `shapes` gives
    the build profiles (from --shape or the recipe). Where TensorRT cannot be used here, raises
    TensorRTUnavailable naming the script to run on the target; no engine is written then.
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

    profiles = list(shapes or [])
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise InputError(f"--shape: an input is given more than once ({', '.join(names)})")
    check_profiles_against_inputs(graph_input_shapes(model), {p.name: p for p in profiles}, str(onnx_path))
    recipe_name, recipe_sha = _recipe_identity(out_dir, export_info)

    script = write_build_script(
        out_dir, ONNX_NAME, ENGINE_NAME, profiles, workspace_gib=workspace_gib, opt_level=opt_level,
        min_version=needed, reasons=reasons,
    )
    how = (f"{script} holds the equivalent trtexec command: copy the folder {out_dir} to the target "
           f"(TensorRT >= {format_version(needed)}) and run `bash {SCRIPT_NAME}` there")
    try:
        result = build_engine(
            onnx_path, out_dir / ENGINE_NAME, profiles, workspace_gib=workspace_gib, opt_level=opt_level,
            timing_cache=out_dir / TIMING_CACHE_NAME, cuda_graph_friendly=cuda_graph_friendly,
            recipe_name=recipe_name, recipe_sha256=recipe_sha, min_version=needed,
        )
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(f"{e}. No engine was built; {how}") from e
    return BuildResult(result.engine_path, result.metadata_path, result.metadata, result.timing_cache_path, script)
