"""build_engine.sh: the trtexec command equivalent to the Python build, for the machine that will
run the engine (engines do not move between GPU models or TensorRT versions).
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import Sequence

from quantkit.errors import InputError
from quantkit.outdir import atomic_write_text
from quantkit.runtime.tensorrt.files import (
    DEFAULT_WORKSPACE_GIB,
    METADATA_NAME,
    SCRIPT_NAME,
    TIMING_CACHE_NAME,
    check_settings,
)
from quantkit.runtime.tensorrt.profiles import ShapeProfile, as_profile_sets, dims_text
from quantkit.trt_requirements import Version, format_version


def write_build_script(
    out_dir: str | os.PathLike,
    onnx_name: str,
    engine_name: str,
    profiles: Sequence[ShapeProfile] | Sequence[Sequence[ShapeProfile]],
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
    check_settings(workspace_gib, opt_level)
    for name in (onnx_name, engine_name, timing_cache_name):
        if "/" in name or name in ("", ".", ".."):
            raise InputError(f"build_engine.sh: {name!r} must be a file name inside the output folder")
    partial = f"{engine_name}.partial"
    argv = [f"--onnx={onnx_name}", "--stronglyTyped", f"--saveEngine={partial}"]
    sets = as_profile_sets(profiles)
    # One --minShapes/--optShapes/--maxShapes triple per optimization profile. trtexec (TensorRT >= 10.0,
    # samples/common/sampleOptions.cpp) refuses repeated triples unless each follows its --profile=N.
    for index, shapes in enumerate(sets):
        if len(sets) > 1:
            argv.append(f"--profile={index}")
        for flag, which in (("--minShapes", "min"), ("--optShapes", "opt"), ("--maxShapes", "max")):
            spec = ",".join(f"{p.name}:{dims_text(getattr(p, which))}" for p in shapes)
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
    if len(sets) > 1:
        lines.append(f"# {len(sets)} optimization profiles in one engine: --profile=N, then its shape triple "
                     "(trtexec of TensorRT 10.0 or later).")
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
