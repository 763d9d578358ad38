"""quantkit.calib: the set format (bit-exact round trip, validation), split, batching, built-in and
synthetic sets, and forward_loop driving mtq.quantize on real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from quantkit.calib import MANIFEST, CalibrationSet, Sample, builtin_set, calibration_dir, collate, synthetic_set
from quantkit.errors import CalibrationError


def _bits_equal(a, b) -> bool:
    """Exact equality of trees, tensors compared byte for byte (NaN == NaN, -0.0 != 0.0)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_bits_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b) and all(_bits_equal(a[k], b[k]) for k in a))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def _nested_samples(n: int = 5) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        hidden = torch.randn(1, 3 + i, 8, generator=g)
        hidden[0, 0, 0] = float("nan")
        hidden[0, 0, 1] = -0.0
        kv = tuple((torch.randn(1, 2, 3 + i, 4, generator=g).to(torch.bfloat16),
                    torch.randn(1, 2, 3 + i, 4, generator=g).to(torch.float16)) for _ in range(2))
        out.append(Sample(
            args=(hidden, torch.tensor(i)),
            kwargs={"attention_mask": torch.ones(1, 3 + i, dtype=torch.bool),
                    "past_key_values": kv,
                    "cond": {"ctx": torch.randn(1, 4, generator=g).to(torch.float8_e4m3fn),
                             "ids": [torch.arange(3, dtype=torch.int32), None], "empty": torch.zeros(0, 2)},
                    "step": i, "scale": 0.5, "mode": "denoise", "use_cache": False, "dtype": torch.bfloat16,
                    "weird": float("inf")}))
    return out


def test_nested_samples_round_trip_bit_exactly(tmp_path):
    samples = _nested_samples()
    cs = CalibrationSet.from_samples(samples, {"source": {"kind": "test", "description": "unit test"}})
    cs.save(tmp_path / "set", shard_size=2)
    back = CalibrationSet.open(tmp_path / "set")
    assert len(back) == 5
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        MANIFEST, "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for a, b in zip(samples, back):
        assert _bits_equal(a.args, b.args)
        assert _bits_equal(a.kwargs, b.kwargs), "nested kwargs changed on the way through disk"
    f = back.fields
    assert f["kwargs.past_key_values.0.0"]["dtype"] == "bfloat16"
    assert f["kwargs.past_key_values.0.0"]["shape_min"] == [1, 2, 3, 4]
    assert f["kwargs.past_key_values.0.0"]["shape_max"] == [1, 2, 7, 4]
    assert f["kwargs.cond.ctx"] == {"kind": "tensor", "dtype": "float8_e4m3fn", "shape": [1, 4]}
    assert f["kwargs.step"] == {"kind": "value", "type": "int"}
    manifest = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert manifest["samples"] == 5 and manifest["complete"] is True
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["shards"])


def _saved(tmp_path: Path, n: int = 6) -> Path:
    samples = [Sample((), {"x": torch.full((1, 4), float(i))}) for i in range(n)]
    CalibrationSet.from_samples(samples, {"source": "unit"}).save(tmp_path / "s", shard_size=2)
    return tmp_path / "s"


def test_missing_truncated_and_corrupt_shards_are_named(tmp_path):
    folder = _saved(tmp_path)
    shard = folder / "shard-00001.safetensors"
    data = shard.read_bytes()

    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match=r"shard-00001\.safetensors: shard is truncated"):
        CalibrationSet.open(folder)

    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CalibrationError, match=r"shard-00001\.safetensors: checksum mismatch"):
        CalibrationSet.open(folder)

    shard.unlink()
    with pytest.raises(CalibrationError, match=r"shard-00001\.safetensors: shard is missing"):
        CalibrationSet.open(folder)


def test_manifest_problems_are_named(tmp_path):
    with pytest.raises(CalibrationError, match="no such calibration set folder"):
        CalibrationSet.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"manifest\.json: missing"):
        CalibrationSet.open(tmp_path / "empty")
    folder = _saved(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CalibrationError, match=r"manifest\.json: format version 99 is incompatible"):
        CalibrationSet.open(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(CalibrationError, match="not a quantkit calibration manifest"):
        CalibrationSet.open(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CalibrationError, match=r"manifest\.json: not valid JSON"):
        CalibrationSet.open(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "samples": 7}))
    with pytest.raises(CalibrationError, match="says 7 samples but its shards hold 6"):
        CalibrationSet.open(folder)


def test_split_is_deterministic_and_disjoint():
    cs = CalibrationSet.from_samples([{"x": torch.full((1, 2), float(i))} for i in range(50)])
    assert cs.batching == "calls"  # not declared: replayed as captured
    calib, held = cs.split(0.2, seed=0)
    calib2, held2 = cs.split(0.2, seed=0)

    def values(part):
        return [float(x.kwargs["x"][0, 0]) for x in part]

    assert (len(calib), len(held)) == (40, 10)
    assert values(held) == values(held2) and values(calib) == values(calib2)
    assert not set(values(calib)) & set(values(held)), "held-out samples leaked into calibration"
    assert sorted(values(calib) + values(held)) == [float(i) for i in range(50)]
    assert values(cs.split(0.2, seed=1)[1]) != values(held)
    # Small sets still get one sample on each side.
    c, h = CalibrationSet.from_samples([{"x": torch.zeros(1, 1)}] * 3).split(0.1)
    assert (len(c), len(h)) == (2, 1)
    # A subset of a split is a view of the same samples.
    assert values(held.subset(range(2))) == values(held)[:2]


def test_example_batches_are_padded_cast_and_grouped_by_shape():
    pad = {"input_ids": 7, "attention_mask": 0}
    samples = []
    for n in (3, 5, 4):
        samples.append(Sample((), {"input_ids": torch.arange(1, n + 1).unsqueeze(0),
                                   "attention_mask": torch.ones(1, n, dtype=torch.long),
                                   "pixel": torch.randn(1, 2, 2)}))
    samples.append(Sample((), {"input_ids": torch.arange(1, 3).unsqueeze(0),
                               "attention_mask": torch.ones(1, 2, dtype=torch.long),
                               "pixel": torch.randn(1, 3, 3)}))  # other pixel shape: its own batch
    cs = CalibrationSet.from_samples(samples, {"pad_values": pad, "batching": "examples"})
    assert cs.batching == "examples"
    batches = list(cs.batches(8, "cpu", torch.bfloat16))
    assert len(batches) == 2
    args, kw = batches[0]
    assert args == ()
    assert kw["input_ids"].dtype == torch.int64 and kw["attention_mask"].dtype == torch.int64
    assert kw["pixel"].dtype == torch.bfloat16 and kw["pixel"].shape == (3, 2, 2)
    assert kw["input_ids"].tolist() == [[1, 2, 3, 7, 7], [1, 2, 3, 4, 5], [1, 2, 3, 4, 7]]
    assert kw["attention_mask"].sum(1).tolist() == [3, 5, 4]
    assert torch.equal(kw["pixel"][1], samples[1].kwargs["pixel"][0].to(torch.bfloat16))
    assert batches[1][1]["pixel"].shape == (1, 3, 3)
    assert [len(g) for g in cs.batch_groups(2)] == [2, 1, 1]
    with pytest.raises(ValueError):
        collate([samples[0], samples[3]], pad)


def test_captured_calls_are_replayed_one_by_one_exactly():
    # Calls captured with a batch of 2 and a shared rotary table without a batch dim: never merged.
    calls = [Sample((torch.randn(2, 3, 4), (torch.randn(3, 4), torch.randn(3, 4))), {"t": i}) for i in range(3)]
    cs = CalibrationSet.from_samples(calls, {"batching": "examples"})
    assert cs.batching == "calls", "declared examples without a batch dim of 1 must fall back to calls"
    out = list(cs.batches(8, "cpu", torch.float16))
    assert len(out) == 3
    for (args, kwargs), s in zip(out, calls):
        assert kwargs == {"t": s.kwargs["t"]}
        assert isinstance(args[1], tuple) and args[1][0].shape == (3, 4)
        assert torch.equal(args[0], s.args[0].to(torch.float16))


class _Pipe(nn.Module):
    def __init__(self):
        super().__init__()
        self.denoiser = nn.Linear(4, 4)

    def forward(self, x):
        return self.denoiser(x)


def test_forward_loop_runs_every_batch_on_the_captured_submodule():
    seen = []
    pipe = _Pipe()
    pipe.denoiser.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    cs = CalibrationSet.from_samples([Sample((torch.randn(1, 4),), {}) for _ in range(5)],
                                     {"module": "denoiser", "batching": "examples"})
    cs.forward_loop(batch_size=2, progress=False)(pipe)
    assert seen == [(2, 4), (2, 4), (1, 4)]
    seen.clear()
    cs.forward_loop(batch_size=4, progress=False)(pipe.denoiser)  # given the submodule itself
    assert seen == [(4, 4), (1, 4)]


def test_builtin_text_set_is_real_varied_text():
    folder = calibration_dir() / "text-en"
    lines = (folder / "sentences.txt").read_text(encoding="utf-8").splitlines()
    assert 300 <= len(lines) <= 1000 and all(line.strip() == line and line for line in lines)
    assert len(set(lines)) == len(lines)
    words = sorted(len(line.split()) for line in lines)
    assert words[0] <= 5 and words[-1] >= 40, "lengths should vary"
    assert (calibration_dir() / "README.md").read_text().count("licen") >= 1
    prov = (folder / "provenance.tsv").read_text().splitlines()
    assert len(prov) == len(lines) + 1


@pytest.fixture(scope="module")
def minilm():
    from quantkit.models import load_model

    return load_model("minilm")


def test_builtin_set_tokenizes_one_unpadded_sentence_per_sample(minilm):
    cs = builtin_set(minilm, max_samples=40)
    assert len(cs) == 40 and not cs.synthetic and cs.batching == "examples"
    first = (calibration_dir() / "text-en" / "sentences.txt").read_text().splitlines()[0]
    expected = minilm.tokenizer([first], return_tensors="pt")
    s = cs[0]
    assert set(s.kwargs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert torch.equal(s.kwargs["input_ids"], expected["input_ids"])
    assert all(bool(x.kwargs["attention_mask"].all()) for x in cs), "samples must be unpadded"
    assert len({x.kwargs["input_ids"].shape[1] for x in cs}) > 10
    info = cs.info()
    assert info["synthetic"] is False and info["samples_total"] == 40 and "text-en" in info["source"]
    _, kw = next(cs.batches(8, "cpu", torch.float32))
    assert kw["input_ids"].shape[0] == 8
    pad = minilm.tokenizer.pad_token_id
    lengths = kw["attention_mask"].sum(1)
    assert all(int(kw["input_ids"][i, lengths[i]:].ne(pad).sum()) == 0 for i in range(8))
    with pytest.raises(CalibrationError, match="did you mean text-en"):
        builtin_set(minilm, "text-e")


def test_synthetic_set_says_so(minilm):
    cs = synthetic_set(minilm, n=4, seed=3)
    assert cs.synthetic and cs.info()["synthetic"] is True and "SYNTHETIC" in cs.info()["source"]
    again = synthetic_set(minilm, n=4, seed=3)
    assert all(torch.equal(a.kwargs["input_ids"], b.kwargs["input_ids"]) for a, b in zip(cs, again))


FP8_CFG = {
    "quant_cfg": [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
    ],
    "algorithm": "max",
}


def test_forward_loop_drives_mtq_fp8_and_real_data_reaches_the_quantizers(minilm, tmp_path):
    import copy

    import modelopt.torch.quantization as mtq

    def amaxes(model, kind):
        return {n: float(m.amax.float().max()) for n, m in model.named_modules()
                if n.endswith(kind) and getattr(m, "amax", None) is not None}

    real = builtin_set(minilm, max_samples=32)
    real.save(tmp_path / "real")  # through disk, as `quantize --calib` would read it
    calib, _ = CalibrationSet.open(tmp_path / "real").split(0.25)
    runs = {}
    for name, cs in (("real", calib), ("synthetic", synthetic_set(minilm, n=len(calib), seed=0))):
        model = copy.deepcopy(minilm.model)
        mtq.quantize(model, copy.deepcopy(FP8_CFG), cs.forward_loop(batch_size=8, device="cpu",
                                                                   dtype=torch.float32, progress=False))
        runs[name] = (amaxes(model, "input_quantizer"), amaxes(model, "weight_quantizer"))
    (real_in, real_w), (syn_in, syn_w) = runs["real"], runs["synthetic"]
    assert len(real_in) >= 40, f"only {len(real_in)} input quantizers were calibrated"
    assert real_w == syn_w, "weight amax depends on the weights only"
    rel = {n: abs(real_in[n] - syn_in[n]) / max(real_in[n], syn_in[n]) for n in real_in}
    differ = [n for n, r in rel.items() if r > 0.01]
    assert len(differ) >= 10, f"real and synthetic calibration gave nearly the same amax: {rel}"
    assert max(rel.values()) > 0.2, max(rel.values())
