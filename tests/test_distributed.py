"""Data-parallel calibration (quantkit.distributed, quantkit.launch) and --device-map (quantkit.placement).

The sharding arithmetic and the plan checks run in-process; the reduction runs for real: `quantize
--nproc 2 --device cpu` starts two gloo ranks, and their saved state must equal a one-process run's
bit for bit. The fixture model routes flagged batches through a second expert, so one rank never
calibrates that expert's quantizers (the case ModelOpt's own amax sync cannot pair up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit import cli, ptq
from quantkit.calib import BATCHING_EXAMPLES, CalibrationSet, Sample
from quantkit.distributed import check_plan, shard_batches, unsupported_calibration
from quantkit.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "dp_model.py"
SPEC = f"{FIXTURE}:routed_mlp"
sys.path.insert(0, str(FIXTURE.parent))
import dp_model  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Sharding arithmetic


@pytest.mark.parametrize("sizes,world,expected", [
    ([2] * 7, 2, [(0, 1, 2, 3), (4, 5, 6)]),            # uneven: the first rank takes the extra batch
    ([8, 8, 8, 6], 4, [(0,), (1,), (2,), (3,)]),
    ([8, 6], 3, [(0,), (1,), ()]),                      # more ranks than batches: the last rank gets none
    ([4, 4, 4, 4, 1], 1, [(0, 1, 2, 3, 4)]),
    ([], 2, [(), ()]),
])
def test_shard_batches(sizes, world, expected):
    shards = shard_batches(sizes, world)
    assert [s.batches for s in shards] == expected
    assert [s.rank for s in shards] == list(range(world))
    flat = [b for s in shards for b in s.batches]
    assert flat == list(range(len(sizes)))  # disjoint, complete, in order (contiguous per rank)
    counts = [len(s.batches) for s in shards]
    assert max(counts) - min(counts) <= 1
    assert [s.samples for s in shards] == [sum(sizes[i] for i in s.batches) for s in shards]
    assert shard_batches(sizes, world) == shards  # deterministic


def test_shard_batches_rejects_zero_ranks():
    with pytest.raises(ValueError, match="world_size"):
        shard_batches([1, 2], 0)


def _padded_text_set(n: int = 11) -> CalibrationSet:
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(n):
        length = 3 + (i * 7) % 5
        samples.append(Sample((), {"input_ids": torch.randint(1, 50, (1, length), generator=g),
                                   "attention_mask": torch.ones(1, length, dtype=torch.long)}))
    return CalibrationSet.from_samples(samples, {"batching": BATCHING_EXAMPLES,
                                                 "pad_values": {"input_ids": 0, "attention_mask": 0}})


def test_rank_shards_replay_the_single_process_batches():
    """Each rank's batches are the single-process batches themselves: same samples, same padding."""
    from quantkit.distributed import DataParallel

    cs = _padded_text_set()
    groups = cs.batch_groups(3)

    def fed(loop_groups=None):
        seen = []

        class Recorder(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                seen.append((input_ids.clone(), attention_mask.clone()))

        cs.forward_loop(3, progress=False, groups=loop_groups)(Recorder())
        return seen

    single = fed()
    assert len(single) == len(groups) == 4
    per_rank = []
    for rank in range(3):
        dp = DataParallel(rank=rank, world_size=3, local_rank=rank)
        g, shards = dp.shards(cs, 3)
        assert g == groups
        per_rank += fed([groups[i] for i in shards[rank].batches])
    assert len(per_rank) == len(single)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(single, per_rank):
        assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    assert any(m.eq(0).any() for _, m in single), "the set should exercise padding"


# ---------------------------------------------------------------------------------------------
# What is refused


def _plan(tmp_path: Path, rule_extra: str = "", calibration: str = "max"):
    from quantkit.models import load_model
    from quantkit.plan import make_plan
    from quantkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: dp-check\ndefault: skip\nrules:\n  - types: [Linear]\n    precision: int8\n"
                    f"{rule_extra}calibration:\n  algorithm: {calibration}\n")
    return make_plan(load_model(SPEC).model, load_recipe(str(path)))


@pytest.mark.parametrize("rule_extra,calibration,needle", [
    ("    calibrator: percentile\n", "max", "calibrator percentile on 4 layer(s)"),
    ("    calibrator: entropy\n", "max", "calibrator entropy"),
    ("", "awq", "algorithm awq"),
])
def test_inexact_calibrators_are_refused(tmp_path, rule_extra, calibration, needle):
    plan = _plan(tmp_path, rule_extra, calibration)
    with pytest.raises(InputError, match="data-parallel calibration would not reproduce") as e:
        check_plan(plan)
    assert needle in str(e.value)
    assert "leave out --nproc" in str(e.value)


@pytest.mark.parametrize("calibration", ["max", "smoothquant", "mse"])
def test_exact_algorithms_are_accepted(tmp_path, calibration):
    assert unsupported_calibration(_plan(tmp_path, calibration=calibration)) == []


def test_nproc_bad_combinations_exit_2(capsys, tmp_path):
    rc = cli.main(["quantize", "--nproc", "2", "--device-map", "auto", "--model", SPEC, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "use one or the other" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = cli.main(["quantize", "--nproc", "2", "--device", "cuda", "--model", SPEC, "--out", str(tmp_path / "o")])
        assert rc == 2
        assert "only 0 CUDA device(s) are visible" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_launcher_passes_the_same_options_to_the_ranks():
    from quantkit.launch import _argv_from_args

    argv = ["quantize", "--recipe", "fp8", "--model", SPEC, "--max-samples", "16", "--batch-size", "2", "--strict",
            "-q", "--nproc", "2", "--out", "x"]
    args = cli.build_parser().parse_args(argv)
    again = cli.build_parser().parse_args(["quantize", *_argv_from_args(args, drop={"nproc"})])
    assert {k: v for k, v in vars(again).items() if k not in ("nproc", "func")} == \
           {k: v for k, v in vars(args).items() if k not in ("nproc", "func")}
    assert again.nproc is None


# ---------------------------------------------------------------------------------------------
# Two gloo ranks, for real


def _calib_folder(tmp_path: Path) -> Path:
    # 20 samples -> 18 calibrate (2 held out), batches of 3 -> 6 batches, 3 per rank. The first 5
    # samples take expert b: all in rank 0's batches, so rank 1 never calibrates b.
    folder = tmp_path / "calib"
    CalibrationSet.from_samples(dp_model.calibration_samples(20, routed=5),
                                {"batching": BATCHING_EXAMPLES, "source": {"kind": "test", "description": "dp"}}
                                ).save(folder)
    return folder


def _quantize_cmd(calib: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quantkit", "quantize", "--model", SPEC, "--calib", str(calib), "--recipe",
            "int8-smoothquant", "--batch-size", "3", "--device", "cpu", "--out", str(out), "-q", *extra]


def _single_process_state(calib: Path, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    from quantkit.models import load_model
    from quantkit.recipe import load_recipe

    loaded, recipe = load_model(SPEC), load_recipe("int8-smoothquant")
    calib_part, _ = ptq.split_calibration(CalibrationSet.open(calib), recipe)
    if rank0_only:
        calib_part = calib_part.subset(range(9))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        ptq.quantize_model(loaded, recipe, calib_part, dtype="fp32", device=torch.device("cpu"), batch_size=3)
    finally:
        torch.set_num_threads(threads)
    return loaded.model.state_dict()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_state_bit_for_bit(tmp_path):
    calib = _calib_folder(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(_quantize_cmd(calib, out, "--nproc", "2"), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    dp = report["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "gloo" and dp["samples"] == 18
    assert [(s["rank"], s["batches"], s["samples"]) for s in dp["shards"]] == [(0, 3, 9), (1, 3, 9)]
    (calibration_pass,) = dp["passes"]  # SmoothQuant calibrates once
    assert [r["samples"] for r in calibration_pass["ranks"]] == [9, 9]
    assert calibration_pass["quantizers_reduced"] == 6  # input + weight of up, a, b
    assert calibration_pass["missing_on_some_rank"] == 1  # b.input_quantizer: rank 1 never routed there
    assert report["calibration"]["calibration_samples"] == 18

    saved = torch.load(out / ptq.STATE_FILE, weights_only=False)["model_state_dict"]
    single = _single_process_state(calib)
    assert sorted(saved) == sorted(single)
    for name in single:  # amax, SmoothQuant's pre_quant_scale and the smoothed weights alike
        assert torch.equal(saved[name], single[name]), f"{name}: 2 ranks {saved[name]} vs 1 process {single[name]}"
    assert saved["b.input_quantizer._amax"].numel() == 1 and saved["up.input_quantizer._pre_quant_scale"].numel() == 32

    # Rank 1's shard mattered: rank 0's batches alone give other statistics.
    rank0 = _single_process_state(calib, rank0_only=True)
    assert not torch.equal(rank0["up.input_quantizer._pre_quant_scale"], single["up.input_quantizer._pre_quant_scale"])


@pytest.mark.slow
def test_a_failing_rank_stops_the_others_and_writes_nothing(tmp_path):
    calib = _calib_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier run")
    proc = subprocess.run(_quantize_cmd(calib, out, "--nproc", "2"), cwd=ROOT, capture_output=True, text=True,
                          env=_env(QUANTKIT_DP_FAIL_RANK="1"), timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RankFailure: rank 1 of 2 failed: QuantkitError: injected failure on rank 1"), last
    assert "the other ranks were stopped" in last and f"{out} is as it was" in last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert (out / "previous.txt").read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "out"]  # no staging folder left behind


# ---------------------------------------------------------------------------------------------
# --device-map


def test_device_map_on_cpu_records_the_placement(tmp_path, capsys):
    calib = _calib_folder(tmp_path)
    out = tmp_path / "out"
    rc = cli.main(["quantize", "--model", SPEC, "--calib", str(calib), "--recipe", "fp8", "--batch-size", "3",
                   "--device", "cpu", "--device-map", "auto", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    placement = json.loads((out / "report.json").read_text())["placement"]
    assert placement["mode"] == "auto" and placement["device_map"] == {"": "cpu"}
    assert placement["main_device"] == "cpu"
    assert placement["bytes_per_device"] == {"cpu": sum(t.numel() * t.element_size() for t in
                                                        dp_model.routed_mlp()[0].state_dict().values())}


def test_device_map_rejects_offloading_and_bad_sizes(tmp_path):
    from quantkit.placement import dispatch, parse_max_memory

    assert parse_max_memory("0=1.5GiB,1=512MiB") == {0: int(1.5 * 2**30), 1: 512 * 2**20}
    with pytest.raises(InputError, match="GPU=SIZE"):
        parse_max_memory("cpu=10GiB")
    with pytest.raises(InputError, match="auto, sequential or a JSON file"):
        dispatch(dp_model.routed_mlp()[0], "balanced_low_0", torch.device("cpu"))


def test_guards_survive_accelerate_hooks(tmp_path):
    """A dispatched model (accelerate hooks on every block) quantizes exactly as the plain one; the FP32
    guard's class swap on the LayerNorm reaches through the hook."""
    from quantkit.models import load_model
    from quantkit.placement import dispatch, is_dispatched
    from quantkit.recipe import load_recipe

    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps({n: "cpu" for n in ("up", "a", "b", "norm", "head")}))
    calib = CalibrationSet.from_samples(dp_model.calibration_samples(12, routed=4), {"batching": BATCHING_EXAMPLES})
    recipe = load_recipe("fp8")
    outputs = []
    for hooked in (False, True):
        loaded = load_model(SPEC)
        if hooked:
            placement = dispatch(loaded.model, str(map_file), torch.device("cpu"), force_hooks=True)
            assert is_dispatched(loaded.model) and placement.device_map["norm"] == "cpu"
        ptq.quantize_model(loaded, recipe, calib, dtype="bf16", device=torch.device("cpu"), batch_size=4)
        norm = loaded.model.norm
        assert type(norm).__name__ == "FP32LayerNorm"
        if hooked:
            assert norm._old_forward.__func__ is type(norm).forward
        args, kwargs = next(iter(calib.batches(4, dtype=torch.bfloat16)))
        with torch.no_grad():
            outputs.append(loaded.model(*args, **kwargs))
    assert torch.equal(outputs[0], outputs[1])
