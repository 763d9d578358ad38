"""Data-parallel calibration (quantkit.distributed, quantkit.launch) and --device-map (quantkit.placement),
in one process: sharding arithmetic, what is refused and why, the launcher's options, placement.

Two real gloo ranks (bit-for-bit equality with one process, a failing rank, bad input) are in
tests/test_distributed_gloo.py; the NCCL and multi-GPU versions in tests/gpu/test_data_parallel.py.
"""

from __future__ import annotations

import json
import sys
from unittest import mock
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
    ("    calibrator: mse\n", "max", "calibrator mse"),  # the histogram method, not the algorithm `mse`
    ("    calibrator: awq\n", "max", "algorithm awq"),  # a rule's awq sets the algorithm
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


def test_the_reduction_refuses_statistics_it_cannot_merge():
    """Second line of defence, at the reduction itself: a quantizer whose calibrator is not ModelOpt's
    MaxCalibrator (here a histogram) stops the run before any collective, on every rank alike."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from quantkit.distributed import DataParallel, reduce_max_statistics

    model = torch.nn.Module()
    model.hist = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, calibrator="histogram"))
    model.plain = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    for q in (model.hist, model.plain):
        q.disable_quant()
        q.enable_calib()
        q(torch.randn(4, 8))
    dp = DataParallel(rank=0, world_size=2, local_rank=0)
    with mock.patch.object(DataParallel, "gather", side_effect=AssertionError("no collective may start")):
        with pytest.raises(InputError, match="hist: calibrates with HistogramCalibrator.*calibrate in one process"):
            reduce_max_statistics(model, dp)


def test_reduction_of_one_rank_keeps_every_statistic():
    """world size 1 (gather and MAX of itself): the running max of each calibrator comes back unchanged,
    bf16 statistics included (packed through float32 and back)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    from quantkit.distributed import DataParallel, reduce_max_statistics

    model = torch.nn.Module()
    model.per_tensor = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    model.per_channel = TensorQuantizer(QuantizerAttributeConfig(num_bits=8, axis=0))
    model.unused = TensorQuantizer(QuantizerAttributeConfig(num_bits=8))
    for q in (model.per_tensor, model.per_channel, model.unused):
        q.disable_quant()
        q.enable_calib()
    g = torch.Generator().manual_seed(0)
    model.per_tensor(torch.randn(4, 8, generator=g).bfloat16())
    model.per_channel(torch.randn(6, 8, generator=g) * torch.arange(1, 7).view(6, 1))
    before = {n: getattr(model, n)._calibrator._calib_amax.clone() for n in ("per_tensor", "per_channel")}
    dp = DataParallel(rank=0, world_size=1, local_rank=0, backend="gloo")
    with mock.patch.object(DataParallel, "gather", lambda self, obj: [obj]), \
            mock.patch.object(DataParallel, "all_reduce_max", lambda self, t: None):
        summary = reduce_max_statistics(model, dp)
    assert summary == {"quantizers_reduced": 2, "missing_on_some_rank": 0, "never_calibrated": 1}
    for name, amax in before.items():
        after = getattr(model, name)._calibrator._calib_amax
        assert after.dtype == amax.dtype and after.shape == amax.shape and torch.equal(after, amax), name
    assert before["per_tensor"].dtype == torch.bfloat16 and before["per_channel"].shape == (6, 1)
    assert model.unused._calibrator._calib_amax is None


def test_nproc_bad_combinations_exit_2(capsys, tmp_path):
    rc = cli.main(["quantize", "--nproc", "2", "--device-map", "auto", "--model", SPEC, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "use one or the other" in capsys.readouterr().err
    if not torch.cuda.is_available():
        rc = cli.main(["quantize", "--nproc", "2", "--device", "cuda", "--model", SPEC, "--out", str(tmp_path / "o")])
        assert rc == 2
        assert "only 0 CUDA device(s) are visible" in capsys.readouterr().err
    rc = cli.main(["quantize", "--max-memory", "0=1GiB", "--model", SPEC, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--max-memory 0=1GiB: sets the per-GPU budget of --device-map" in capsys.readouterr().err
    for n in ("0", "-1"):  # not silently one process
        rc = cli.main(["quantize", "--nproc", n, "--model", SPEC, "--out", str(tmp_path / "o")])
        assert rc == 2
        assert f"--nproc {n}: needs a count >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_launcher_passes_the_same_options_to_the_ranks():
    from quantkit.launch import rank_argv

    argv = ["quantize", "--recipe", "fp8", "--model", SPEC, "--max-samples", "16", "--batch-size", "2", "--strict",
            "-q", "--nproc", "2", "--out", "x", "--device=cpu"]
    args = cli.build_parser().parse_args(argv)
    ranks = rank_argv(argv[1:], {"--nproc", "--device"})
    assert ranks == argv[1:11] + ["--out", "x"]  # the user's own words, --nproc and --device taken out
    again = cli.build_parser().parse_args(["quantize", *ranks, "--device", "cpu"])
    assert {k: v for k, v in vars(again).items() if k not in ("nproc", "func")} == \
           {k: v for k, v in vars(args).items() if k not in ("nproc", "func")}
    assert again.nproc is None


# ---------------------------------------------------------------------------------------------
# --device-map


def test_device_map_on_cpu_records_the_placement(tmp_path, capsys):
    calib = dp_model.save_calibration_set(tmp_path / "calib")
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


def _two_gpus():
    # accelerate computes the map from sizes alone; only quantkit asks how many GPUs there are.
    return mock.patch("torch.cuda.device_count", return_value=2)


def test_auto_map_splits_whole_decoder_layers_within_the_budgets():
    """--device-map auto --max-memory 0=59MiB,1=59MiB on an 85 MiB decoder: each GPU's budget is below the
    model, so it is split, by whole decoder layers, and no GPU gets more than its budget."""
    from accelerate.utils import compute_module_sizes

    from quantkit.placement import fp32_bytes, infer_map, parse_max_memory

    model = dp_model.wide_llama().model
    total = fp32_bytes(model)
    budget = parse_max_memory("0=59MiB,1=59MiB")
    assert total > budget[0] and total > budget[1]
    with _two_gpus():
        device_map, memory = infer_map(model, "auto", torch.device("cuda"), budget)
    assert device_map == {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": "cuda:0",
                          **{f"model.layers.{i}": "cuda:1" for i in range(2, 6)},
                          "model.norm": "cuda:1", "model.rotary_emb": "cuda:1", "lm_head": "cuda:1"}
    sizes = compute_module_sizes(model, dtype=torch.float32)
    used = {d: sum(sizes[m] for m, dev in device_map.items() if dev == d) for d in ("cuda:0", "cuda:1")}
    assert sum(used.values()) == total
    assert used["cuda:0"] <= int(memory["0"]) <= budget[0] and used["cuda:1"] <= int(memory["1"]) <= budget[1], used

    # Sized as FP32 whatever the loaded dtype: the reference run converts the placed model to FP32.
    with _two_gpus():
        assert infer_map(model.to(torch.bfloat16), "auto", torch.device("cuda"), budget)[0] == device_map


def test_a_model_that_does_not_fit_the_gpus_is_refused_with_the_sizes():
    from quantkit.placement import infer_map, parse_max_memory

    model = dp_model.wide_llama().model
    with _two_gpus(), pytest.raises(InputError) as e:
        infer_map(model, "auto", torch.device("cuda"), parse_max_memory("0=40MiB,1=40MiB"))
    assert str(e.value).startswith("the model (84.9 MiB in FP32) does not fit the GPUs' 80.0 MiB for weights, of "
                                   "which accelerate keeps 14.9 MiB (its largest layer) free on the first GPU"), e.value
    # A BF16 model is sized at 4 bytes a value too: it fits in 80 MiB as BF16 (42 MiB), not as the FP32
    # the reference pass makes of it (accelerate's dtype= alone would count it at 2 bytes and place it).
    from accelerate.utils import compute_module_sizes

    from quantkit.placement import fp32_bytes, fp32_sizing

    half = model.to(torch.bfloat16)
    assert compute_module_sizes(half, **fp32_sizing(half))[""] == fp32_bytes(half) > 80 * 2**20
    with _two_gpus(), pytest.raises(InputError, match=r"^the model \(84.9 MiB in FP32\) does not fit"):
        infer_map(half, "auto", torch.device("cuda"), parse_max_memory("0=40MiB,1=40MiB"))
    with _two_gpus(), pytest.raises(InputError, match=r"--max-memory names GPU\(s\) \[2\], but 2 are visible"):
        infer_map(model, "auto", torch.device("cuda"), {0: 2**30, 2: 2**30})
