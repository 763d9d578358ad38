"""engine.json: what an engine was built from and for (backend, its version, the GPU or the target
compute capabilities, the optimization profiles), and the guard that refuses an engine on a GPU or
TensorRT release it was not built for, naming both.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from quantkit.errors import InputError
from quantkit.outdir import atomic_write_json
from quantkit.runtime.tensorrt.files import METADATA_NAME, SCRIPT_NAME
from quantkit.runtime.tensorrt.backend import TENSORRT, TENSORRT_RTX
from quantkit.runtime.tensorrt.profiles import ShapeProfile, as_profile_sets
from quantkit.runtime.tensorrt.targets import RTX_COMPUTE_CAPABILITIES, CompileTarget
from quantkit.trt_requirements import parse_version

# 2: backend, targets, and `profiles` as one list of input shapes per optimization profile.
METADATA_SCHEMA = 2


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
    profiles: list[list[ShapeProfile]]  # one list of input shapes per optimization profile
    builder: dict[str, Any]
    build_time_s: float
    built_at: str
    quantkit_version: str
    min_tensorrt_version: str = ""
    min_tensorrt_reasons: list[str] = field(default_factory=list)
    onnx_external_data_sha256: dict[str, str] = field(default_factory=dict)
    backend: str = TENSORRT  # or tensorrt-rtx; tensorrt_version is then TensorRT-RTX's version
    targets: list[CompileTarget] = field(default_factory=list)  # TensorRT-RTX: what it was compiled for
    note: str = ""  # said plainly when the engine is a compile check, not the one to deploy
    schema: int = METADATA_SCHEMA

    def __post_init__(self) -> None:
        self.profiles = as_profile_sets(self.profiles)

    @property
    def target_compute_capabilities(self) -> list[str]:
        return [t.compute_capability for t in self.targets] or [self.compute_capability]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [[p.to_dict() for p in shapes] for shapes in self.profiles]
        data["targets"] = [t.to_dict() for t in self.targets]
        data["target_compute_capabilities"] = self.target_compute_capabilities
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
        profiles = data["profiles"]
        if not isinstance(profiles, list):
            raise InputError(f"{source}: profiles must be a list; rebuild the engine with `quantkit build`")
        if profiles and all(isinstance(p, Mapping) for p in profiles):  # schema 1: one profile
            profiles = [profiles]
        values["profiles"] = [[ShapeProfile.from_dict(p) for p in shapes] for shapes in profiles]
        try:
            values["targets"] = [CompileTarget.from_dict(t) for t in data.get("targets", [])]
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{source}: targets: {e}; rebuild the engine with `quantkit build`") from e
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
    """Refuse (InputError) an engine built for another GPU or another TensorRT release.

    Datacenter TensorRT: a GPU of the same compute capability but another model (H100 SXM vs H200,
    Orin AGX vs Orin NX) is refused too: TensorRT picks kernels by timing them on the build GPU,
    and NVIDIA's docs warn that such plans may be slow or fail on other models. TensorRT-RTX
    compiles ahead of time for compute capabilities, so only those are compared.
    """
    if not isinstance(compute_capability, str):
        compute_capability = ".".join(str(c) for c in compute_capability)
    rtx = meta.backend == TENSORRT_RTX
    label = "TensorRT-RTX" if rtx else "TensorRT"
    problems = []
    if rtx:
        built_for = ", ".join(f"{c} (sm{c.replace('.', '')})" for c in meta.target_compute_capabilities)
        if compute_capability not in meta.target_compute_capabilities:
            unsupported = ("" if compute_capability in RTX_COMPUTE_CAPABILITIES else
                           f", which TensorRT-RTX does not support (it runs on {', '.join(RTX_COMPUTE_CAPABILITIES)})")
            problems.append(f"compute capability {built_for}; this GPU ({gpu_name}) has compute capability "
                            f"{compute_capability}{unsupported}")
    else:
        if meta.gpu_name.strip() != gpu_name.strip():
            problems.append(f"GPU {meta.gpu_name!r}, this machine has {gpu_name!r}")
        if meta.compute_capability != compute_capability:
            problems.append(f"compute capability {meta.compute_capability}, this GPU has {compute_capability}")
    try:
        same_trt = _release(meta.tensorrt_version) == _release(trt_version)
    except ValueError:
        same_trt = meta.tensorrt_version.strip() == trt_version.strip()
    if not same_trt:
        problems.append(f"{label} {meta.tensorrt_version}, this machine has {label} {trt_version}")
    if problems:
        if rtx and compute_capability not in RTX_COMPUTE_CAPABILITIES:
            how = f"build a TensorRT engine for this GPU instead: `bash {SCRIPT_NAME}` in the engine's folder"
        elif rtx:
            how = (f"rebuild it here (`quantkit build --from DIR --target sm{compute_capability.replace('.', '')}`, "
                   f"or `bash {SCRIPT_NAME}` in the engine's folder)")
        else:
            how = f"rebuild it here (`quantkit build --from DIR`, or `bash {SCRIPT_NAME}` in the engine's folder)"
        raise InputError(
            f"{meta.engine_file} was built for {'; '.join(problems)}. {label} engines do not move "
            f"between {'compute capabilities' if rtx else 'GPU models'} or {label} versions: {how}"
        )
