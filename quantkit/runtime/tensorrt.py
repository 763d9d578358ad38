"""TensorRT: strongly-typed engine build, the engine's metadata, a runner, and an honest fallback.

The only module that imports `tensorrt`, and only inside functions. `build_from_output_dir` always
writes `build_engine.sh` (the equivalent trtexec command, runnable on a Jetson after copying the
folder) before it tries TensorRT; where TensorRT is missing it raises `TensorRTUnavailable` saying
where that script is. `engine.json` beside the engine records the GPU model, TensorRT version and
inputs it was built from, and `TensorRTRunner` refuses an engine built for another GPU or TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shlex
import stat
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from quantkit.errors import ExportError, InputError, QuantkitError, TensorRTUnavailable
from quantkit.export.trt_requirements import (
    Version,
    format_version,
    min_tensorrt_version,
    parse_version,
    version_at_least,
)
from quantkit.outdir import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ENGINE_NAME = "model.engine"
METADATA_NAME = "engine.json"
SCRIPT_NAME = "build_engine.sh"
TIMING_CACHE_NAME = "timing.cache"
EXPORT_JSON = "export.json"
RECIPE_YAML = "recipe.yaml"

DEFAULT_WORKSPACE_GIB = 4.0
MAX_OPT_LEVEL = 5  # trtexec --help: "integers from 0 to the maximum optimization level, which is currently 5"
METADATA_SCHEMA = 1

# ONNX ops whose output shape depends on data: a CUDA graph cannot be captured around them
# (Torch-TensorRT's CUDA-graph notes: "Not compatible with models that have data-dependent shapes").
_DATA_DEPENDENT_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}


# ---------------------------------------------------------------------------------------------
# shape profiles


@dataclass(frozen=True)
class ShapeProfile:
    """Build shapes of one input: min <= opt <= max elementwise, same rank. Validates itself."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "min", _as_dims(self.name, "min", self.min))
        object.__setattr__(self, "opt", _as_dims(self.name, "opt", self.opt))
        object.__setattr__(self, "max", _as_dims(self.name, "max", self.max))
        if not self.name or "," in self.name:
            raise InputError(f"shape profile: input name {self.name!r} must be non-empty and contain no ','")
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise InputError(
                f"shape profile {self.name}: min {_dims_text(self.min)}, opt {_dims_text(self.opt)} and "
                f"max {_dims_text(self.max)} must have the same rank"
            )
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                raise InputError(
                    f"shape profile {self.name}: dimension {axis} must satisfy min <= opt <= max, got "
                    f"{lo}, {mid}, {hi} (min {_dims_text(self.min)}, opt {_dims_text(self.opt)}, "
                    f"max {_dims_text(self.max)})"
                )

    @classmethod
    def static(cls, name: str, shape: Sequence[int]) -> "ShapeProfile":
        """The shape the user will run, and nothing else: min = opt = max."""
        return cls(name, tuple(shape), tuple(shape), tuple(shape))

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeProfile":
        try:
            return cls(str(data["name"]), tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))
        except (KeyError, TypeError) as e:
            raise InputError(f"shape profile {data!r}: needs name, min, opt and max ({e})") from e


def _as_dims(name: str, which: str, dims: Iterable[Any]) -> tuple[int, ...]:
    try:
        dims = tuple(dims)
        out = tuple(int(d) for d in dims)
    except (TypeError, ValueError) as e:
        raise InputError(f"shape profile {name}: {which} shape {dims!r} is not a list of integers") from e
    if any(isinstance(d, bool) or int(d) != d for d in dims) or any(d < 1 for d in out):
        raise InputError(f"shape profile {name}: {which} shape {_dims_text(out)} must have dimensions >= 1")
    return out


def _dims_text(dims: Sequence[int]) -> str:
    return "x".join(str(d) for d in dims)


SHAPE_SYNTAX = "NAME:DIMS (min = opt = max) or NAME:MIN,OPT,MAX with DIMS like 4x128, e.g. input_ids:1x128,4x128,8x128"


def parse_shape_spec(text: str) -> ShapeProfile:
    """'input_ids:1x128,4x128,8x128' -> ShapeProfile; 'input_ids:4x128' -> static 4x128.

    The name is everything before the last ':' (as trtexec reads it), so 'input:0:1x3' names
    'input:0'. Two shapes are refused: the opt shape is the one the engine is tuned for, so it is
    said, not guessed.
    """
    text = text.strip()
    name, sep, shapes = text.rpartition(":")
    if not sep or not name or not shapes:
        raise InputError(f"--shape {text!r}: expected {SHAPE_SYNTAX}")
    parts = shapes.split(",")
    dims = []
    for part in parts:
        pieces = part.strip().lower().split("x")
        if not all(p.strip().isdigit() for p in pieces):
            raise InputError(f"--shape {text!r}: {part.strip()!r} is not a shape like 4x128; expected {SHAPE_SYNTAX}")
        dims.append(tuple(int(p) for p in pieces))
    if len(dims) == 1:
        return ShapeProfile.static(name, dims[0])
    if len(dims) == 3:
        return ShapeProfile(name, *dims)
    raise InputError(f"--shape {text!r}: gave {len(dims)} shapes; expected {SHAPE_SYNTAX}")


def parse_shape_specs(texts: Iterable[str]) -> list[ShapeProfile]:
    profiles = [parse_shape_spec(t) for t in texts]
    seen: set[str] = set()
    for p in profiles:
        if p.name in seen:
            raise InputError(f"--shape: input {p.name!r} is given more than once")
        seen.add(p.name)
    return profiles


# ---------------------------------------------------------------------------------------------
# engine metadata


@dataclass
class EngineMetadata:
    """What an engine was built from and for; saved as engine.json beside the engine."""

    engine_file: str
    engine_sha256: str
    engine_bytes: int
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    onnx_file: str
    onnx_sha256: str
    recipe_name: str | None
    recipe_sha256: str | None
    profiles: list[ShapeProfile]
    builder: dict[str, Any]
    build_time_s: float
    built_at: str
    quantkit_version: str
    min_tensorrt_version: str = ""
    min_tensorrt_reasons: list[str] = field(default_factory=list)
    onnx_external_data_sha256: dict[str, str] = field(default_factory=dict)
    schema: int = METADATA_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = METADATA_NAME) -> "EngineMetadata":
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        required = {n for n, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise InputError(f"{source}: missing {', '.join(missing)}; rebuild the engine with `quantkit build`")
        values = {k: v for k, v in data.items() if k in known}
        values["profiles"] = [ShapeProfile.from_dict(p) for p in data["profiles"]]
        values["compute_capability"] = str(data["compute_capability"])
        values["tensorrt_version"] = str(data["tensorrt_version"])
        return cls(**values)

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EngineMetadata":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"{path}: not found") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))


def _release(version: str) -> tuple[int, ...]:
    """Engines are tied to a TensorRT release; the fourth number is the package build."""
    return parse_version(version)[:3]


def check_engine_compatible(
    meta: EngineMetadata, gpu_name: str, compute_capability: str | Sequence[int], trt_version: str
) -> None:
    """Refuse (InputError) an engine built for another GPU model or another TensorRT release.

    A GPU of the same compute capability but another model (H100 SXM vs H200, Orin AGX vs Orin NX)
    is refused too: TensorRT picks kernels by timing them on the build GPU, and NVIDIA's docs warn
    that such plans may be slow or fail on other models.
    """
    if not isinstance(compute_capability, str):
        compute_capability = ".".join(str(c) for c in compute_capability)
    problems = []
    if meta.gpu_name.strip() != gpu_name.strip():
        problems.append(f"GPU {meta.gpu_name!r}, this machine has {gpu_name!r}")
    if meta.compute_capability != compute_capability:
        problems.append(f"compute capability {meta.compute_capability}, this GPU has {compute_capability}")
    try:
        same_trt = _release(meta.tensorrt_version) == _release(trt_version)
    except ValueError:
        same_trt = meta.tensorrt_version.strip() == trt_version.strip()
    if not same_trt:
        problems.append(f"TensorRT {meta.tensorrt_version}, this machine has TensorRT {trt_version}")
    if problems:
        raise InputError(
            f"{meta.engine_file} was built for {'; '.join(problems)}. TensorRT engines do not move "
            f"between GPU models or TensorRT versions: rebuild it here (`quantkit build --from DIR`, or "
            f"`bash {SCRIPT_NAME}` in the engine's folder)"
        )


# ---------------------------------------------------------------------------------------------
# the trtexec script


def write_build_script(
    out_dir: str | os.PathLike,
    onnx_name: str,
    engine_name: str,
    profiles: Sequence[ShapeProfile],
    *,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    timing_cache_name: str = TIMING_CACHE_NAME,
    min_version: Version | None = None,
    reasons: Sequence[str] = (),
) -> Path:
    """Write OUT/build_engine.sh: the trtexec command equivalent to `build_engine`, paths relative.

    The engine is saved under a temporary name and renamed when trtexec succeeded, and a stale
    engine.json (which would describe some other engine) is removed: trtexec writes none.
    """
    _check_settings(workspace_gib, opt_level)
    for name in (onnx_name, engine_name, timing_cache_name):
        if "/" in name or name in ("", ".", ".."):
            raise InputError(f"build_engine.sh: {name!r} must be a file name inside the output folder")
    partial = f"{engine_name}.partial"
    argv = [f"--onnx={onnx_name}", "--stronglyTyped", f"--saveEngine={partial}"]
    if profiles:
        for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            spec = ",".join(f"{p.name}:{_dims_text(getattr(p, which))}" for p in profiles)
            argv.append(f"{flag}={spec}")
    argv += [
        f"--timingCacheFile={timing_cache_name}",
        f"--builderOptimizationLevel={opt_level}",
        # trtexec --help: "Supports the following base-2 suffixes ... If none of suffixes is appended,
        # the default unit is in MiB"; the explicit M reads the same on every TensorRT 10.
        f"--memPoolSize=workspace:{_workspace_mib(workspace_gib)}M",
        "--skipInference",
    ]
    needs = format_version(min_version) if min_version else None
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds {engine_name} from {onnx_name} with TensorRT's trtexec, on the machine that will run it:",
        "# engines do not move between GPU models or TensorRT versions.",
        "# Written by quantkit build. Copy this whole folder (the .onnx, any .onnx.data beside it, this",
        f"# script) to the target and run: bash {SCRIPT_NAME}",
    ]
    if needs:
        lines.append(f"# This graph needs TensorRT >= {needs}:")
        lines += [f"#   - {_one_line(r)}" for r in reasons]
    lines += [
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        # JetPack installs trtexec outside PATH (TensorRT 10.15 moved it to /usr/bin).
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"',
        'if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi',
        'if [ -z "$TRTEXEC" ]; then',
        f'  echo "{SCRIPT_NAME}: trtexec not found; install TensorRT{" >= " + needs if needs else ""} or set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 1",
        "fi",
        f"rm -f {shlex.quote(partial)}",
        '"$TRTEXEC" \\',
        *[f"  {shlex.quote(a)} \\" for a in argv[:-1]],
        f"  {shlex.quote(argv[-1])}",
        f"mv -f {shlex.quote(partial)} {shlex.quote(engine_name)}",
        f"rm -f {METADATA_NAME}",
        f'echo "built $(pwd)/{engine_name}"',
        "",
    ]
    path = Path(out_dir) / SCRIPT_NAME
    atomic_write_text(path, "\n".join(lines))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _workspace_mib(workspace_gib: float) -> int:
    return max(1, int(round(workspace_gib * 1024)))


def _check_settings(workspace_gib: float, opt_level: int) -> None:
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= MAX_OPT_LEVEL:
        raise InputError(f"builder optimization level must be an integer 0..{MAX_OPT_LEVEL}, got {opt_level!r}")
    if not isinstance(workspace_gib, (int, float)) or isinstance(workspace_gib, bool) or not workspace_gib > 0:
        raise InputError(f"workspace must be a positive number of GiB, got {workspace_gib!r}")


# ---------------------------------------------------------------------------------------------
# TensorRT access


def _import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install (missing libnvinfer: OSError, stub wheels)
        raise TensorRTUnavailable(f"TensorRT is not installed here (import tensorrt: {e})") from e
    return trt


def _gpu_identity() -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of the current CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and this machine has none visible to torch")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def _make_logger(trt):
    """A TensorRT logger that keeps errors for our messages and forwards the rest to logging."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = _call(err, "node_name") or (f"#{err.node()}" if _call(err, "node") not in (None, -1) else "")
        op = _call(err, "node_operator")
        where = f"node {node}" + (f" ({op})" if op else "") if node else "graph"
        out.append(f"{where}: {_call(err, 'desc') or err}")
    return out


def _call(obj, name: str):
    fn = getattr(obj, name, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # an accessor missing from this TensorRT's ParserError is not worth failing over
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _external_data_files(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# build


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
    _check_settings(workspace_gib, opt_level)
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: not found")
    timing_cache = Path(timing_cache) if timing_cache else engine_path.parent / TIMING_CACHE_NAME
    needed, reasons = min_tensorrt_version(onnx_path)
    if min_version and tuple(min_version) > needed:
        needed = tuple(min_version)

    trt = _import_tensorrt()
    installed = trt.__version__
    if not version_at_least(parse_version(installed), needed):
        raise TensorRTUnavailable(
            f"{onnx_path.name} needs TensorRT >= {format_version(needed)} ({'; '.join(reasons[1:]) or reasons[0]}); "
            f"this machine has TensorRT {installed}. No engine was built"
        )
    gpu_name, capability = _gpu_identity()
    if cuda_graph_friendly:
        _warn_data_dependent_ops(onnx_path)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["no detail given"]
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
        onnx_sha256=_sha256(onnx_path),
        onnx_external_data_sha256={
            name: _sha256(onnx_path.parent / name) for name in _external_data_files(onnx_path)
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


def check_profiles_against_inputs(
    graph_shapes: Mapping[str, Sequence[int]], profiles: Mapping[str, ShapeProfile], source: str
) -> None:
    """Every input with a dynamic dimension (-1) has a profile; every profile fits its input."""
    unknown = sorted(set(profiles) - set(graph_shapes))
    if unknown:
        raise InputError(
            f"{source}: --shape names {', '.join(unknown)}, which the graph does not take as input "
            f"(its inputs: {', '.join(graph_shapes) or 'none'})"
        )
    missing = []
    for name, shape in graph_shapes.items():
        shape = tuple(shape)
        p = profiles.get(name)
        if p is None:
            if any(d < 0 for d in shape):
                missing.append(f"{name} {_graph_dims_text(shape)}")
            continue
        if len(p.min) != len(shape):
            raise InputError(
                f"{source}: input {name} has rank {len(shape)} ({_graph_dims_text(shape)}) but --shape gives "
                f"rank {len(p.min)} ({_dims_text(p.opt)})"
            )
        for axis, d in enumerate(shape):
            if d >= 0 and not (p.min[axis] == p.opt[axis] == p.max[axis] == d):
                raise InputError(
                    f"{source}: input {name} dimension {axis} is fixed at {d} ({_graph_dims_text(shape)}); "
                    f"--shape gives min/opt/max {p.min[axis]}/{p.opt[axis]}/{p.max[axis]}"
                )
    if missing:
        raise InputError(
            f"{source}: inputs with dynamic dimensions need build shapes: {'; '.join(missing)}. "
            f"Give each as --shape {SHAPE_SYNTAX}"
        )


def _graph_dims_text(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


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


# ---------------------------------------------------------------------------------------------
# build from an export folder


def _graph_input_shapes(model) -> dict[str, tuple[int, ...]]:
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims)
    return shapes


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
    _check_settings(workspace_gib, opt_level)
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
    check_profiles_against_inputs(_graph_input_shapes(model), {p.name: p for p in profiles}, str(onnx_path))
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


# ---------------------------------------------------------------------------------------------
# runner


def _torch_dtype(trt, trt_dtype):
    import torch

    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
        "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
        "FP8": torch.float8_e4m3fn,
    }
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise InputError(f"engine tensor type {trt_dtype} has no torch equivalent this runner can feed")


class TensorRTRunner:
    """Runs a TensorRT engine with the Runner interface: named CPU/GPU tensors in, CPU tensors out.

    Uses the TensorRT 10 tensor API (set_input_shape, set_tensor_address, execute_async_v3) on a
    torch CUDA stream. Device buffers are kept between calls and only grow. With use_cuda_graph,
    the enqueue is captured once per input-shape set and replayed; a capture TensorRT cannot do
    falls back to plain enqueues with a warning.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, metadata_path: str | os.PathLike | None = None,
                 use_cuda_graph: bool = False) -> None:
        import torch

        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise InputError(f"{self.engine_path}: engine not found; build it with `quantkit build --from DIR`")
        trt = _import_tensorrt()
        gpu_name, capability = _gpu_identity()
        metadata_path = Path(metadata_path) if metadata_path else self.engine_path.parent / METADATA_NAME
        data = self.engine_path.read_bytes()
        self.metadata: EngineMetadata | None = None
        if metadata_path.is_file():
            self.metadata = EngineMetadata.load(metadata_path)
            if self.metadata.engine_bytes != len(data):
                raise InputError(
                    f"{metadata_path} describes a {self.metadata.engine_bytes}-byte engine but "
                    f"{self.engine_path} has {len(data)} bytes; rebuild with `quantkit build --from DIR`"
                )
            check_engine_compatible(self.metadata, gpu_name, capability, trt.__version__)
        else:
            msg = (f"{self.engine_path}: no {METADATA_NAME} beside it, so only TensorRT's own checks stand "
                   f"between this engine and a GPU it was not built for")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)

        self._trt = trt
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            detail = " | ".join(self._logger.errors[-3:]) or "no detail given"
            raise InputError(f"{self.engine_path}: TensorRT {trt.__version__} could not load this engine ({detail})")
        self._context = self._engine.create_execution_context()
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == mode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._buffers: dict[str, torch.Tensor] = {}
        self._use_cuda_graph = use_cuda_graph
        self._graph = None
        self._graph_key: tuple | None = None

    def _buffer(self, name: str, numel: int):
        import torch

        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=self._dtypes[name], device=self._device)
            self._buffers[name] = buf
            self._graph = None  # addresses changed: a captured graph points at the old buffers
        return buf

    def _profile_text(self, name: str) -> str:
        try:
            lo, mid, hi = self._engine.get_tensor_profile_shape(name, 0)
            return f"min {tuple(lo)}, opt {tuple(mid)}, max {tuple(hi)}"
        except Exception:  # only used to enrich an error message
            return "see engine.json"

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        given, wanted = set(inputs), set(self.input_names)
        if given != wanted:
            raise InputError(
                f"{self.engine_path.name}: inputs {sorted(given)} do not match the engine's {sorted(wanted)}"
            )
        ctx = self._context
        views: dict[str, torch.Tensor] = {}
        # Inputs already on the GPU may still be being written on the caller's stream.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            for name in self.input_names:
                t = inputs[name]
                want = self._dtypes[name]
                if t.dtype != want and (t.dtype.is_floating_point != want.is_floating_point or want == torch.bool):
                    raise InputError(f"input {name}: got {t.dtype}, the engine takes {want}")
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise InputError(
                        f"input {name}: shape {tuple(t.shape)} is outside the engine's profile "
                        f"({self._profile_text(name)})"
                    )
                view = self._buffer(name, t.numel())[: t.numel()].view(t.shape)
                view.copy_(t.to(want), non_blocking=False)
                views[name] = view
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise InputError(f"output {name} has a data-dependent shape {shape}; this runner cannot size it")
                numel = 1
                for d in shape:
                    numel *= d
                views[name] = self._buffer(name, numel)[:numel].view(shape)
            for name, view in views.items():
                ctx.set_tensor_address(name, view.data_ptr())
            self._enqueue(tuple((n, tuple(views[n].shape)) for n in self.input_names))
            outputs = {name: views[name].to("cpu") for name in self.output_names}
        self._stream.synchronize()
        return outputs

    def _enqueue(self, key: tuple) -> None:
        import torch

        handle = self._stream.cuda_stream
        if self._use_cuda_graph and self._graph is not None and key == self._graph_key:
            self._graph.replay()
            return
        if not self._context.execute_async_v3(handle):
            raise QuantkitError(f"{self.engine_path.name}: TensorRT execution failed: "
                                + (" | ".join(self._logger.errors[-3:]) or "no detail given"))
        if not self._use_cuda_graph:
            return
        # The enqueue above, after the shape change, flushed TensorRT's deferred setup, which a
        # capture must not contain; this one only records.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                ok = self._context.execute_async_v3(handle)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
        except Exception as e:  # capture is an optimization; the result above is already correct
            self._use_cuda_graph = False
            msg = f"{self.engine_path.name}: CUDA graph capture failed ({e}); running without one"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
            return
        self._graph, self._graph_key = graph, key


def load_runner_or_fallback(engine_path: str | os.PathLike, fallback_runner, **runner_kwargs):
    """The TensorRT runner for engine_path, or fallback_runner with a visible warning when
    TensorRT is missing or the engine cannot be used here."""
    try:
        return TensorRTRunner(engine_path, **runner_kwargs)
    except InputError as e:  # TensorRTUnavailable is one
        msg = f"TensorRT engine {engine_path} not used ({type(e).__name__}: {e}); running {fallback_runner.name} instead"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return fallback_runner
