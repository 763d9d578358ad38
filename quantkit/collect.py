"""Collect real calibration data: run a model over a data source and record what a module receives.

A forward pre-hook (with_kwargs) on the whole model or on `--module NAME` copies every call's
positional and keyword arguments (nested tuples/lists/dicts of tensors, plain values) into shards
of a set folder (format: quantkit.calib). Data sources: a `datasets` dataset saved with
save_to_disk, json/jsonl/csv/parquet/txt files, image folders, and the built-in sets; nothing is
downloaded. `--resume` continues an interrupted collection; no completed shard is lost or repeated.

How a data row reaches the model:
- `--runner pkg.mod:fn` (or `file.py:fn`): `fn(model, row)` runs the pipeline on one row (a dict:
  `{"text": ...}` for text files, the record for json/csv/parquet/datasets rows,
  `{"image": PIL.Image, "path": str, "label": str | None}` for image folders); `model` is the
  loaded nn.Module. One row at a time; every call of the hooked module is one sample, so a
  denoiser called 10 times per row gives 10 samples.
- otherwise a text row (field `--field`, default `text` or the row's first string field) goes
  through the model's tokenizer, `--batch-size` rows per call;
- otherwise a row whose fields are the model's input names (lists/numbers) becomes tensors with a
  leading batch dimension and is passed as keyword arguments.
`--synthetic` replaces the data with random model inputs and marks the set synthetic.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from quantkit import console
from quantkit.digest import sha256_of_file
from quantkit.errors import CalibrationError, InputError, QuantkitError

# torch and quantkit.calib are imported where used, so that `quantkit --help` and the other verbs
# do not pay for torch when the CLI registers this verb's arguments.
if TYPE_CHECKING:
    import torch

    from quantkit.calib import Sample, SetWriter

MANIFEST = "manifest.json"  # = quantkit.calib.MANIFEST
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TEXT_SUFFIXES = {".txt", ".text"}


# ---------------------------------------------------------------------------------------------
# Data sources


class DataSource:
    """Rows (dicts) in a fixed order, and a description for the manifest."""

    def __init__(self, kind: str, path: str | None, rows: Callable[[], Iterator[dict[str, Any]]],
                 length: int | None, description: str, **detail: Any):
        self.kind, self.path, self._rows, self.length = kind, path, rows, length
        self.detail = {"kind": kind, "path": path, "description": description, **detail}

    def rows(self) -> Iterator[dict[str, Any]]:
        return self._rows()


def _text_file(path: Path) -> DataSource:
    from quantkit.calib import read_sentences

    lines = read_sentences(path)
    return DataSource("text-file", str(path), lambda: ({"text": t} for t in lines), len(lines),
                      f"{path} ({len(lines)} lines)", sha256=sha256_of_file(path))


def _json_file(path: Path) -> DataSource:
    records: list[Any] = []
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CalibrationError(f"{path}:{n}: not valid JSON: {e.msg}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
            if isinstance(data, dict):
                lists = [k for k, v in data.items() if isinstance(v, list)]
                if len(lists) != 1:
                    raise CalibrationError(f"{path}: a JSON data file is a list of records (or an object with "
                                           f"exactly one list), found keys {list(data)[:8]}")
                data = data[lists[0]]
            if not isinstance(data, list):
                raise CalibrationError(f"{path}: a JSON data file is a list of records, got {type(data).__name__}")
            records = data
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read: {e}") from None
    rows = [r if isinstance(r, dict) else {"text": r} for r in records]
    return DataSource("json", str(path), lambda: iter(rows), len(rows), f"{path} ({len(rows)} records)",
                      sha256=sha256_of_file(path))


def _csv_file(path: Path) -> DataSource:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CalibrationError(f"{path}: cannot read as CSV: {e}") from None
    return DataSource("csv", str(path), lambda: iter(rows), len(rows), f"{path} ({len(rows)} rows)",
                      sha256=sha256_of_file(path))


def _parquet_file(path: Path) -> DataSource:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(str(path))
        length = pf.metadata.num_rows
    except Exception as e:  # pyarrow raises several types for a bad file
        raise CalibrationError(f"{path}: cannot read as Parquet: {e}") from None

    def rows() -> Iterator[dict[str, Any]]:
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=256):
            yield from batch.to_pylist()

    return DataSource("parquet", str(path), rows, length, f"{path} ({length} rows)", sha256=sha256_of_file(path))


def _hf_dataset(path: Path, split: str | None) -> DataSource:
    try:
        import datasets
    except ImportError as e:
        raise CalibrationError(f"{path}: reading a saved `datasets` dataset needs the datasets package: {e}") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors...
        raise CalibrationError(f"{path}: cannot load with datasets.load_from_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            split = "train" if "train" in names else names[0]
        if split not in ds:
            raise CalibrationError(f"{path}: has no split {split!r}; it has {', '.join(names)}")
        ds = ds[split]
    elif split is not None and split != getattr(ds, "split", split):
        console.warn(f"{path}: a single dataset; --split {split} ignored")
    return DataSource("hf-dataset", str(path), lambda: iter(ds), len(ds),
                      f"{path} (datasets, {len(ds)} rows{', split ' + split if split else ''})",
                      split=split, columns=list(ds.column_names), fingerprint=getattr(ds, "_fingerprint", None))


def _image_folder(path: Path, files: list[Path]) -> DataSource:
    def rows() -> Iterator[dict[str, Any]]:
        from PIL import Image

        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    image = im.copy()
            except Exception as e:
                raise CalibrationError(f"{f}: cannot read as an image: {e}") from None
            rel = f.relative_to(path)
            yield {"image": image, "path": str(f), "label": rel.parts[0] if len(rel.parts) > 1 else None}

    listing = hashlib.sha256("\n".join(str(f.relative_to(path)) for f in files).encode()).hexdigest()
    return DataSource("image-folder", str(path), rows, len(files), f"{path} ({len(files)} images)",
                      listing_sha256=listing)


def _builtin(name: str) -> DataSource:
    from quantkit.calib import calibration_dir

    folder = calibration_dir() / name
    if (folder / MANIFEST).is_file():
        raise CalibrationError(f"{name}: this built-in set holds collected inputs already; pass it as --calib")
    src = _text_file(folder / "sentences.txt")
    src.kind = src.detail["kind"] = "builtin-text"
    src.detail.update(name=name, description=f"built-in {name} ({src.length} sentences)")
    return src


def open_source(spec: str, split: str | None = None) -> DataSource:
    """A data source from a path (file or folder) or a built-in set name; CalibrationError if unreadable."""
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            return _text_file(path)
        if suffix in (".json", ".jsonl"):
            return _json_file(path)
        if suffix == ".csv":
            return _csv_file(path)
        if suffix == ".parquet":
            return _parquet_file(path)
        raise CalibrationError(f"{path}: unsupported data file type {suffix or '(none)'}; use .txt (one sample per "
                               "line), .json, .jsonl, .csv, .parquet, a `datasets` folder or an image folder")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            raise CalibrationError(f"{path}: is a calibration set already (it has {MANIFEST}); pass it as --calib")
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _hf_dataset(path, split)
        if (path / "sentences.txt").is_file():
            return _text_file(path / "sentences.txt")
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            return _image_folder(path, images)
        raise CalibrationError(f"{path}: a folder with no `datasets` dataset (dataset_info.json), sentences.txt or "
                               "images in it")
    from quantkit.calib import builtin_names

    names = builtin_names()
    if spec in names:
        return _builtin(spec)
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CalibrationError(f"{spec}: no such file or folder, and not a built-in set ({', '.join(names) or 'none'}).{hint}")


# ---------------------------------------------------------------------------------------------
# The module to hook


def resolve_module(model: torch.nn.Module, name: str | None) -> torch.nn.Module:
    """The submodule `name` of `model` (None/'': the model); CalibrationError lists close names."""
    if not name:
        return model
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    names = [n for n in modules if n]
    suffix = [n for n in names if n.endswith("." + name) or n.split(".")[-1] == name]
    close = list(dict.fromkeys(suffix + difflib.get_close_matches(name, names, n=5, cutoff=0.5)))[:6]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    sample = ", ".join(n for n in names if "." not in n)[:300]
    raise CalibrationError(f"--module {name}: {type(model).__name__} has no submodule of that name{hint} "
                           f"(top-level modules: {sample or 'none'})")


class CaptureHook:
    """Forward pre-hook copying each call's (args, kwargs) to the CPU as a Sample."""

    def __init__(self, module: torch.nn.Module):
        from quantkit.calib import Sample, detached_copy, encode_sample

        self._sample, self._copy, self._check = Sample, detached_copy, encode_sample
        self.samples: list[Sample] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = self._sample(self._copy(tuple(args)), self._copy(dict(kwargs)))
        self._check(sample)  # fail here, naming the argument, if something cannot be stored
        self.samples.append(sample)

    def take(self) -> list[Sample]:
        out, self.samples = self.samples, []
        return out

    def close(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# Feeding rows to the model


def _text_field(row: Mapping[str, Any], field: str | None) -> str | None:
    if field:
        return field if isinstance(row.get(field), str) else None
    if isinstance(row.get("text"), str):
        return "text"
    return next((k for k, v in row.items() if isinstance(v, str)), None)


def _row_tensors(row: Mapping[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    import torch

    out = {}
    for k in names:
        v = row[k]
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        if t.dtype == torch.float64:
            t = t.float()
        out[k] = t.unsqueeze(0)
    return out


def make_feeder(loaded, first_row: Mapping[str, Any], *, field: str | None, runner: Callable | None,
                batch_size: int, device: torch.device, dtype: torch.dtype | None, synthetic: bool,
                model_kwargs: Mapping[str, Any] | None = None) -> tuple[str, Callable[[list[dict[str, Any]]], None]]:
    """(how, feed(rows)) for this data: `runner`, `text`, `tensors` or `prepared` (synthetic Samples).

    `model_kwargs` are added to each model call quantkit makes (not to a runner's).
    """
    from quantkit.calib import Sample, collate, text_pad_values, to_device

    model = loaded.model
    extra = dict(model_kwargs or {})

    def call(sample: Sample) -> None:
        s = to_device(sample, device, dtype)
        model(*s.args, **s.kwargs, **extra)

    if runner is not None:
        if batch_size != 1:
            raise CalibrationError("--runner gets one data row per call: leave --batch-size at 1 (the runner "
                                   "decides how the pipeline batches)")

        def feed_runner(rows: list[dict[str, Any]]) -> None:
            runner(model, rows[0])

        return "runner", feed_runner
    if synthetic:
        pad = text_pad_values(loaded) if loaded.tokenizer is not None else {}
        return "prepared", lambda rows: call(collate([r["sample"] for r in rows], pad))
    text_key = _text_field(first_row, field)
    if text_key is not None and loaded.tokenizer is not None:
        def feed_text(rows: list[dict[str, Any]]) -> None:
            texts = []
            for r in rows:
                t = r.get(text_key)
                if not isinstance(t, str):
                    raise CalibrationError(f"a data row has no text in field {text_key!r}: {sorted(r)}")
                texts.append(t)
            call(Sample((), dict(loaded.tokenize(texts))))

        return "text", feed_text
    if loaded.input_names:
        names = [k for k in loaded.input_names if k in first_row]
    else:
        names = [k for k, v in first_row.items() if isinstance(v, (list, int, float)) or hasattr(v, "shape")]
    if names:
        pad = text_pad_values(loaded) if loaded.tokenizer is not None else {}

        def feed_tensors(rows: list[dict[str, Any]]) -> None:
            try:
                call(collate([Sample((), _row_tensors(r, names)) for r in rows], pad))
            except ValueError as e:
                raise CalibrationError(f"rows cannot share a batch ({e}); use --batch-size 1") from None
            except KeyError as e:
                raise CalibrationError(f"a data row has no field {e}; the model takes {names}") from None

        return "tensors", feed_tensors
    if "image" in first_row:
        raise CalibrationError("image rows need --runner pkg.mod:fn, a function (model, row) that turns "
                               "{'image': PIL.Image, 'path', 'label'} into the model's inputs and runs it")
    if text_key is not None:
        raise CalibrationError(f"{loaded.spec}: the data is text (field {text_key!r}) but the model has no tokenizer; "
                               "pass --runner pkg.mod:fn that runs the model on a row")
    raise CalibrationError(f"cannot feed rows with fields {sorted(first_row)} to {loaded.spec} (inputs "
                           f"{loaded.input_names or 'unknown'}); pass --field for text, or --runner pkg.mod:fn")


# ---------------------------------------------------------------------------------------------
# The collection


def _seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % (2**32))


def _resolve_device(device: str | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"--device {device}: use cpu or cuda[:N]")
    return torch.device(device)


def collect(model_spec: str | None, out: str | os.PathLike, *, data: str | None = None, module: str | None = None,
            field: str | None = None, split: str | None = None, runner: str | None = None,
            max_samples: int | None = None, batch_size: int = 1, shard_size: int = 64, resume: bool = False,
            overwrite: bool = False, synthetic: bool = False, seed: int = 0, device: str | None = "cpu",
            dtype: str = "fp32", progress: bool = True) -> dict[str, Any]:
    """Collect a calibration set into `out`; returns its manifest. See the module docstring."""
    from quantkit.calib import BATCHING_CALLS, BATCHING_EXAMPLES, synthetic_samples, text_pad_values
    from quantkit.models import DTYPES, _import_callable, load_model

    if batch_size < 1 or shard_size < 1 or (max_samples is not None and max_samples < 1):
        raise CalibrationError("--batch-size, --shard-size and --max-samples must be at least 1")
    if synthetic and data:
        raise CalibrationError("--synthetic and --data exclude each other: pick real data or random data")
    out = Path(out)
    check_collect_output(out, data, resume=resume, overwrite=overwrite)  # before any work
    torch_device = _resolve_device(device)
    torch_dtype = DTYPES[dtype]

    loaded = load_model(model_spec)
    target = resolve_module(loaded.model, module)
    runner_fn = None
    if runner:
        try:
            runner_fn = _import_callable(runner)
        except InputError as e:
            raise CalibrationError(f"--runner {e}") from None

    if synthetic:
        n = max_samples or 64
        samples = synthetic_samples(loaded, n, seed)
        rows_list = [{"sample": s} for s in samples]
        source = DataSource("synthetic", None, lambda: iter(rows_list), n,
                            f"SYNTHETIC random inputs (seed {seed})", seed=seed)
    else:
        data = data or loaded.default_calibration
        if not data:
            raise CalibrationError(f"{loaded.spec}: no --data given and the model has no built-in set; pass --data "
                                   "(a file, a folder or a built-in set name)")
        source = open_source(data, split)

    # A submodule of an HF model would receive a cache object (DynamicCache), which is no data;
    # without the cache it receives what a single full forward gives it.
    model_kwargs = ({"use_cache": False} if module and not runner
                    and getattr(getattr(loaded.model, "config", None), "use_cache", None) is not None else {})
    settings = {"batch_size": batch_size, "shard_size": shard_size, "max_samples": max_samples, "seed": seed,
                "runner": runner, "field": field, "split": split, "dtype": dtype, "model_kwargs": model_kwargs}
    meta = {
        "model": loaded.spec, "model_class": type(loaded.model).__name__,
        "module": module or None, "module_class": type(target).__name__,
        "source": source.detail, "synthetic": synthetic, "collection": settings,
        # Padding is known only for the tokenizer's own outputs, i.e. whole-model text inputs.
        "pad_values": text_pad_values(loaded) if (loaded.tokenizer is not None and not module) else {},
        # Samples are re-batched at replay only when quantkit made their batch dimension itself:
        # whole-model inputs, one data row per call, not through a runner (see quantkit.calib).
        "batching": BATCHING_EXAMPLES if (not module and not runner and batch_size == 1) else BATCHING_CALLS,
    }

    from quantkit.outdir import output_lock

    with output_lock(out):  # a second collection into the same folder exits 2 naming the lock
        return _collect_locked(out, meta, loaded, target, source, module=module, runner=runner, runner_fn=runner_fn,
                               field=field, max_samples=max_samples, batch_size=batch_size, shard_size=shard_size,
                               synthetic=synthetic, seed=seed, device=torch_device, dtype=torch_dtype,
                               model_kwargs=model_kwargs, progress=progress, resume=resume, overwrite=overwrite)


def _collect_locked(out: Path, meta: dict[str, Any], loaded, target, source, *, module, runner, runner_fn, field,
                    max_samples, batch_size, shard_size, synthetic, seed, device, dtype, model_kwargs, progress,
                    resume, overwrite) -> dict[str, Any]:
    torch_device, torch_dtype = device, dtype
    fresh = not (resume and (out / MANIFEST).is_file())
    writer = _open_writer(out, meta, resume=resume, overwrite=overwrite)
    if writer.complete:
        console.info(f"{out}: already complete ({writer.samples} samples); nothing to do")
        return writer.manifest
    try:
        return _collect_into(writer, loaded, target, source, module=module, runner=runner, runner_fn=runner_fn,
                             field=field, max_samples=max_samples, batch_size=batch_size, shard_size=shard_size,
                             synthetic=synthetic, seed=seed, device=torch_device, dtype=torch_dtype,
                             model_kwargs=model_kwargs, progress=progress)
    except BaseException:
        if fresh and writer.samples == 0:  # nothing was collected: leave no empty set behind
            (out / MANIFEST).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _collect_into(writer: SetWriter, loaded, target, source: DataSource, *, module, runner, runner_fn, field,
                  max_samples, batch_size, shard_size, synthetic, seed, device, dtype, model_kwargs,
                  progress) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    out = writer.folder
    torch_device, torch_dtype = device, dtype
    rows_done, taken = writer.rows_done, writer.samples
    if rows_done:
        console.info(f"{out}: resuming after {len(writer.manifest['shards'])} shards, {taken} samples, "
                     f"{rows_done} data rows")

    model = loaded.model
    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    hook = CaptureHook(target)
    buffer: list[Sample] = []
    buffer_start = rows_done
    row_index = 0
    feed = None
    total = source.length
    if total is not None and max_samples is not None and not module and not runner:
        total = min(total, max_samples)  # one sample per row when the whole model is recorded
    bar = tqdm(total=total, initial=min(rows_done, total or rows_done), desc="collect", unit="row", leave=False,
               disable=not progress or console.is_quiet())
    try:
        rows_iter = source.rows()
        for _ in range(rows_done):  # skip the rows that finished shards already hold
            if next(rows_iter, None) is None:
                raise CalibrationError(f"{out}: the data source now has fewer rows ({row_index}) than the "
                                       f"collection had used ({rows_done}); it changed since")
            row_index += 1
        reached = max_samples is not None and taken >= max_samples
        while not reached:
            group = []
            for row in rows_iter:
                group.append(row)
                if len(group) == batch_size:
                    break
            if not group:
                break
            if feed is None:
                how, feed = make_feeder(loaded, group[0], field=field, runner=runner_fn, batch_size=batch_size,
                                        device=torch_device, dtype=torch_dtype, synthetic=synthetic,
                                        model_kwargs=model_kwargs)
                writer.manifest["collection"]["feed"] = how
            _seed_all(seed + row_index)
            try:
                with torch.no_grad():
                    feed(group)
            except QuantkitError:
                raise
            except Exception as e:
                where = f"rows {row_index}-{row_index + len(group) - 1}"
                raise QuantkitError(f"running {loaded.spec} on {where} of {source.detail['description']} failed: "
                                    f"{type(e).__name__}: {e}") from e
            row_index += len(group)
            bar.update(len(group))
            captured = hook.take()
            if max_samples is not None and taken + len(buffer) + len(captured) >= max_samples:
                captured = captured[:max_samples - taken - len(buffer)]
                reached = True
            buffer += captured
            if len(buffer) >= shard_size or (reached and buffer):
                writer.write(buffer, rows=(buffer_start, row_index))
                taken += len(buffer)
                buffer, buffer_start = [], row_index
                bar.set_postfix(samples=taken)
        if buffer:
            writer.write(buffer, rows=(buffer_start, row_index))
            taken += len(buffer)
    finally:
        hook.close()
        bar.close()
    if taken == 0:
        raise CalibrationError(f"{source.detail['description']}: the run captured no call of "
                               f"{module or type(loaded.model).__name__}; is that module used by the pipeline?")
    return writer.finish()


# What a calibration set folder holds: replacing a folder with anything else in it would lose it.
_SET_FILE = re.compile(r"manifest\.json|shard-\d{5}\.safetensors|\.shard-\d{5}\.safetensors\.tmp-\d+|"
                       r"\.manifest\.json\..*\.tmp|\.quantkit-output")


def check_collect_output(out: Path, data: str | None = None, *, resume: bool = False, overwrite: bool = False) -> None:
    """Before any work: `out` may be written (quantkit.outdir.check_output), and with --overwrite it
    is replaced only when it is a quantkit calibration set holding nothing but the set's files."""
    from quantkit.outdir import check_output

    protect = [data] if data and Path(data).exists() else []
    check_output(out, protect=protect, replace=False)
    if not (overwrite and not resume and (out / MANIFEST).is_file()):
        return
    from quantkit.calib import FORMAT
    from quantkit.textlimits import read_json_limited

    try:
        manifest = read_json_limited(out / MANIFEST, "calibration manifest")
    except InputError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CalibrationError(f"{out}: its {MANIFEST} is not a quantkit calibration manifest (no \"format\": "
                               f"\"{FORMAT}\"); --overwrite replaces only a calibration set: pick another --out")
    others = sorted(p.name for p in out.iterdir() if not _SET_FILE.fullmatch(p.name))
    if others:
        from quantkit.textlimits import shorten

        raise CalibrationError(f"{out}: holds files that are not part of the calibration set ({shorten(others)}); "
                               "--overwrite will not delete them: move them or pick another --out")


def _open_writer(out: Path, meta: dict[str, Any], *, resume: bool, overwrite: bool) -> SetWriter:
    from quantkit.calib import SetWriter, read_manifest

    has_manifest = (out / MANIFEST).is_file()
    if has_manifest and resume:
        previous = read_manifest(out)
        mismatched = [k for k in ("model", "module", "synthetic", "collection")
                      if _comparable(previous.get(k), k) != _comparable(meta.get(k), k)]
        prev_src, src = previous.get("source") or {}, meta["source"]
        mismatched += [f"source.{k}" for k in ("kind", "path", "sha256", "listing_sha256", "split", "seed")
                       if prev_src.get(k) != src.get(k)]
        if mismatched:
            raise CalibrationError(f"{out}: --resume with different settings ({', '.join(mismatched)}) than the "
                                   "collection being resumed; use the same arguments, or --overwrite to start over")
        return SetWriter.resume(out)
    if has_manifest and not overwrite:
        raise CalibrationError(f"{out}: holds a calibration set already; pass --resume to continue it or "
                               "--overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not has_manifest:
            raise CalibrationError(f"{out}: exists and is not empty (and not a calibration set); pick a new folder")
        check_collect_output(out, overwrite=True)  # again, under the lock: only a set's own files go
        import shutil

        shutil.rmtree(out)
    return SetWriter.create(out, meta)


def _comparable(value: Any, key: str) -> Any:
    if key == "collection" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "feed"}
    return value


# ---------------------------------------------------------------------------------------------
# Command line (scripts/collect_calibration.py and `quantkit collect`)
