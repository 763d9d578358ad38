"""Data-parallel calibration: each rank calibrates a shard of whole batches, then the ranks reduce
ModelOpt's statistics so that every rank holds the amax one process over all samples would compute.

Exactness, and why it holds (max calibration):
- ModelOpt's MaxCalibrator keeps a running elementwise max of |x| per quantizer (per tensor or per
  channel). max is exact and associative, so max over ranks of (max over each rank's batches) is
  bit for bit the max over all batches, provided every batch's forward pass is the same as in the
  single-process run.
- It is the same because the shards are whole batches of the single-process run: the batch
  groups come from `CalibrationSet.batch_groups(batch_size)` over the full calibration split
  (same samples, same padding, same tensor shapes), and contiguous runs of those batches go to the
  ranks. Sharding by sample instead would re-form batches: padded positions are fed to the model
  and counted by the input quantizers (pad rows change amax), and a matmul over a different
  number of rows may round differently.
- The reduction happens at the end of the forward loop, on the calibrators' statistics, before
  ModelOpt turns them into amax. ModelOpt 0.47's own data-parallel step (max_calibrate's
  `sync_amax_across_distributed_group`, an all-reduce MAX of each `_amax` over the default group)
  then finds equal values and changes nothing. Reducing first matters: ModelOpt skips a quantizer
  whose amax is None on one rank (a rank with no batch, a branch it never took), so the ranks would
  pair different tensors in their collectives. Here the presence of every statistic is agreed
  first and a missing one joins the MAX as -inf.

Other calibrators: SmoothQuant (per-channel max, then arithmetic on the reduced amax and the
weights) and the `mse` algorithm (max for activations, a data-free search on weights) stay exact.
Histogram calibrators (rule calibrator percentile/entropy/mse) and AWQ are refused: a histogram's
bin width is set by the first batch each process sees, and awq_lite averages per-rank means
(ModelOpt all-reduces them with AVG) and sums losses in another order; neither can reproduce the
single-process numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from quantkit.errors import InputError, QuantkitError

if TYPE_CHECKING:
    from torch import nn

    from quantkit.calib import CalibrationSet
    from quantkit.plan import Plan

# Test hook (like calib's QUANTKIT_COLLECT_CRASH): QUANTKIT_DP_FAIL_RANK=<rank> makes that rank raise
# at its first calibration batch, as a bad sample or an out-of-memory would.
FAIL_RANK_ENV = "QUANTKIT_DP_FAIL_RANK"
TIMEOUT_ENV = "QUANTKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # rank 0 computes the FP32 reference while the others wait at the first collective


class PeerFailure(QuantkitError):
    """A collective failed on this rank because another rank stopped (that rank reports the cause)."""


# ---------------------------------------------------------------------------------------------
# Sharding


@dataclasses.dataclass(frozen=True)
class RankShard:
    rank: int
    batches: tuple[int, ...]  # positions in the single-process batch list
    samples: int

    def to_dict(self) -> dict[str, Any]:
        first, last = (self.batches[0], self.batches[-1]) if self.batches else (None, None)
        return {"rank": self.rank, "batches": len(self.batches), "first_batch": first, "last_batch": last,
                "samples": self.samples}


def shard_batches(batch_sizes: Sequence[int], world_size: int) -> list[RankShard]:
    """Contiguous runs of whole batches, one per rank; counts differ by at most one batch.

    Ranks 0..(n mod world)-1 take one extra batch; with more ranks than batches the last ranks get
    none (they still join the reduction). Depends only on (batch sizes, world size).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    base, extra = divmod(len(batch_sizes), world_size)
    shards, start = [], 0
    for rank in range(world_size):
        count = base + (1 if rank < extra else 0)
        batches = tuple(range(start, start + count))
        shards.append(RankShard(rank, batches, sum(int(batch_sizes[i]) for i in batches)))
        start += count
    return shards


# ---------------------------------------------------------------------------------------------
# What cannot be reduced exactly


def unsupported_calibration(plan: "Plan") -> list[str]:
    """Why this plan cannot be calibrated data-parallel with the single-process result (empty: it can)."""
    from quantkit.modelopt_config import histogram_calibrated_quantizers
    from quantkit.plan import calibration_algorithm

    problems = []
    algo = calibration_algorithm(plan)
    if algo == "awq":
        problems.append("algorithm awq: awq_lite averages per-rank activation means (ModelOpt all-reduces them "
                        "with AVG) and sums search losses in a different order, so the scales differ from one process")
    methods: dict[str, int] = {}
    for method in histogram_calibrated_quantizers(plan).values():
        methods[method] = methods.get(method, 0) + 1
    for method, n in sorted(methods.items()):
        problems.append(f"calibrator {method} on {n} layer(s): a histogram whose bin width is set by the first batch "
                        "each process sees, so per-rank histograms cannot be merged into the single-process one")
    algorithms = sorted({row.algorithm for row in plan.layers if row.algorithm})
    if algorithms:
        problems.append(f"rule algorithm(s) {', '.join(algorithms)}: each runs its own pass over the calibration "
                        "data in one process (quantkit does not reduce their statistics across ranks)")
    return problems


def check_plan(plan: "Plan") -> None:
    problems = unsupported_calibration(plan)
    if problems:
        raise InputError(f"recipe {plan.recipe.name}: data-parallel calibration would not reproduce the "
                         "single-process result: " + "; ".join(problems)
                         + ". Calibrate in one process (leave out --nproc / torchrun), or use calibrator max")


# ---------------------------------------------------------------------------------------------
# The process group


@dataclasses.dataclass
class DataParallel:
    """This process's place in a torchrun job, and the collectives of data-parallel calibration."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None = None
    device: torch.device | None = None
    # Filled by the forward loop: per-rank timings and the reduction summary, for report.json.
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    _sharded: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls) -> "DataParallel | None":
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or None outside torchrun."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        try:
            return cls(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                       local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        except ValueError:
            raise InputError(f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                             "not integers; launch with torchrun or quantize --nproc") from None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world_size}"

    def resolve_device(self, requested: str | None) -> torch.device:
        """cpu (gloo) or this rank's GPU, cuda:<local rank> (NCCL)."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cpu":
            return torch.device("cpu")
        if requested.startswith("cuda"):
            if requested != "cuda" and self.world_size > 1:
                raise InputError(f"--device {requested}: with several ranks each rank uses cuda:<local rank>; "
                                 "pass --device cuda")
            if not torch.cuda.is_available():
                raise InputError(f"--device {requested}: no CUDA device is available here; use --device cpu")
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise InputError(f"{self.label}: local rank {self.local_rank} needs a GPU of its own, but only {count} "
                                 "CUDA device(s) are visible; use --nproc <= the GPU count")
            return torch.device("cuda", self.local_rank) if requested == "cuda" else torch.device(requested)
        raise InputError(f"--device {requested}: use cpu or cuda")

    def init(self, device: torch.device) -> None:
        """Join the process group: NCCL for GPUs, gloo for the CPU."""
        import torch.distributed as dist

        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        if dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives ---------------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """A collective that breaks because another rank died: this rank stops with a PeerFailure."""
        import torch.distributed as dist

        try:
            yield
        except (RuntimeError, dist.DistBackendError) as e:
            raise PeerFailure(f"{self.label} stopped: another rank failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self._collective():
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        with self._collective():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)

    # -- calibration ---------------------------------------------------------------------------

    def shards(self, calib_part: "CalibrationSet", batch_size: int) -> tuple[list[list[int]], list[RankShard]]:
        """The set's batches and this job's split of them; computed once per set (batch_groups reads
        every sample), then reused by the summary, the forward loop and the report."""
        if self._sharded is None or self._sharded[0] is not calib_part or self._sharded[1] != batch_size:
            groups = calib_part.batch_groups(batch_size)
            self._sharded = (calib_part, batch_size, groups, shard_batches([len(g) for g in groups], self.world_size))
        return self._sharded[2], self._sharded[3]

    def forward_loop(self, calib_part: "CalibrationSet", *, batch_size: int, device: torch.device | str,
                     dtype: torch.dtype | None, progress: bool = True,
                     wrap: Callable | None = None) -> Callable[["nn.Module"], None]:
        """A forward_loop for mtq.quantize: this rank's batches, then the cross-rank reduction.
        `wrap` (e.g. quantkit.max_calibration.device_max_calibration) wraps this rank's own loop, so
        that its statistics are in the calibrators before the reduction reads them."""
        groups, shards = self.shards(calib_part, batch_size)
        mine = shards[self.rank]
        inner = calib_part.forward_loop(batch_size, device=device, dtype=dtype, progress=progress,
                                        groups=[groups[i] for i in mine.batches],
                                        desc=f"calibrate {self.label} ({mine.samples} of {len(calib_part)} samples)")
        if wrap is not None:
            inner = wrap(inner)

        def loop(model: "nn.Module") -> None:
            self._check_same_job(model, len(calib_part), groups)
            if os.environ.get(FAIL_RANK_ENV) == str(self.rank):
                raise QuantkitError(f"injected failure on rank {self.rank} ({FAIL_RANK_ENV})")
            t0 = time.perf_counter()
            inner(model)
            forward_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = reduce_max_statistics(model, self)
            reduce_s = time.perf_counter() - t0
            per_rank = self.gather({"rank": self.rank, "device": str(self.device), "samples": mine.samples,
                                    "forward_s": round(forward_s, 4)})
            self.record.setdefault("passes", []).append(
                {"ranks": per_rank, "reduce_s": round(reduce_s, 4), **summary})

        return loop

    def _check_same_job(self, model: "nn.Module", samples: int, groups: list[list[int]]) -> None:
        """Every rank must hold the same weights and the same batches, or the reduction means nothing."""
        mine = {"weights": weights_fingerprint(model), "samples": samples,
                "batches": hashlib.sha256(repr(groups).encode()).hexdigest()}
        everyone = self.gather(mine)
        for r, theirs in enumerate(everyone):
            if theirs["weights"] != mine["weights"]:
                raise QuantkitError(f"rank {r} holds different weights than rank {self.rank}: the model loader is "
                                    "not deterministic (seed its random initialization or load saved weights)")
            if theirs["samples"] != samples or theirs["batches"] != mine["batches"]:
                raise QuantkitError(f"rank {r} sees a different calibration set than rank {self.rank} "
                                    f"({theirs['samples']} vs {samples} samples): pass the same --calib to every rank")

    def describe(self, calib_part: "CalibrationSet", batch_size: int) -> dict[str, Any]:
        """What report.json records under "data_parallel"."""
        _, shards = self.shards(calib_part, batch_size)
        return {"world_size": self.world_size, "backend": self.backend,
                "sharding": "contiguous runs of whole single-process batches",
                "reduction": "MAX of ModelOpt calibrator statistics across ranks before amax is computed (exact)",
                "batch_size": batch_size, "samples": sum(s.samples for s in shards),
                "shards": [s.to_dict() for s in shards], **self.record}


# ---------------------------------------------------------------------------------------------
# The reduction


def weights_fingerprint(model: "nn.Module") -> str:
    """An exact digest of every parameter and buffer: integer sums of their bit patterns (order-free, so
    deterministic on any device) per tensor, hashed with the names and shapes."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        if t.device.type == "meta":
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel() == 0:
            continue
        flat = t.contiguous().reshape(-1)
        size = flat.element_size()
        if t.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]) if size in (1, 2, 4, 8) \
            else flat.view(torch.uint8)
        h.update(str(int(bits.sum(dtype=torch.int64))).encode())
    return h.hexdigest()


def _calibrating_quantizers(model: "nn.Module") -> list[tuple[str, Any]]:
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    from quantkit.compat import modelopt as modelopt_compat

    out = []
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled or not modelopt_compat.is_calibrating(q):
            continue
        cal = modelopt_compat.calibrator(q)
        if cal is None:
            continue
        if type(cal) is not MaxCalibrator:
            raise InputError(f"{name}: calibrates with {type(cal).__name__}, whose statistics cannot be reduced across "
                             "ranks exactly; calibrate in one process (leave out --nproc / torchrun)")
        if modelopt_compat.bias_calibrator(q) is not None:
            raise InputError(f"{name}: calibrates an affine bias (a mean over batches), which cannot be reduced across "
                             "ranks exactly; calibrate in one process")
        out.append((name, q))
    return out


def reduce_max_statistics(model: "nn.Module", dp: DataParallel) -> dict[str, Any]:
    """All-reduce (MAX) the running |x| max of every calibrating quantizer; afterwards every rank holds
    the statistics of all ranks' batches. Statistics missing on a rank take part as -inf; those missing
    on every rank stay None, as in one process that never reached the quantizer."""
    from quantkit.compat.modelopt import calib_amax, calibrator, set_calib_amax

    quantizers = _calibrating_quantizers(model)
    local = {}
    for name, q in quantizers:
        amax = calib_amax(calibrator(q))
        if amax is not None:
            local[name] = (tuple(amax.shape), str(amax.dtype))
    names = [n for n, _ in quantizers]
    everyone = dp.gather((names, local))
    for r, (their_names, _) in enumerate(everyone):
        if their_names != names:
            missing = sorted(set(names) ^ set(their_names))[:3]
            raise QuantkitError(f"rank {r} calibrates other quantizers than rank {dp.rank} (e.g. {missing}): the ranks "
                                "built different models")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    missing_somewhere = 0
    for name in names:
        seen = {their[name] for _, their in everyone if name in their}
        if len({s for s, _ in seen}) > 1 or len({d for _, d in seen}) > 1:
            raise QuantkitError(f"{name}: amax shapes or dtypes differ between ranks ({sorted(seen)}); cannot reduce")
        if seen:
            shape, dtype = next(iter(seen))
            shapes[name], dtypes[name] = shape, _dtype_named(dtype)
            missing_somewhere += any(name not in their for _, their in everyone)
    by_name = dict(quantizers)
    comm = dp._comm_device()
    # One buffer for all statistics: float32 holds fp16/bf16/fp32 values exactly and MAX is elementwise,
    # so packing changes no bit. float64 statistics (rare) get a buffer of their own. The layout follows
    # the model's module order, the same on every rank.
    for buf_dtype in (torch.float32, torch.float64):
        picked = [n for n in shapes if (dtypes[n] == torch.float64) == (buf_dtype == torch.float64)]
        if not picked:
            continue
        parts = []
        for n in picked:
            amax = calib_amax(calibrator(by_name[n]))
            if amax is None:
                parts.append(torch.full((torch.Size(shapes[n]).numel(),), float("-inf"), dtype=buf_dtype, device=comm))
            else:
                parts.append(amax.detach().reshape(-1).to(device=comm, dtype=buf_dtype))
        buf = torch.cat(parts)
        dp.all_reduce_max(buf)
        offset = 0
        for n in picked:
            cal = calibrator(by_name[n])
            numel = torch.Size(shapes[n]).numel()
            chunk = buf[offset:offset + numel].view(shapes[n])
            offset += numel
            before = calib_amax(cal)
            device = before.device if before is not None else _device_of(by_name[n], comm)
            set_calib_amax(cal, chunk.to(device=device, dtype=dtypes[n]).clone())
    return {"quantizers_reduced": len(shapes), "missing_on_some_rank": missing_somewhere,
            "never_calibrated": len(names) - len(shapes)}


def _dtype_named(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _device_of(module: "nn.Module", default: torch.device) -> torch.device:
    for t in module.buffers():
        return t.device
    return default
