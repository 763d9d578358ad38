"""The compile check of an exported graph: TensorRT's ONNX parser and strongly typed builder run over
OUT/model.onnx for each target, after the audit, wherever TensorRT or TensorRT-RTX imports.

`compile_check(onnx, targets, profiles)` returns a `CompileCheck` (one `CompileResult` per target:
parsed, the parser's errors naming node and op, built, the builder's message, engine bytes, build
seconds, warnings, layers by output dtype); `check_export(OUT)` takes the targets and profiles
from OUT/recipe.yaml and records the check in report.json. Engines are measured, never kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from quantkit import console
from quantkit.runtime.tensorrt import backend as trt_backend
from quantkit.runtime.tensorrt.files import DEFAULT_WORKSPACE_GIB, ONNX_NAME, check_settings
from quantkit.runtime.tensorrt.network import CompileResult, compile_network
from quantkit.runtime.tensorrt.profiles import ShapeProfile, as_profile_sets, graph_input_shapes
from quantkit.runtime.tensorrt.targets import CompileTarget, targets_for

# Ops that TensorRT-RTX 1.7 does not implement while datacenter and Jetson TensorRT do (NVIDIA's
# TensorRT-RTX issue 36, a gap named in its release notes). For a target that only stands in for a
# TensorRT device (hopper, thor, orin) such a refusal says nothing about the graph there: not checked.
# For an RTX target it is a real refusal, and the hint says where the op comes from.
RTX_MISSING_OPS = {
    "NonZero": "TensorRT-RTX has no NonZero layer (datacenter and Jetson TensorRT have one); torch.nonzero, "
               "masked_scatter and boolean-mask indexing export to it",
}

# Without the recipe's build.profiles, every dynamic dimension gets this range (min, opt, max): the
# check is of the graph's ops and types, and a range this small keeps the build quick.
DEFAULT_DYNAMIC_RANGE = (1, 16, 64)


@dataclass
class CompileCheck:
    """The compile check of one graph: truthy unless a target failed to parse or build (a check
    that could not run here, `skipped`, or a target `not_checked`, is not a failure)."""

    onnx_file: str
    backend: str | None = None
    version: str | None = None
    results: list[CompileResult] = field(default_factory=list)
    profiles: list[list[ShapeProfile]] = field(default_factory=list)
    skipped: str | None = None  # why nothing was compiled
    warnings: list[str] = field(default_factory=list)  # ours, about the graph (FP32 compute for a GPU)

    def __bool__(self) -> bool:
        return all(r or r.not_checked for r in self.results)

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        if not self:
            return "failed"
        return "not checked" if self.results and all(r.not_checked for r in self.results) else "passed"

    @property
    def failures(self) -> list[str]:
        """One line per failed target, naming the target and the node or layer."""
        return [f"{self.onnx_file} for {_where(r)}: {r.error}" + _hint(r) for r in self.results
                if not r and not r.not_checked]

    @property
    def not_checked(self) -> list[str]:
        """One line per target this backend could not check, and why."""
        return [f"{self.onnx_file} for {_where(r)}: {r.not_checked}" for r in self.results if r.not_checked]

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "passed": bool(self) and not self.skipped, "graph": self.onnx_file,
            "backend": self.backend, "version": self.version, "skipped": self.skipped,
            "profiles": [[p.to_dict() for p in shapes] for shapes in self.profiles],
            "targets": [r.to_dict() for r in self.results], "failures": self.failures,
            "not_checked": self.not_checked,
            "warnings": list(self.warnings),
        }


def _where(r: CompileResult) -> str:
    return ", ".join(t.sm for t in r.targets) or "this GPU"


def _missing_ops(r: CompileResult) -> list[str]:
    """The ops TensorRT-RTX lacks that it refused, when those are all it refused."""
    if r.parsed or not r.refused_ops or len(r.refused_ops) != len(r.parser_errors):
        return []
    return sorted(set(r.refused_ops)) if set(r.refused_ops) <= RTX_MISSING_OPS.keys() else []


def _hint(r: CompileResult) -> str:
    return "".join(f" ({RTX_MISSING_OPS[op]})" for op in _missing_ops(r))


def _classify_backend_gaps(check: "CompileCheck", be) -> None:
    """A TensorRT-RTX refusal of an op only TensorRT-RTX lacks, on targets that all stand in for
    TensorRT devices, is `not_checked` rather than failed: the device's TensorRT builds that op."""
    if be.name != trt_backend.TENSORRT_RTX:
        return
    for r in check.results:
        ops = _missing_ops(r)
        if ops and r.targets and all(t.stand_in for t in r.targets):
            devices = ", ".join(sorted({t.device for t in r.targets if t.device}))
            r.not_checked = (f"not checked for {devices}: {'; '.join(RTX_MISSING_OPS[op] for op in ops)}. "
                             f"Build it on the device with build_engine.sh to check it there")


def default_profile(onnx_path: str | os.PathLike) -> list[ShapeProfile]:
    """One profile for the graph's dynamic inputs: each dynamic dimension DEFAULT_DYNAMIC_RANGE."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = []
    lo, mid, hi = DEFAULT_DYNAMIC_RANGE
    for name, shape in graph_input_shapes(model).items():
        if any(d < 0 for d in shape):
            out.append(ShapeProfile(name, tuple(lo if d < 0 else d for d in shape),
                                    tuple(mid if d < 0 else d for d in shape), tuple(hi if d < 0 else d for d in shape)))
    return out


def compile_check(
    onnx_path: str | os.PathLike,
    targets: Sequence[CompileTarget],
    profiles: Sequence[ShapeProfile] | Sequence[Sequence[ShapeProfile]] | None = None,
    *,
    backend_name: str | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    opt_level: int = 3,
    gpu_targets: Sequence[str] = (),
) -> CompileCheck:
    """Parse and build `onnx_path` once per target (TensorRT-RTX, ahead of time) or once for this GPU
    (datacenter TensorRT); nothing is written. Profiles default to `default_profile`. With
    `gpu_targets` (the recipe's GPU targets), a graph whose matmuls compute in FP32 gets a warning."""
    onnx_path = Path(onnx_path)
    check_settings(workspace_gib, opt_level)
    check = CompileCheck(onnx_path.name)
    try:
        be = trt_backend.load_backend(backend_name)
    except trt_backend.TensorRTUnavailable as e:
        check.skipped = f"neither TensorRT nor TensorRT-RTX can be used here ({e})"
        return check
    check.backend, check.version = be.name, be.version
    # Dynamic inputs the given profiles leave out get the default range in each profile.
    fallback = default_profile(onnx_path)
    sets = [shapes + [p for p in fallback if p.name not in {q.name for q in shapes}]
            for shapes in as_profile_sets(profiles)] or ([fallback] if fallback else [])
    check.profiles = sets
    if be.ahead_of_time:
        if not targets:
            check.skipped = "no GPU target to compile for (the recipe's targets are empty or cpu only; give --target)"
            return check
        per_target = [[t] for t in targets]
    else:
        try:
            trt_backend.gpu_identity()
        except trt_backend.TensorRTUnavailable as e:
            check.skipped = f"TensorRT is installed but cannot build here: {e}"
            return check
        per_target = [[]]
    for group in per_target:
        result = compile_network(onnx_path, sets, be, targets=group, workspace_gib=workspace_gib, opt_level=opt_level)
        result.engine = None  # measured, not kept: engines are tens of MB
        check.results.append(result)
    _classify_backend_gaps(check, be)
    gpu = [t for t in gpu_targets if t != "cpu"]
    parsed = next((r for r in check.results if r.parsed), None)
    if gpu and parsed is not None:
        fp32 = parsed.fp32_compute()
        matmuls = parsed.compute_layers_by_dtype.get("matmul", {})
        if fp32.get("matmul"):
            check.warnings.append(
                f"{onnx_path.name}: {fp32['matmul']} of {sum(matmuls.values())} matmul layers and "
                f"{fp32.get('elementwise', 0)} elementwise layers compute in FP32 on the device (a strongly typed "
                f"build keeps the graph's types) on the GPU targets {', '.join(gpu)}: export a 16-bit "
                f"graph (`quantize --dtype bf16` or fp16) so that only the protected ops stay FP32"
            )
    return check


def check_export(out_dir: str | os.PathLike, *, target_names: Sequence[str] | None = None,
                 update_report: bool = True, **kwargs: Any) -> CompileCheck:
    """The compile check of OUT/model.onnx for the recipe's targets (or `target_names`) and build
    profiles; recorded in OUT/report.json under `compile_check` (report.md/.html re-rendered)."""
    from quantkit.recipe import load_recipe

    out_dir = Path(out_dir)
    recipe_file = out_dir / "recipe.yaml"
    recipe = load_recipe(recipe_file) if recipe_file.is_file() else None
    names = list(target_names) if target_names else list(recipe.targets if recipe else [])
    profiles = []
    if recipe is not None:
        from quantkit.runtime.tensorrt.profiles import profile_sets

        per_input: dict[str, list[ShapeProfile]] = {}
        for profile in recipe.build.profile_list():
            for name, r in profile.items():
                per_input.setdefault(name, []).append(ShapeProfile(name, tuple(r.min), tuple(r.opt), tuple(r.max)))
        profiles = profile_sets(per_input)
    if recipe is not None:
        kwargs.setdefault("workspace_gib", recipe.build.workspace_gib)
        kwargs.setdefault("opt_level", recipe.build.optimization_level)
    check = compile_check(out_dir / ONNX_NAME, targets_for(names), profiles or None, gpu_targets=names, **kwargs)
    if update_report:
        record_in_report(out_dir, check)
    return check


def record_in_report(out_dir: Path, check: CompileCheck) -> None:
    """report.json's `compile_check` (and its warnings) replaced by this check; the reports re-rendered."""
    from quantkit.report.render import record

    record(out_dir, "compile_check", check)


def print_compile_check(check: CompileCheck) -> None:
    if check.skipped:
        console.warn(f"compile check skipped: {check.skipped}")
        return
    rows = []
    for r in check.results:
        dtypes = ", ".join(f"{k} {v}" for k, v in r.layers_by_dtype.items())
        rows.append((_where(r), "yes" if r.parsed else "NO", "yes" if r.built else ("NO" if r.parsed else "-"),
                     f"{r.engine_bytes / 2**20:.1f} MiB" if r.built else "-", f"{r.build_seconds:.1f}",
                     str(len(r.warnings)), f"{r.layers} ({dtypes})" if r.parsed else "-"))
    label = "TensorRT-RTX" if check.backend == trt_backend.TENSORRT_RTX else "TensorRT"
    console.show(console.rows_table(f"compile check ({label} {check.version}, {len(check.profiles)} profile(s))",
                                    ("target", "parsed", "built", "engine", "seconds", "warnings", "layers"), rows))
    for r in check.results:
        for t in r.targets:
            if t.stand_in:
                console.info(t.note)
    for w in check.warnings:
        console.warn(w)
    for n in check.not_checked:
        console.warn(f"compile check: {n}")
    for f in check.failures:
        console.warn(f"compile check FAILED: {f}")
