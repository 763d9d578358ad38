"""`quantkit <verb>` and the `quantize` entry point: argument parsing and printing only.

Every verb calls the public function of the module that owns the work. Mistakes the user can fix
(quantkit.errors.InputError) print one line and exit 2; failures exit 1; no tracebacks for either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from quantkit import console
from quantkit.errors import InputError, QuantkitError

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info lines")


def _add_model_args(p: argparse.ArgumentParser, recipe_required: bool = True) -> None:
    p.add_argument("--recipe", required=recipe_required, default=None if recipe_required else "balanced",
                   help="shipped recipe name (balanced, fp8, nvfp4, int8-smoothquant, fp16) or a YAML file")
    p.add_argument("--model", default=None,
                   help="built-in name (minilm [default], llama-tiny), a Hugging Face folder, or package.module:function")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="precision the model runs in (default: the recipe's, else fp32)")


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --trust-model-code: what lets a run folder's `module:function` model spec be imported."""
    p.add_argument("--model", default=None,
                   help="the model spec to rebuild the run with (default: run.json's; a module:function or "
                        "file.py:function spec there is imported only when given here again or with "
                        "--trust-model-code)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="import and run the module:function / file.py:function model named in the folder's run.json "
                        "(only for folders you made or trust)")


# ---------------------------------------------------------------------------------------------
# verbs


def cmd_recipes(args: argparse.Namespace) -> int:
    from quantkit.recipe import load_recipe, shipped_recipe_names

    rows = []
    for name in shipped_recipe_names():
        r = load_recipe(name)
        rows.append((name, ",".join(r.targets), r.description))
    console.show(console.rows_table("shipped recipes", ("name", "targets", "what"), rows))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import quantkit

    plan = quantkit.plan(args.model, args.recipe, dtype=args.dtype, strict=args.strict)
    data = plan.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console.show(console.plan_table(data))
    console.show(console.rows_table("layer roles: how each was inferred", ("layer", "role", "how"),
                                    [(r["name"], r["role"] or "not inferred", r["role_how"]) for r in data["layers"]]))
    if data["roles_not_inferred"]:
        console.warn(f"{len(data['roles_not_inferred'])} layer(s) whose role could not be inferred (rules with "
                     f"`roles:` do not select them): {', '.join(data['roles_not_inferred'])}")
    if data["shared_weights"]:
        console.show(console.rows_table(
            "layers sharing one weight", ("layers", "precision", "decided by"),
            [(", ".join(g["layers"]), ", ".join(g["precision"]), f"{g['decided_by']} (on {g['decided_by_layer']})")
             for g in data["shared_weights"]]))
    if data["protected"]:
        console.show(console.rows_table("protected in FP32", ("module", "op", "how"),
                                        [(p["name"], p["op"], p["how"]) for p in data["protected"]]))
    if data["attention"]:
        console.show(console.rows_table(
            "attention matmuls", ("module", "class", "converted", "via", "quantizers"),
            [(a["name"], a["module_class"], "yes" if a["converted"] else "NO", a["via"],
              ",".join(sorted(a.get("quantizers", {}))) or a.get("reason") or "") for a in data["attention"]]))
    console.show(console.coverage_table(data["coverage"]))
    for w in data["warnings"]:
        console.warn(w)
    return 0


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, recipe_required=False)
    p.add_argument("--calib", default=None,
                   help="calibration set folder (from `quantkit collect`); default: the model's built-in set")
    p.add_argument("--synthetic", action="store_true",
                   help="calibrate on random inputs (recorded in report.json; numbers then mean little)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe>-<model>)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="use at most this many calibration samples (>= 1; default: the recipe's, else all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration/evaluation batch size (>= 1; default: the recipe's, 8)")
    p.add_argument("--strict", action="store_true", help="a rule that matches no layer is an error")
    p.add_argument("--force", action="store_true",
                   help="a run that misses its accuracy gate replaces a passing --out (default: it is written "
                        "beside it, to OUT.failed)")
    _add_scale_args(p)
    _add_common(p)


def _add_scale_args(p: argparse.ArgumentParser) -> None:
    """--nproc (quantkit.launch), --device-map and --max-memory (quantkit.placement)."""
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="calibrate data-parallel on N processes (one GPU each, or gloo on --device cpu); launches "
                        "torchrun. The amax values equal a one-process run's")
    p.add_argument("--device-map", default=None, metavar="auto|sequential|MAP.json",
                   help="place a model larger than one GPU over the visible GPUs with accelerate, then calibrate it; "
                        "the placement is recorded in report.json")
    p.add_argument("--max-memory", default=None, metavar="GPU=SIZE,...",
                   help="with --device-map: weight memory per GPU, e.g. 0=60GiB,1=60GiB (default: 85%% of free)")


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantkit import launch, ptq

    if args.nproc is not None and args.nproc < 1:
        raise InputError(f"--nproc {args.nproc}: needs a count >= 1 (processes to calibrate on)")
    if args.max_memory and not args.device_map:
        raise InputError(f"--max-memory {args.max_memory}: sets the per-GPU budget of --device-map; add "
                         "--device-map auto (or leave --max-memory out)")
    if launch.wants_distributed(args):  # --nproc N, or a rank under torchrun
        return launch.quantize(args)
    return _quantize_in_process(args)


def _quantize_in_process(args: argparse.Namespace) -> int:
    from quantkit import ptq
    from quantkit.errors import require_positive
    from quantkit.outdir import output_lock

    require_positive("--max-samples", args.max_samples)
    require_positive("--batch-size", args.batch_size)
    out = ptq.output_folder(args)
    ptq.check_quantize_output(out, args.calib, args.force)
    with output_lock(out):  # held from the first check to the last write: a second run into OUT exits 2
        return _quantize_into(args, out)


def _quantize_into(args: argparse.Namespace, out) -> int:
    import torch

    import quantkit
    from quantkit import ptq
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    device = ptq.resolve_device(args.device)
    dtype = args.dtype or "fp32"
    console.info(f"recipe {recipe.name} ({recipe.source}) · model {args.model or 'minilm'} · {dtype} on {device}")
    loaded = load_model(args.model)
    placement = None
    if args.device_map:
        from quantkit import placement as placement_mod

        placement = placement_mod.dispatch(loaded.model, args.device_map, device,
                                           placement_mod.parse_max_memory(args.max_memory))
        device = torch.device(placement.main_device)
        console.info(f"placed over {', '.join(placement.bytes_per_device)} ({args.device_map})")
    calibration = ptq.open_calibration(loaded, args.calib, args.synthetic, args.max_samples or recipe.calibration.max_samples)
    console.info(ptq.calibration_summary(calibration))
    qm = quantkit.quantize(loaded, recipe, calibration, device=device, dtype=dtype, batch_size=args.batch_size,
                           strict=args.strict)
    if placement is not None:
        qm.result.placement = placement.to_dict()
    # Staged only now: a run that fails or is killed while calibrating leaves nothing on disk; a failing
    # run does not replace a passing one (OUT.failed) unless --force.
    ptq.write_run(qm.result, out, loaded.spec, dtype, force=args.force, protect=[args.calib])
    return 0 if qm.report else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("plan", help="show which layer gets which precision, and why")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--strict", action="store_true", help="a rule that matches no layer is an error")
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("quantize", help="protect, convert attention, calibrate and quantize; evaluate on held-out data")
    _add_quantize_args(p)
    p.set_defaults(func=cmd_quantize)

    for register in EXTRA_VERBS:
        register(sub)
    return parser


def _add_collect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="built-in name (minilm [default], llama-tiny), a Hugging Face folder, or package.module:function")
    p.add_argument("--data", default=None,
                   help="a .txt/.json/.jsonl/.csv/.parquet file, a `datasets` folder (save_to_disk), an image folder, "
                        "or a built-in set name (default: the model's, e.g. text-en)")
    p.add_argument("--out", required=True, help="the calibration set folder to write")
    p.add_argument("--module", default=None,
                   help="record the inputs of this submodule (dotted name, e.g. denoiser) instead of the whole model")
    p.add_argument("--runner", default=None,
                   help="package.module:function (or file.py:function) called as fn(model, row) to run the pipeline "
                        "on one data row; needed for images and non-text pipelines")
    p.add_argument("--field", default=None, help="the text field of json/csv/parquet/datasets rows (default: text)")
    p.add_argument("--split", default=None, help="the split of a saved DatasetDict (default: train)")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many captured samples")
    p.add_argument("--batch-size", type=int, default=1,
                   help="data rows per model call (default 1: one unpadded sample per row, re-batched at replay)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the calibration set in --out")
    p.add_argument("--synthetic", action="store_true",
                   help="random inputs instead of data (the set is marked synthetic; reports say so)")
    p.add_argument("--seed", type=int, default=0, help="seed for --synthetic and for stochastic pipelines")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="precision the model runs in (default fp32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or info lines")




def cmd_collect(args: argparse.Namespace) -> int:
    """Run a collection from parsed arguments. Raises InputError (exit 2) for bad input."""
    import quantkit

    if getattr(args, "quiet", False):
        console.set_quiet(True)
    try:
        calibration = quantkit.collect(args.model, args.out, data=args.data, module=args.module, field=args.field,
                                       split=args.split, runner=args.runner, max_samples=args.max_samples,
                                       batch_size=args.batch_size, shard_size=args.shard_size, resume=args.resume,
                                       overwrite=args.overwrite, synthetic=args.synthetic, seed=args.seed,
                                       device=args.device, dtype=args.dtype,
                                       progress=not getattr(args, "quiet", False))
    except KeyboardInterrupt:
        print(f"interrupted: completed shards in {args.out} are kept; rerun with --resume", file=sys.stderr)
        return 130
    manifest = calibration.meta
    src = manifest["source"].get("description")
    fields = ", ".join(f"{k} {v.get('dtype', v.get('type'))}" for k, v in list(manifest["fields"].items())[:6])
    console.info(f"{args.out}: {manifest['samples']} samples of {manifest.get('module') or manifest['model_class']} "
                 f"in {len(manifest['shards'])} shards from {src}"
                 + (" (SYNTHETIC)" if manifest.get("synthetic") else "") + f"; fields: {fields}")
    return 0


def _register_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="record the real inputs of a model or submodule as a calibration set")
    _add_collect_args(p)
    p.set_defaults(func=cmd_collect)


def parse_dynamic_axes(items: list[str] | None) -> dict[str, dict[int, str]] | None:
    """--dynamic-axis input_ids:0=batch,1=sequence (repeatable)."""
    if not items:
        return None
    out: dict[str, dict[int, str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name or not rest:
            raise InputError(f"--dynamic-axis {item!r}: expected NAME:AXIS=DIM[,AXIS=DIM...], e.g. input_ids:0=batch,1=seq")
        for part in rest.split(","):
            axis, eq, dim = part.partition("=")
            if not eq or not axis.strip().lstrip("-").isdigit() or not dim.strip():
                raise InputError(f"--dynamic-axis {item!r}: {part!r} is not AXIS=DIM")
            out.setdefault(name, {})[int(axis)] = dim.strip()
    return out


def cmd_export(args: argparse.Namespace) -> int:
    import quantkit
    from quantkit.errors import require_positive
    from quantkit.export.audit import print_audit
    from quantkit.verify.compile_check import print_compile_check
    from quantkit.verify.reference import print_reference

    require_positive("--max-samples", args.max_samples)
    # Without --trust-model-code: None, nothing trusted beyond what an enclosing model_trust says (no one).
    with quantkit.load(args.out_dir, args.model, args.device,
                       trust_model_code=True if args.trust_model_code else None) as qm:
        result = qm.export(args.out_dir, audit=not args.no_audit, reference=not args.no_reference,
                           dynamic_axes=parse_dynamic_axes(args.dynamic_axis), opset=args.opset,
                           weights_dtype=args.weights_dtype, reference_samples=args.max_samples,
                           compile_check=not args.no_compile_check, targets=args.target or None)
    info = result.info
    console.show(console.rows_table(
        "export", ("what", "value"),
        [("graph", f"{result.onnx_path} ({info['size_bytes'] / 2**20:.1f} MiB"
          + (", external data" if result.external_data else "") + ")"),
         ("opset", str(info["opset"])),
         ("inputs", ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in info["inputs"])),
         ("outputs", ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in info["outputs"])),
         ("TensorRT", f">= {info['min_tensorrt_version']}"),
         ("surgery", ", ".join(f"{k} {v}" for k, v in info["surgery"]["passes"].items()) or "none")]))
    status = 0
    if result.audit is not None:  # written with the graph, as one unit (export_run)
        print_audit(result.audit)
        status = 0 if result.audit else 1
    if result.reference is not None:
        print_reference(result.reference)
    if result.compile_check is not None:  # TensorRT's (or TensorRT-RTX's) parser and builder, per target
        print_compile_check(result.compile_check)
        status = status or (0 if result.compile_check else 1)
    return status


def _register_export(sub: argparse._SubParsersAction) -> None:
    from quantkit.runtime.tensorrt.targets import TARGET_SYNTAX

    p = sub.add_parser("export", help="export a quantize output folder to ONNX (model.onnx, export.json), audit it, "
                       "compare ONNX Runtime with the PyTorch model and compile it with TensorRT(-RTX)")
    p.add_argument("--from", dest="out_dir", required=True, metavar="OUT",
                   help="a `quantize --out` folder; model.onnx, export.json and audit.json are written into it")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the recipe's, else the lowest "
                   "the formats need: 19 for FP8/INT8, 23 for NVFP4)")
    p.add_argument("--dynamic-axis", action="append", default=None, metavar="NAME:AXIS=DIM[,...]",
                   help="dynamic dimension(s) of an input or output (repeatable); default: the recipe's, else "
                   "batch (and sequence for token models)")
    p.add_argument("--weights-dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="float dtype of unquantized weights (default: the recipe's export.weights_dtype)")
    p.add_argument("--device", default="cpu", help="device to rebuild the model on for the export (default cpu)")
    p.add_argument("--no-audit", action="store_true", help="skip the precision audit of the exported graph")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the ONNX Runtime reference run (outputs vs fake-quant and FP32 into report.json)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="held-out samples for the ONNX Runtime reference run (>= 1; default: all of them)")
    p.add_argument("--target", action="append", default=[], metavar="TARGET",
                   help="compile check for " + TARGET_SYNTAX + " (repeatable; default: the recipe's targets)")
    p.add_argument("--no-compile-check", action="store_true",
                   help="skip the TensorRT / TensorRT-RTX parse and build of the exported graph")
    add_trust_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_export)


def cmd_audit(args: argparse.Namespace) -> int:
    import quantkit
    from quantkit.export.audit import print_audit

    result = quantkit.audit(args.onnx, args.plan, against_plan=not args.no_plan, out=args.out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_audit(result)
    return 0 if result else 1


def _register_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="read an exported graph's precisions (Q/DQ, softmax, norms, RoPE) and check "
                       "them against the plan; exit 1 on a violation")
    p.add_argument("onnx", help="the graph to audit (e.g. OUT/model.onnx)")
    p.add_argument("--plan", default=None, help="plan.json to check against (default: plan.json beside the graph, "
                   "if there is one)")
    p.add_argument("--no-plan", action="store_true", help="report only; do not check against a plan")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    p.add_argument("--out", default=None, help="where to write audit.json (default: beside the graph)")
    p.add_argument("-q", "--quiet", action="store_true", help="no info lines")
    p.set_defaults(func=cmd_audit)


def cmd_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantkit.recipe import load_recipe
    from quantkit.runtime.tensorrt import ShapeProfile, build_from_output_dir, parse_profile_specs, profile_sets
    from quantkit.runtime.tensorrt.targets import targets_for

    recipe_file = Path(args.out_dir) / "recipe.yaml"
    recipe = load_recipe(recipe_file) if recipe_file.is_file() else None
    # The recipe's build profiles, input by input, unless --shape names the same input.
    per_input: dict[str, list[ShapeProfile]] = {}
    for profile in recipe.build.profile_list() if recipe else []:
        for name, r in profile.items():
            per_input.setdefault(name, []).append(ShapeProfile(name, tuple(r.min), tuple(r.opt), tuple(r.max)))
    given: dict[str, list[ShapeProfile]] = {}
    for shapes in parse_profile_specs(args.shape):
        for p in shapes:
            given.setdefault(p.name, []).append(p)
    per_input.update(given)
    targets = targets_for(args.target or (recipe.targets if recipe else []))
    r = build_from_output_dir(args.out_dir, profile_sets(per_input) or None, workspace_gib=args.workspace_gib,
                              opt_level=args.opt_level, cuda_graph_friendly=args.cuda_graph, targets=targets,
                              recipe_name=recipe.name if recipe else None,
                              recipe_sha256=recipe.sha256() if recipe else None)
    m = r.metadata
    where = (f"compiled by TensorRT-RTX {m.tensorrt_version} for {', '.join(t.sm for t in m.targets)}"
             if m.backend == "tensorrt-rtx" else f"{m.gpu_name}, TensorRT {m.tensorrt_version}")
    console.info(f"engine {r.engine_path} ({where}, {m.engine_bytes / 2**20:.1f} MiB, {len(m.profiles) or 1} "
                 f"profile(s), {r.build_time_s:.1f} s); script {r.script_path}")
    if m.note:
        console.warn(m.note)
    return 0


def _register_build(sub: argparse._SubParsersAction) -> None:
    from quantkit.runtime.tensorrt import DEFAULT_WORKSPACE_GIB, PROFILES_SYNTAX
    from quantkit.runtime.tensorrt.targets import TARGET_SYNTAX

    p = sub.add_parser("build", help="build a strongly-typed TensorRT engine from an export folder (TensorRT where it "
                                     "imports, else a TensorRT-RTX ahead-of-time compile); always writes build_engine.sh")
    p.add_argument("--from", dest="out_dir", required=True, metavar="OUT_DIR")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:MIN,OPT,MAX[;...]",
                   help="build shapes of one input: " + PROFILES_SYNTAX + " (repeat per input)")
    p.add_argument("--target", action="append", default=[], metavar="TARGET",
                   help="TensorRT-RTX: what to compile for, " + TARGET_SYNTAX + " (repeatable; default: the recipe's "
                        "targets). Datacenter TensorRT builds for the GPU it runs on")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB)
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimization level")
    p.add_argument("--cuda-graph", action="store_true", help="check that the graph allows CUDA-graph replay")
    _add_common(p)
    p.set_defaults(func=cmd_build)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from quantkit import ptq, sensitivity
    from quantkit.models import load_model
    from quantkit.outdir import atomic_write_json, atomic_write_text, write_marker
    from quantkit.recipe import load_recipe

    if not -1.0 < args.target <= 1.0:
        raise InputError(f"--target {args.target}: a cosine target lies in (-1, 1], e.g. 0.99")
    recipe = load_recipe(args.recipe)
    device = ptq.resolve_device(args.device)
    loaded = load_model(args.model)
    calibration = ptq.open_calibration(loaded, args.calib, False, args.max_samples)
    out = Path(args.out) if args.out else Path("runs") / f"sensitivity-{ptq._default_out(args.recipe, args.model).name}"
    made = [loaded]  # the first model is reused for the analysis; later calls load afresh

    def make_loaded():
        return made.pop() if made else load_model(args.model)

    result = sensitivity.analyse(make_loaded, recipe, calibration, target_cosine=args.target,
                                 granularity=args.granularity, dtype=args.dtype or "fp32", device=device,
                                 batch_size=args.batch_size)
    atomic_write_json(out / sensitivity.RESULT_FILE, result.to_dict())
    atomic_write_text(out / sensitivity.SUGGESTION_FILE, result.override_yaml())
    write_marker(out, "sensitivity")  # the folder is a quantkit output (quantkit.outdir)
    console.show(console.rows_table(
        f"sensitivity of {recipe.name} by {result.granularity} (final-output cosine with only this unit quantized)",
        ("rank", "unit", "layers", "cosine", "damage", "kept"),
        [(i + 1, u.name, len(u.layers), f"{u.cosine:.6f}", f"{u.damage:.2e}",
          "yes" if (u.attention and result.keep_attention) or (u.layers and set(u.layers) <= set(result.keep)) else "")
         for i, u in enumerate(result.units)]))
    verdict = "reaches" if result.reached else "does NOT reach"
    what = f"{len(result.keep)} layer(s)" + (" and the attention matmuls" if result.keep_attention else "")
    # The verdict is a result, printed under --quiet too (which silences progress only).
    print(f"full recipe cosine {result.full_cosine:.6f}; keeping {what} in higher precision {verdict} "
          f"{result.target_cosine} ({result.reached_cosine:.6f} on {result.heldout_samples} held-out of "
          f"{result.samples} samples). Suggested override ({out / sensitivity.SUGGESTION_FILE}; use it with "
          f"--recipe and --max-samples {result.samples}):")
    print(result.override_yaml())
    return 0 if result.reached else 1


def _register_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="rank recipe rules/layers by the damage they do; suggest what to keep")
    _add_model_args(p)
    p.add_argument("--calib", default=None, help="calibration set folder (default: the model's built-in set)")
    p.add_argument("--max-samples", type=int, default=64, help="calibration samples, the recipe's held-out share of them for evaluation (default 64)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration/evaluation batch size")
    p.add_argument("--target", type=float, default=0.99, help="cosine the suggestion must reach (default 0.99)")
    p.add_argument("--granularity", choices=("auto", "rule", "block", "layer"), default="auto",
                   help="unit quantized alone (auto: layer for <= 64 quantized layers, else block)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="folder for sensitivity.json and suggested-recipe.yaml "
                                               "(default: runs/sensitivity-<recipe>-<model>)")
    _add_common(p)
    p.set_defaults(func=cmd_sensitivity)


def cmd_autotune(args: argparse.Namespace) -> int:
    from quantkit import autotune

    result, out = autotune.run(args.recipe, args.model, target_cosine=args.target,
                               max_linear_bytes=args.max_linear_bytes, dtype=args.dtype, device=args.device,
                               calib=args.calib, max_samples=args.max_samples, batch_size=args.batch_size,
                               out=args.out,
                               nvfp4_algorithm=None if args.nvfp4_algorithm == "none" else args.nvfp4_algorithm)
    console.show(console.rows_table(
        f"autotune of {result.recipe.name}: steps down the precision ladder", ("step", "action", "unit", "to",
                                                                               "cosine", "linear bytes"),
        [(s.get("step", ""), s["action"], s.get("unit", ""), s.get("to", ""), f"{s['cosine']:.6f}",
          s.get("linear_bytes", "")) for s in result.steps if "cosine" in s]))
    if result.reached:
        # The verdict is a result, printed under --quiet too.
        print(f"{result.recipe.name}: cosine {result.start_cosine:.6f} -> {result.reached_cosine:.6f} (target "
              f"{result.target_cosine}) with {len(result.changes())} unit(s) moved; quantized-linear weights "
              f"{result.start_bytes} -> {result.linear_bytes} bytes; recipe {out / autotune.RECIPE_FILE}, steps "
              f"{out / autotune.RESULT_FILE}, plot {out / 'report.html'}")
        return 0
    print(f"target {result.target_cosine} NOT reached: the best cosine found was {result.best_cosine:.6f} "
          f"({result.recipe.name} alone: {result.start_cosine:.6f}); steps in {out / autotune.RESULT_FILE}",
          file=sys.stderr)
    return 1


def _register_autotune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("autotune", help="move layers down the precision ladder (nvfp4 -> nvfp4-gptq -> nvfp4-w4a8-gptq "
                                        "-> fp8 -> 16-bit -> "
                                        "skip), zero-byte steps with a gain first, then the best measured cosine "
                                        "gain per byte, until a target cosine")
    _add_model_args(p)
    p.add_argument("--target", type=float, required=True, help="held-out cosine to reach, e.g. 0.99")
    p.add_argument("--max-linear-bytes", type=int, default=None,
                   help="never let the quantized linears' weights exceed this many bytes")
    p.add_argument("--calib", default=None, help="calibration set folder (default: the model's built-in set)")
    p.add_argument("--max-samples", type=int, default=None, help="calibration samples (default: all; the recipe's "
                                                                 "held-out share of them evaluates)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration/evaluation batch size")
    p.add_argument("--device", default=None)
    from quantkit.recipe import DEFAULT_NVFP4_ALGORITHM, WEIGHT_ALGORITHMS, Precision

    p.add_argument("--nvfp4-algorithm", default=DEFAULT_NVFP4_ALGORITHM,
                   choices=[a for a, fits in WEIGHT_ALGORITHMS.items() if Precision.NVFP4 in fits] + ["none"],
                   help="the NVFP4 weight algorithm of the rung tried after an NVFP4 rule that names none "
                        f"(default {DEFAULT_NVFP4_ALGORITHM}; none: no such rung)")
    p.add_argument("--out", default=None, help="folder for autotune.json, autotuned-recipe.yaml and report.html "
                                               "(default: runs/autotune-<recipe>-<model>)")
    _add_common(p)
    p.set_defaults(func=cmd_autotune)


def cmd_compare(args: argparse.Namespace) -> int:
    from quantkit import compare, ptq

    result = compare.compare(args.out_dir, against=args.against, runtimes=compare.parse_runtimes(args.runtime),
                             max_samples=args.max_samples, batch_size=args.batch_size,
                             device=ptq.resolve_device(args.device), model=args.model,
                             trust_model_code=True if args.trust_model_code else None)
    compare.print_comparison(result)
    return 0 if result else 1


def _register_compare(sub: argparse._SubParsersAction) -> None:
    from quantkit.compare import CANDIDATES, REFERENCES

    p = sub.add_parser("compare", help="run every available runtime of a quantize output folder on its held-out "
                                       "samples against a reference; update its reports; exit 1 below the recipe's gate")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder of `quantkit quantize --out`")
    p.add_argument("--against", choices=REFERENCES, default="fp32",
                   help="the reference every other runtime is compared with (default fp32)")
    p.add_argument("--runtime", action="append", default=[], metavar="NAME[,NAME]",
                   help=f"only these runtimes ({', '.join(CANDIDATES)}); one named here must be available "
                        "(default: all, the unavailable ones recorded with the reason)")
    p.add_argument("--max-samples", type=int, default=None, help="compare on at most this many held-out samples")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the recipe's)")
    p.add_argument("--device", default=None, help="where the PyTorch models run: cpu or cuda[:N] (default: cuda if "
                                                   "available)")
    add_trust_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare_recipes(args: argparse.Namespace) -> int:
    from quantkit import compare_recipes, ptq

    result = compare_recipes.compare_recipes(
        compare_recipes.parse_recipes(args.recipes), args.model, dtype=args.dtype or "fp32",
        device=ptq.resolve_device(args.device), calib=args.calib, synthetic=args.synthetic,
        max_samples=args.max_samples, batch_size=args.batch_size)
    out = compare_recipes.write_comparison(result, args.out or compare_recipes.default_out(args.model))
    compare_recipes.print_comparison(result, out)
    return 1 if args.gate and not result else 0


def _register_compare_recipes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare-recipes", help="quantize one model under several recipes against one FP32 "
                                               "reference; side-by-side coverage, weight bytes and accuracy")
    p.add_argument("--recipes", required=True, metavar="A,B,...",
                   help="comma-separated shipped recipe names or YAML files, e.g. balanced,fp8,nvfp4")
    p.add_argument("--model", default=None,
                   help="built-in name (minilm [default], llama-tiny), a Hugging Face folder, or package.module:function")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="precision the model runs in (default fp32)")
    p.add_argument("--calib", default=None, help="calibration set folder (default: the model's built-in set)")
    p.add_argument("--synthetic", action="store_true", help="calibrate on random inputs (the comparison says so)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="calibration samples, shared by every recipe (the recipes' held-out share evaluates)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration/evaluation batch size, shared")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="folder for comparison.json/.md/.html (default: runs/compare-<model>)")
    p.add_argument("--gate", action="store_true",
                   help="exit 1 when any recipe misses its thresholds (default: exit 0, the comparison is information)")
    _add_common(p)
    p.set_defaults(func=cmd_compare_recipes)


# Verbs that live with their stage: each adds its own subparser.
EXTRA_VERBS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_collect, _register_export, _register_audit, _register_build, _register_sensitivity, _register_autotune,
    _register_compare, _register_compare_recipes]


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # The verb's own arguments as typed (argv[0] is the verb: the top level has no other option):
    # `--nproc` hands the ranks the user's own arguments (quantkit.launch), which adds the verb itself.
    args.argv = argv[1:]
    console.set_quiet(getattr(args, "quiet", False))
    try:
        with console.quiet_warnings():
            return int(args.func(args) or 0)
    except InputError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except QuantkitError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: no output folder was changed", file=sys.stderr)
        return 130


def quantize_main(argv: Sequence[str] | None = None) -> int:
    return main(["quantize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
