"""engine.json: what an engine was built from and for, and the guard that refuses an engine on a
GPU or TensorRT release it was not built for.
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
from quantkit.runtime.tensorrt.profiles import ShapeProfile
from quantkit.trt_requirements import parse_version

METADATA_SCHEMA = 1


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
