"""quantkit.collect and scripts/collect_calibration.py: data sources, the capture hook (submodule
kwargs, nested), bit-exact round trip, resume after a hard kill, and errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from quantkit.calib import MANIFEST, CalibrationSet, builtin_set
from quantkit.cli import main as cli_main


def main(argv: list[str]) -> int:
    return cli_main(["collect", *argv])

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "collect_calibration.py"

# A pipeline whose denoiser is called 3 times per data row with positional args, a nested
# dict/tuple/list of tensors (a KV-cache-like tuple in bf16), a bool mask and plain values.
PIPELINE = textwrap.dedent('''
    import torch
    from torch import nn

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, t, *, cond, mask=None, scale=1.0, note="step"):
            k, v = cond["kv"]
            h = self.proj(x) * scale + cond["ctx"] + k.float().mean() - v.float().mean() + cond["extra"][0].sum()
            if mask is not None:
                h = h * mask
            return h + t

    class Pipeline(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = nn.Linear(8, 8)
            self.denoiser = Denoiser()

        def forward(self, feats, steps=3):
            ctx = self.encoder(feats)
            x = torch.randn_like(feats)  # stochastic, as diffusion is: the collector seeds each row
            for i in range(steps):
                kv = (torch.randn(1, 2, 4).to(torch.bfloat16), torch.randn(1, 2, 4))
                x = self.denoiser(x, torch.tensor([float(i)]),
                                  cond={"ctx": ctx, "kv": kv, "extra": [ctx[:, :2], None]},
                                  mask=torch.ones(1, 8, dtype=torch.bool), scale=0.5, note=f"step{i}")
            return x

    def make():
        return Pipeline()

    def features(text):
        codes = [float(ord(c)) for c in text[:8]] + [0.0] * 8
        return torch.tensor([codes[:8]]) / 128.0 + len(text) / 100.0

    def run(model, row):
        model(features(row["text"]))

    def run_image(model, row):
        import numpy as np
        pixels = torch.tensor(np.asarray(row["image"], dtype="float32")).flatten()[:8]
        model(pixels.unsqueeze(0) / 255.0)
''')


@pytest.fixture()
def pipeline(tmp_path) -> str:
    path = tmp_path / "toy_pipeline.py"
    path.write_text(PIPELINE)
    return str(path)


def _tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_tensors_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--quiet"], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


def test_default_model_and_text_set_round_trip_bit_exactly(tmp_path):
    from quantkit.models import load_model

    out = tmp_path / "minilm"
    assert main(["--out", str(out), "--max-samples", "20", "--shard-size", "8", "--quiet"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["samples"] == 20 and manifest["complete"] and manifest["model"] == "minilm"
    assert [s["samples"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["source"]["kind"] == "builtin-text" and manifest["synthetic"] is False
    assert manifest["fields"]["kwargs.input_ids"]["dtype"] == "int64"
    cs = CalibrationSet.open(out)
    expected = builtin_set(load_model("minilm"), max_samples=20)
    assert len(cs) == 20 and cs.batching == "examples"
    for got, want in zip(cs, expected):
        assert got.args == ()
        assert _tensors_equal(got.kwargs, want.kwargs)
    assert cs.pad_values["input_ids"] == 0 and cs.info()["source"].startswith("built-in text-en")


def test_submodule_nested_kwargs_round_trip_exactly(tmp_path, pipeline):
    from quantkit.collect import _seed_all
    from quantkit.models import load_model

    out = tmp_path / "denoiser"
    rc = main(["--model", f"{pipeline}:make", "--module", "denoiser", "--runner", f"{pipeline}:run",
               "--data", "text-en", "--out", str(out), "--max-samples", "10", "--shard-size", "4", "--quiet"])
    assert rc == 0
    cs = CalibrationSet.open(out)
    # A timestep of shape [1] is no batch dimension: captured calls are replayed one by one.
    assert len(cs) == 10 and cs.module == "denoiser" and cs.batching == "calls"
    manifest = json.loads((out / MANIFEST).read_text())
    # Shards are cut at data-row boundaries (3 calls per row), the last one at --max-samples.
    assert [(s["rows"], s["samples"]) for s in manifest["shards"]] == [([0, 2], 6), ([2, 4], 4)]
    assert manifest["fields"]["kwargs.cond.kv.0"]["dtype"] == "bfloat16"
    assert manifest["fields"]["kwargs.note"] == {"kind": "value", "type": "str"}

    # The same calls, recorded by hand.
    loaded = load_model(f"{pipeline}:make")
    from quantkit.models import _import_callable

    run = _import_callable(f"{pipeline}:run")
    seen = []
    loaded.model.denoiser.register_forward_pre_hook(
        lambda m, a, k: seen.append((tuple(t.clone() for t in a), k)), with_kwargs=True)
    sentences = (REPO / "calibration" / "text-en" / "sentences.txt").read_text().splitlines()
    with torch.no_grad():
        for i in range(4):
            _seed_all(i)
            run(loaded.model, {"text": sentences[i]})
    for got, (args, kwargs) in zip(cs, seen[:10]):
        assert _tensors_equal(got.args, args)
        assert _tensors_equal(got.kwargs, kwargs)
    assert cs[4].kwargs["note"] == "step1" and cs[4].kwargs["cond"]["extra"][1] is None

    # forward_loop replays the captured calls into the pipeline's denoiser.
    calls = []
    loaded.model.denoiser.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    cs.forward_loop(batch_size=4, progress=False)(loaded.model)
    assert calls == [(1, 8)] * 10


def _shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


@pytest.mark.parametrize("crash", ["after-shard:1", "before-manifest:2"])
def test_killed_collection_resumes_without_losing_or_repeating_shards(tmp_path, pipeline, crash, capsys):
    common = ["--model", f"{pipeline}:make", "--module", "denoiser", "--runner", f"{pipeline}:run",
              "--data", "text-en", "--max-samples", "40", "--shard-size", "8"]
    full = tmp_path / "full"
    assert main([*common, "--out", str(full), "--quiet"]) == 0

    out = tmp_path / "killed"
    killed = _script(*common, "--out", str(out), env={"QUANTKIT_COLLECT_CRASH": crash})
    assert killed.returncode == 17, killed.stderr
    partial = json.loads((out / MANIFEST).read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 2
    if crash.startswith("before-manifest"):
        assert "shard-00002.safetensors" in _shard_files(out)  # written but never listed
    assert main([*common, "--out", str(out), "--quiet"]) == 2  # refuses to clobber without --resume
    assert "pass --resume" in capsys.readouterr().err
    resumed = _script(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    a, b = CalibrationSet.open(full), CalibrationSet.open(out)
    assert len(b) == len(a) == 40
    ma, mb = (json.loads((f / MANIFEST).read_text()) for f in (full, out))
    assert [s["rows"] for s in mb["shards"]] == [s["rows"] for s in ma["shards"]]
    assert _shard_files(out) == [s["file"] for s in mb["shards"]], "an unlisted or missing shard"
    for x, y in zip(a, b):
        assert _tensors_equal(x.args, y.args) and _tensors_equal(x.kwargs, y.kwargs)
    assert main([*common[:-2], "--shard-size", "4", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "different settings (collection)" in capsys.readouterr().err


def test_collect_imports_without_torch_and_agrees_with_calib():
    import quantkit.calib
    import quantkit.collect

    assert sys.modules["quantkit.collect"].MANIFEST == quantkit.calib.MANIFEST
    probe = "import sys, quantkit.collect; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0, "CLI registration pulls in torch"


def test_unknown_module_lists_close_matches(tmp_path, pipeline, capsys):
    rc = main(["--model", f"{pipeline}:make", "--module", "denoser", "--runner", f"{pipeline}:run",
               "--data", "text-en", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("CalibrationError: --module denoser") and "close matches: denoiser" in err
    assert not (tmp_path / "x").exists()


def test_unreadable_data_sources_are_named(tmp_path, pipeline, capsys):
    common = ["--model", f"{pipeline}:make", "--runner", f"{pipeline}:run", "--quiet"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    weird = tmp_path / "data.xlsx"
    weird.write_text("x")
    cases = [
        (str(tmp_path / "missing.txt"), "missing.txt: no such file or folder"),
        (str(bad), "bad.jsonl:2: not valid JSON"),
        (str(weird), "data.xlsx: unsupported data file type .xlsx"),
        ("text-eng", "Did you mean text-en"),
    ]
    for i, (data, message) in enumerate(cases):
        assert main([*common, "--data", data, "--out", str(tmp_path / f"o{i}")]) == 2
        assert message in capsys.readouterr().err


def test_data_sources_json_csv_parquet_datasets_and_images(tmp_path, pipeline):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    texts = ["The first sentence.", "A second, longer sentence here.", "Third."]
    files = {"d.jsonl": "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)),
             "d.json": json.dumps({"rows": [{"text": t} for t in texts]}),
             "d.csv": "id,text\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(texts)),
             "d.txt": "\n".join(texts) + "\n\n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4), (i * 40, 10, 200)).save(tmp_path / "imgs" / "cat" / f"{i}.png")

    common = ["--model", f"{pipeline}:make", "--module", "denoiser", "--quiet"]
    sets = {}
    for name in [*files, "d.parquet", "hf"]:
        out = tmp_path / f"out-{name}"
        assert main([*common, "--runner", f"{pipeline}:run", "--data", str(tmp_path / name), "--out", str(out)]) == 0
        sets[name] = CalibrationSet.open(out)
    first = sets["d.txt"]
    assert len(first) == 9  # 3 rows x 3 denoiser calls
    for name, cs in sets.items():
        assert len(cs) == 9, name
        assert all(_tensors_equal(a.args, b.args) for a, b in zip(first, cs)), f"{name} read other text"
    assert sets["hf"].info()["source_detail"]["kind"] == "hf-dataset"

    out = tmp_path / "out-img"
    assert main([*common, "--runner", f"{pipeline}:run_image", "--data", str(tmp_path / "imgs"), "--out", str(out)]) == 0
    cs = CalibrationSet.open(out)
    assert len(cs) == 9 and cs.info()["source_detail"]["kind"] == "image-folder"
    assert main([*common, "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "noimg")]) == 2


def test_synthetic_collection_is_marked(tmp_path):
    out = tmp_path / "syn"
    assert main(["--synthetic", "--max-samples", "6", "--batch-size", "3", "--out", str(out), "--quiet"]) == 0
    cs = CalibrationSet.open(out)
    assert cs.synthetic and cs.info()["synthetic"] is True and "SYNTHETIC" in cs.info()["source"]
    assert len(cs) == 2  # two calls of a batch of 3
    assert cs[0].kwargs["input_ids"].shape[0] == 3
    assert main(["--synthetic", "--data", "text-en", "--out", str(tmp_path / "both"), "--quiet"]) == 2
