import json
import math

import numpy as np
import pytest
import torch

from quantkit.metrics import (
    Metrics,
    MetricsAccumulator,
    OutputsAccumulator,
    Thresholds,
    Verdict,
    compare,
    compare_outputs,
    judge,
)

REF = [1.0, 2.0, 3.0]
CAND = [1.0, 2.0, 4.0]


def assert_hand_computed(m: Metrics):
    # err = [0, 0, 1]; |r|^2 = 14, |c|^2 = 21, r.c = 17
    assert m.finite and m.reason is None
    assert m.numel == 3
    assert m.mse == pytest.approx(1 / 3, rel=1e-15)
    assert m.cosine == pytest.approx(17 / math.sqrt(14 * 21), rel=1e-15)
    assert m.rel_l2 == pytest.approx(1 / math.sqrt(14), rel=1e-15)
    assert m.snr_db == pytest.approx(10 * math.log10(14), rel=1e-15)
    assert m.max_abs_err == 1.0
    assert m.mean_abs_err == pytest.approx(1 / 3, rel=1e-15)
    assert m.median_abs_err == 0.0
    # linear interpolation between the 2nd (0) and 3rd (1) sorted values at position 0.99 * 2
    assert m.p99_abs_err == pytest.approx(0.98, rel=1e-12)
    assert m.percentiles_exact


def test_hand_computed_values():
    assert_hand_computed(compare(torch.tensor(REF), torch.tensor(CAND)))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float32, torch.int8]
)
def test_low_precision_dtypes_are_upcast(dtype):
    # 1..4 are exact in every one of these dtypes, so the figures must equal the FP64 ones.
    assert_hand_computed(compare(torch.tensor(REF).to(dtype), torch.tensor(CAND).to(dtype)))


def test_fp16_sums_do_not_overflow():
    # sum(ref^2) = 1000 * 300^2 = 9e7, far past FP16's 65504: only an FP64 sum gets this right.
    ref = torch.full((1000,), 300.0, dtype=torch.float16)
    m = compare(ref, ref + 1)
    assert m.mse == 1.0
    assert m.snr_db == pytest.approx(10 * math.log10(300.0**2), rel=1e-12)
    assert m.cosine == pytest.approx(1.0, abs=1e-15)


def test_numpy_and_list_inputs_of_any_shape():
    ref = np.array(REF, dtype=np.float32).reshape(1, 3, 1)
    assert_hand_computed(compare(ref, np.array(CAND).reshape(1, 3, 1)))
    assert_hand_computed(compare(REF, CAND))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"reference \(2, 3\) vs candidate \(3, 2\)"):
        compare(torch.zeros(2, 3), torch.zeros(3, 2))


def test_empty_tensors_are_an_error():
    with pytest.raises(ValueError, match="no values"):
        compare(torch.zeros(0), torch.zeros(0))


@pytest.mark.parametrize(
    "ref, cand, reason",
    [
        ([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0], "candidate has 1 NaN among 3 values"),
        ([1.0, float("inf"), 3.0], [1.0, 2.0, 3.0], "reference has 1 Inf among 3 values"),
        (
            [float("nan"), 2.0, float("-inf")],
            [1.0, float("inf"), 3.0],
            "reference has 1 NaN and 1 Inf; candidate has 1 Inf",
        ),
    ],
)
def test_nan_inf_is_a_failure_not_a_number(ref, cand, reason):
    m = compare(torch.tensor(ref), torch.tensor(cand))
    assert m.finite is False
    assert reason in m.reason
    for name in ("cosine", "mse", "rel_l2", "max_abs_err", "snr_db", "mean_abs_err", "median_abs_err", "p99_abs_err"):
        assert getattr(m, name) is None, name
    assert not m.passes(Thresholds(cosine_min=-1.0))
    assert m.failures(Thresholds(0.99), "logits") == [f"logits: not finite: {m.reason}"]
    d = m.to_dict()
    assert d["finite"] is False and d["cosine"] is None and reason in d["reason"]


def test_nan_in_fp16():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float16)
    m = compare(ref, torch.tensor([1.0, float("nan")], dtype=torch.float16))
    assert not m.finite and "candidate has 1 NaN" in m.reason


def test_both_zero_tensors():
    m = compare(torch.zeros(4), torch.zeros(4))
    assert (m.cosine, m.mse, m.rel_l2, m.max_abs_err) == (1.0, 0.0, 0.0, 0.0)
    assert m.snr_db == math.inf


def test_one_zero_tensor():
    m = compare(torch.zeros(2), torch.tensor([3.0, 4.0]))
    assert m.cosine == 0.0
    assert m.mse == 12.5
    assert m.rel_l2 == math.inf and m.snr_db == -math.inf
    m = compare(torch.tensor([3.0, 4.0]), torch.zeros(2))
    assert m.cosine == 0.0
    assert m.rel_l2 == 1.0
    assert m.snr_db == 0.0  # error power equals signal power


def test_identical_tensors_have_infinite_snr():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    m = compare(x, x.clone())
    assert m.snr_db == math.inf and m.cosine == pytest.approx(1.0, abs=1e-15) and m.mse == 0.0


def test_opposite_tensors():
    m = compare(torch.tensor(REF), -torch.tensor(REF))
    assert m.cosine == pytest.approx(-1.0, abs=1e-15)
    assert m.rel_l2 == pytest.approx(2.0, rel=1e-15)


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(n, 8, generator=g) for n in (4, 2, 7)]
    cands = [(r + 0.05 * torch.randn(r.shape, generator=g)).to(torch.bfloat16) for r in refs]
    return refs, cands


def test_accumulator_over_three_batches_equals_one_shot():
    refs, cands = _batches()
    acc = MetricsAccumulator()
    for r, c in zip(refs, cands):
        acc.update(r, c)
    got = acc.result()
    want = compare(torch.cat(refs), torch.cat(cands))
    assert got.numel == want.numel == 13 * 8
    for name in ("cosine", "mse", "rel_l2", "snr_db", "mean_abs_err"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12), name
    # max and the percentiles see exactly the same values (all kept: under the reservoir cap)
    assert (got.max_abs_err, got.median_abs_err, got.p99_abs_err) == (
        want.max_abs_err,
        want.median_abs_err,
        want.p99_abs_err,
    )
    assert got.percentiles_exact


def test_accumulator_is_not_an_average_of_batch_figures():
    # Batch 1 has tiny signal and large relative error; the exact MSE is over all 4 values.
    acc = MetricsAccumulator().update([0.01, 0.01], [0.02, 0.02]).update([10.0, 10.0], [10.0, 10.0])
    m = acc.result()
    assert m.mse == pytest.approx(2 * 0.01**2 / 4, rel=1e-12)
    assert m.snr_db == pytest.approx(10 * math.log10((2 * 0.01**2 + 200) / (2 * 0.01**2)), rel=1e-12)


def test_accumulator_reservoir_caps_memory_and_estimates_percentiles():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(40_000, generator=g)
    cand = ref + torch.randn(40_000, generator=g)  # |err| ~ half-normal: median 0.6745, p99 2.5758
    acc = MetricsAccumulator(reservoir_size=10_000, seed=0)
    for i in range(0, 40_000, 3_000):
        acc.update(ref[i : i + 3_000], cand[i : i + 3_000])
    m = acc.result()
    exact = compare(ref, cand)
    assert acc.error_sample().shape == (10_000,)
    assert not m.percentiles_exact
    # A uniform sample of 10,000: the estimates' standard errors are ~1% (median) and ~1.3% (p99).
    assert m.median_abs_err == pytest.approx(exact.median_abs_err, rel=0.04)
    assert m.p99_abs_err == pytest.approx(exact.p99_abs_err, rel=0.06)
    for name in ("cosine", "mse", "snr_db", "max_abs_err", "mean_abs_err"):
        assert getattr(m, name) == pytest.approx(getattr(exact, name), rel=1e-12), name


def test_accumulator_reports_nonfinite_across_batches():
    acc = MetricsAccumulator()
    acc.update([1.0, 2.0], [1.0, 2.0])
    acc.update([1.0, 2.0], [float("nan"), float("nan")])
    acc.update([1.0, float("inf")], [1.0, 2.0])
    m = acc.result()
    assert not m.finite
    assert m.reason == "reference has 1 Inf; candidate has 2 NaN among 6 values"


def test_accumulator_shape_mismatch_and_empty():
    with pytest.raises(ValueError, match=r"\(2,\) vs candidate \(3,\)"):
        MetricsAccumulator().update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="no values"):
        MetricsAccumulator().result()


def test_compare_outputs_and_outputs_accumulator():
    ref = {"logits": torch.tensor(REF), "hidden": torch.ones(2, 2)}
    cand = {"hidden": torch.ones(2, 2), "logits": torch.tensor(CAND)}
    out = compare_outputs(ref, cand)
    assert list(out) == ["logits", "hidden"]
    assert_hand_computed(out["logits"])
    assert out["hidden"].snr_db == math.inf
    acc = OutputsAccumulator()
    acc.update({"logits": torch.tensor(REF[:2])}, {"logits": torch.tensor(CAND[:2])})
    acc.update({"logits": torch.tensor(REF[2:])}, {"logits": torch.tensor(CAND[2:])})
    assert_hand_computed(acc.result()["logits"])
    with pytest.raises(ValueError, match=r"missing from candidate \['hidden'\], not in reference \['extra'\]"):
        compare_outputs(ref, {"logits": cand["logits"], "extra": cand["hidden"]})
    with pytest.raises(ValueError, match=r"output 'logits': shape mismatch"):
        acc.update({"logits": torch.zeros(2)}, {"logits": torch.zeros(1)})


def test_to_dict_is_strict_json_and_round_trips():
    for m in (compare(REF, CAND), compare([0.0], [0.0]), compare([0.0], [1.0]), compare([1.0], [float("nan")])):
        d = m.to_dict()
        text = json.dumps(d, allow_nan=False)  # raises on inf/nan
        assert Metrics.from_dict(json.loads(text)) == m
    assert compare([0.0], [0.0]).to_dict()["snr_db"] == "inf"
    assert set(compare(REF, CAND).to_dict()) == {
        "numel",
        "finite",
        "reason",
        "cosine",
        "mse",
        "rel_l2",
        "max_abs_err",
        "snr_db",
        "mean_abs_err",
        "median_abs_err",
        "p99_abs_err",
        "percentiles_exact",
    }


def test_metrics_is_frozen():
    m = compare(REF, CAND)
    with pytest.raises(AttributeError):
        m.cosine = 1.0


def test_thresholds_and_passes():
    m = compare(REF, CAND)  # cosine 0.99146, SNR 11.46 dB
    assert m.passes(Thresholds(cosine_min=0.99))
    assert not m.passes(Thresholds(cosine_min=0.995))
    assert m.passes(Thresholds(cosine_min=0.99, snr_min_db=11.0))
    assert m.failures(Thresholds(cosine_min=0.995, snr_min_db=20.0), "out") == [
        "out: cosine 0.991460 < 0.995",
        "out: SNR 11.46 dB < 20.0 dB",
    ]
    assert compare([0.0], [0.0]).passes(Thresholds(0.999, snr_min_db=60.0))  # exact: SNR inf
    for bad in ({"cosine_min": 1.5}, {"cosine_min": "0.9"}, {"cosine_min": 0.9, "snr_min_db": float("nan")}):
        with pytest.raises(ValueError):
            Thresholds(**bad)
    th = Thresholds(0.99, 25.0)
    assert Thresholds.from_dict(th.to_dict()) == th


def test_verdict_is_truthy_on_pass_and_carries_failures():
    good, bad = compare(REF, REF), compare(REF, CAND)
    v = judge({"fake-quant": {"logits": good}, "onnxruntime": {"logits": bad}}, Thresholds(0.995))
    assert isinstance(v, Verdict) and not v
    assert v.failures == ("onnxruntime/logits: cosine 0.991460 < 0.995",)
    assert set(v.metrics) == {"fake-quant/logits", "onnxruntime/logits"}
    assert v.to_dict() == {
        "passed": False,
        "failures": ["onnxruntime/logits: cosine 0.991460 < 0.995"],
        "thresholds": {"cosine_min": 0.995, "snr_min_db": None},
    }
    assert str(v).startswith("FAILED: onnxruntime/logits")
    ok = judge(good, Thresholds(0.995))
    assert ok and ok.passed and ok.failures == ()
    nan = judge({"y": compare([1.0], [float("nan")])}, Thresholds(0.0))
    assert not nan and nan.failures == ("y: not finite: candidate has 1 NaN among 1 values",)


def test_reservoir_sample_is_uniform_over_batches():
    # Feed the indices 0..19999 as errors in 7 uneven batches: the kept 4,000 spread evenly.
    idx = np.arange(20_000, dtype=np.float64)
    acc = MetricsAccumulator(reservoir_size=4_000, seed=5)
    for i in range(0, 20_000, 3_000):
        acc.update(np.zeros(len(idx[i : i + 3_000])), idx[i : i + 3_000])
    sample = acc.error_sample()
    assert len(np.unique(sample)) == 4_000
    per_quarter = np.histogram(sample, bins=4, range=(0, 20_000))[0]
    assert np.all(np.abs(per_quarter - 1_000) < 150), per_quarter  # ~6 standard deviations
