"""`quantize` on several processes. `--nproc N` starts torchrun's engine (torch.distributed.elastic)
with N copies of the same command; under torchrun (`torchrun --nproc-per-node N -m quantkit
quantize ...`) each copy is a rank: it calibrates its shard (quantkit.distributed), and rank 0 alone
runs the FP32 reference and the evaluation and writes the output folder, atomically, after every
collective is done. A rank that fails exits non-zero; torchrun then stops the others, and the
command exits naming that rank, with nothing written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

from quantkit.errors import InputError, QuantkitError

STATUS_ENV = "QUANTKIT_DP_STATUS_DIR"  # set by --nproc: where each rank leaves its outcome


class RankFailure(QuantkitError):
    """A rank of a data-parallel run failed; exit code is that rank's."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def wants_distributed(args) -> bool:
    from quantkit.distributed import DataParallel

    return (getattr(args, "nproc", None) or 1) > 1 or DataParallel.from_env() is not None


def quantize(args) -> int:
    """`quantize --nproc N` (launch the ranks) or one rank under torchrun."""
    from quantkit.distributed import DataParallel

    dp = DataParallel.from_env()
    if dp is None:
        return launch(args)
    return run_rank(args, dp)


# ---------------------------------------------------------------------------------------------
# The launcher


def rank_argv(argv: list[str], drop: set[str]) -> list[str]:
    """The command line the ranks run: the user's own `quantize` arguments (`argv`, as typed) less the
    options in `drop` (e.g. --nproc, which launched them), in either spelling (--opt V, --opt=V)."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        flag, eq, _ = item.partition("=")
        if flag in drop:
            skip = not eq
            continue
        out.append(item)
    return out


@contextlib.contextmanager
def _quiet_elastic() -> Iterator[None]:
    # The agent logs each worker failure with a traceback hint; quantkit prints its own one-line cause.
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.launcher")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def launch(args) -> int:
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from quantkit.ptq import output_folder

    n = args.nproc
    if args.device_map:
        raise InputError("--device-map places one copy of the model over several GPUs in one process; --nproc runs "
                         "one copy per GPU: use one or the other")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if device != "cuda":
            raise InputError(f"--device {device} with --nproc {n}: each rank takes cuda:<its local rank>; pass --device cuda")
        if torch.cuda.device_count() < n:
            raise InputError(f"--nproc {n}: only {torch.cuda.device_count()} CUDA device(s) are visible; one rank "
                             "needs one GPU (or calibrate on --device cpu)")
    elif device != "cpu":
        raise InputError(f"--device {device}: use cpu or cuda")
    out = output_folder(args)
    from quantkit.errors import require_positive
    from quantkit.ptq import check_quantize_output

    require_positive("--max-samples", args.max_samples)
    require_positive("--batch-size", args.batch_size)
    check_quantize_output(out, args.calib, bool(getattr(args, "force", False)))  # before any rank starts
    existed = out.exists()
    argv = ["-m", "quantkit", "quantize", *rank_argv(args.argv, {"--nproc", "--device"}), "--device", device]
    status = Path(tempfile.mkdtemp(prefix="quantkit-dp-"))
    saved = {k: os.environ.get(k) for k in (STATUS_ENV, "OMP_NUM_THREADS")}
    os.environ[STATUS_ENV] = str(status)
    if "OMP_NUM_THREADS" not in os.environ:  # ranks share the cores: don't oversubscribe them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"quantkit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        with _quiet_elastic():
            elastic_launch(config, sys.executable)(*argv)
        return _status(status).get(0, {}).get("exit_code", 0)
    except ChildFailedError as e:
        raise _failure(e, _status(status), n, out, existed) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for f in status.glob("*"):
            f.unlink(missing_ok=True)
        status.rmdir()


def _status(folder: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for f in folder.glob("rank-*.json"):
        try:
            data = json.loads(f.read_text())
            out[int(data["rank"])] = data
        except (OSError, ValueError, KeyError):
            continue
    return out


def _failure(e: Any, status: dict[int, dict[str, Any]], n: int, out: Path, existed: bool) -> QuantkitError:
    """One error naming the rank that failed first (the others were stopped because of it)."""
    errors = {r: s for r, s in status.items() if s.get("kind") == "error"}
    result = status.get(0, {})
    if not errors and result.get("kind") == "result":
        # Rank 0 finished and wrote the folder; a non-zero code is its accuracy gate (already printed).
        return AccuracyGateFailed(result.get("exit_code", 1))
    kept = f"{out} is as it was" if existed else f"no output folder was created at {out}"
    primary = {r: s for r, s in errors.items() if not s.get("secondary")} or errors
    if primary:
        rank = min(primary, key=lambda r: primary[r].get("time", 0.0))
        s = primary[rank]
        return RankFailure(f"rank {rank} of {n} failed: {s['error']}; the other ranks were stopped; {kept}",
                           int(s.get("exit_code", 1)))
    rank, failure = e.get_first_failure()
    code = failure.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            how = f"was killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == 9 else "")
    return RankFailure(f"rank {rank} of {n} {how} before reporting an error; the other ranks were stopped; {kept}")


class AccuracyGateFailed(QuantkitError):
    """Rank 0 wrote the run and its accuracy gate failed: exit 1 quietly, as the one-process run does."""

    def __init__(self, exit_code: int):
        super().__init__("the accuracy gate failed (see the table above)")
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# One rank


def _write_status(rank: int, data: dict[str, Any]) -> bool:
    """Leave this rank's outcome for the --nproc launcher; False when there is none to read it."""
    folder = os.environ.get(STATUS_ENV)
    if not folder:
        return False
    from quantkit.outdir import atomic_write_json

    try:
        atomic_write_json(Path(folder) / f"rank-{rank}.json", {"rank": rank, "time": time.time(), **data})
    except OSError:
        return False
    return True


def run_rank(args, dp) -> int:
    """This process's part of the run; on any failure: say which rank and why, then exit at once."""
    from quantkit.distributed import PeerFailure

    try:
        return _quantize_rank(args, dp)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher and end this rank
        code = (e.exit_code if isinstance(e, QuantkitError) else 130 if isinstance(e, KeyboardInterrupt)
                else e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
        code = code or 1
        message = f"{type(e).__name__}: {e}"
        reported = _write_status(dp.rank, {"kind": "error", "error": message, "exit_code": code,
                                           "secondary": isinstance(e, PeerFailure)})
        expected = isinstance(e, (QuantkitError, KeyboardInterrupt, SystemExit))
        if reported and expected:
            pass  # the --nproc launcher prints the one line that names the rank and the cause
        elif isinstance(e, PeerFailure):
            print(f"{e}", file=sys.stderr)
        else:
            print(f"{dp.label} failed: {message}", file=sys.stderr)
            if not expected:
                traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave without the process group's teardown, which could wait on the ranks still running.
        os._exit(code)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While rank 0 writes the folder, SIGTERM (torchrun stopping the job) unwinds the staging instead of
    leaving a temporary folder behind."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quantize_rank(args, dp) -> int:
    import quantkit
    from quantkit import console, ptq
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    if args.device_map:
        raise InputError("--device-map places one copy of the model over several GPUs in one process; torchrun runs "
                         "one copy per GPU: use one or the other")
    if args.nproc not in (None, dp.world_size):
        raise InputError(f"--nproc {args.nproc} under torchrun (world size {dp.world_size}): --nproc launches torchrun "
                         "itself; leave it out")
    # ModelOpt warns once per quantized module class that no parallel state was set: for pure data
    # parallelism its default (the whole world as the data-parallel group) is the right one.
    warnings.filterwarnings("ignore", message="Distributed training is initialized but no parallel_state")
    if not dp.is_main:
        warnings.simplefilter("ignore")  # rank 0 shows them once

    def info(message: str) -> None:
        if dp.is_main:
            console.info(message)

    recipe = load_recipe(args.recipe)
    device = dp.resolve_device(args.device)
    dp.init(device)
    dtype = args.dtype or "fp32"
    out = ptq.output_folder(args)
    info(f"recipe {recipe.name} ({recipe.source}) · model {args.model or 'minilm'} · {dtype} · "
         f"{dp.world_size} ranks ({dp.backend}, rank 0 on {device})")
    loaded = load_model(args.model)
    calibration = ptq.open_calibration(loaded, args.calib, args.synthetic,
                                       args.max_samples or recipe.calibration.max_samples)
    batch_size = args.batch_size or recipe.calibration.batch_size
    calib_part, _ = ptq.split_calibration(calibration, recipe)
    _, shards = dp.shards(calib_part, batch_size)
    info(ptq.calibration_summary(calibration)
         + f"; {len(calib_part)} calibrate, in batches of {batch_size}: "
         + ", ".join(f"rank {s.rank} {s.samples} ({len(s.batches)} batches)" for s in shards))
    if not dp.is_main:
        # Its progress bar (stderr) is all this rank shows; ModelOpt's prints would repeat rank 0's.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            ptq.quantize_model(loaded, recipe, calib_part, dtype=dtype, device=device, batch_size=batch_size,
                               strict=args.strict, data_parallel=dp)
        dp.close()
        return 0
    qm = quantkit.quantize(loaded, recipe, calibration, dtype=dtype, device=device, batch_size=batch_size,
                           strict=args.strict, data_parallel=dp)
    qm.result.data_parallel = dp.describe(calib_part, batch_size)
    last = qm.result.data_parallel.get("passes", [{}])[-1]
    info(f"calibrated {len(calib_part)} samples on {dp.world_size} ranks ("
         + ", ".join(f"rank {r['rank']}: {r['samples']} in {r['forward_s']:.2f} s" for r in last.get("ranks", []))
         + f"); statistics of {last.get('quantizers_reduced', 0)} quantizers reduced in {last.get('reduce_s', 0):.3f} s")
    # Every collective is done: the other ranks may already have exited. Only now is anything written.
    with _terminate_raises():
        ptq.write_run(qm.result, out, loaded.spec, dtype, force=bool(getattr(args, "force", False)),
                      protect=[args.calib])
    code = 0 if qm.report else 1
    _write_status(dp.rank, {"kind": "result", "exit_code": code, "out": str(out)})
    dp.close()
    return code
