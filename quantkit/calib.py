"""Calibration sets: real inputs of a model (or of one submodule) on disk, validated, split and replayed.

A set is a folder: `manifest.json` plus `shard-NNNNN.safetensors` files, each holding whole
samples. A sample is one captured call, `Sample(args, kwargs)`, kept exactly as the module
received it: nested tuples/lists/dicts of tensors (KV caches, masks) and plain values (ints,
floats, strings, None). `CalibrationSet` opens and checks such a folder (or wraps samples in
memory), splits it into calibration and held-out parts, batches it and drives `mtq.quantize`.

Why safetensors and not the `datasets` Arrow format: samples are trees of tensors whose shapes
vary from sample to sample and from field to field (token lengths, KV-cache layers), in dtypes
Arrow has no type for (bfloat16, float8); safetensors stores each tensor's raw bytes with its
dtype and shape (bit-exact by construction), never unpickles anything (a shard from a stranger
cannot run code), reads one shard without the others, and needs only the small `safetensors`
package to load. The tree of each sample is JSON in the shard's header; the manifest carries the
per-field dtypes and shapes, the source, the model and module, and each shard's size and sha256.

Batching (`batches`, `forward_loop`): a set marked `batching: examples` holds one example per
sample, every tensor with a leading batch dimension of 1 that quantkit itself added (the built-in
text sets, whole-model inputs collected from text or tensor rows one row per call, synthetic
inputs). It is batched `batch_size` samples at a time: tensors are concatenated along dim 0 and,
for fields named in the set's `pad_values` (input_ids -> the tokenizer's pad id, attention_mask,
token_type_ids and position_ids -> 0), right-padded to the longest sample; samples whose other
shapes or plain values differ go to different batches (grouped by shape, in first-seen order).
Every other set (`batching: calls`: captured submodule or pipeline calls, where a leading 1 may
be no batch dimension at all, e.g. a timestep of shape [1]) is replayed one captured call per
batch, exactly as captured; `batch_size` does not apply to it.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import random
import re
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from quantkit.errors import CalibrationError

if TYPE_CHECKING:
    from torch import nn

    from quantkit.models import LoadedModel

FORMAT = "quantkit.calibration"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"shard-(\d{5})\.safetensors")

BATCHING_EXAMPLES = "examples"  # one example per sample: concatenate (and pad) into batches
BATCHING_CALLS = "calls"  # one captured call per sample: replay each alone


# ---------------------------------------------------------------------------------------------
# Samples and their trees


@dataclasses.dataclass
class Sample:
    """The positional and keyword arguments of one call, as the module received them."""

    args: tuple = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CalibrationError(f"unknown torch dtype {name!r}")
    return dtype


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree for `obj`; tensors go into `tensors` under their path (e.g. kwargs.cache.0.1)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.is_quantized or obj.device.type == "meta":
            raise CalibrationError(f"{path}: a {obj.layout}/{obj.device.type} tensor cannot be stored; "
                                   "pass dense tensors")
        tensors[path] = obj
        return {"t": path}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    if isinstance(obj, torch.dtype):
        return {"dtype": _dtype_name(obj)}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(x, f"{path}.{i}", tensors) for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return {"list": [_encode(x, f"{path}.{i}", tensors) for i, x in enumerate(obj)]}
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CalibrationError(f"{path}: dict key {k!r} is not a string or an int")
            items.append([k, _encode(v, f"{path}.{k}", tensors)])
        return {"dict": items}
    raise CalibrationError(
        f"{path}: cannot store a {type(obj).__module__}.{type(obj).__qualname__}; calibration samples hold "
        "tensors, None, bool/int/float/str and tuples/lists/dicts of them (for a KV-cache object, pass "
        "its tensors, e.g. use_cache=False or a tuple of (key, value) pairs)")


def _decode(node: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    if "t" in node:
        return tensor(node["t"])
    if "v" in node:
        return node["v"]
    if "dtype" in node:
        return _dtype_from_name(node["dtype"])
    if "tuple" in node:
        return tuple(_decode(x, tensor) for x in node["tuple"])
    if "list" in node:
        return [_decode(x, tensor) for x in node["list"]]
    if "dict" in node:
        return {k: _decode(v, tensor) for k, v in node["dict"]}
    raise CalibrationError(f"malformed sample tree node {node!r}")


def encode_sample(sample: Sample) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON tree, {path: tensor}) of a sample; paths start with `args.` or `kwargs.`."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {"args": _encode(tuple(sample.args), "args", tensors)["tuple"],
            "kwargs": _encode(dict(sample.kwargs), "kwargs", tensors)["dict"]}
    return tree, tensors


def decode_sample(tree: Mapping[str, Any], tensor: Callable[[str], torch.Tensor]) -> Sample:
    return Sample(args=tuple(_decode(x, tensor) for x in tree["args"]),
                  kwargs={k: _decode(v, tensor) for k, v in tree["kwargs"]})


def detached_copy(obj: Any) -> Any:
    """`obj` with every tensor detached and copied to the CPU (the model may later change it in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, tuple):
        return tuple(detached_copy(x) for x in obj)
    if isinstance(obj, list):
        return [detached_copy(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: detached_copy(v) for k, v in obj.items()}
    return obj


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(sample: Sample, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Sample:
    """Tensors moved to `device`; floating tensors cast to `dtype`, integer and bool tensors unchanged."""

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

    return Sample(_map_tensors(tuple(sample.args), move), _map_tensors(dict(sample.kwargs), move))


# ---------------------------------------------------------------------------------------------
# Fields: per-path dtype and shape, as recorded in the manifest


def sample_fields(sample: Sample) -> dict[str, dict[str, Any]]:
    tree, tensors = encode_sample(sample)
    fields = {p: {"kind": "tensor", "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for p, t in tensors.items()}

    def values(node: Any, path: str) -> None:
        if "v" in node:
            fields[path] = {"kind": "value", "type": type(node["v"]).__name__}
        elif "dtype" in node:
            fields[path] = {"kind": "value", "type": "dtype"}
        for key in ("tuple", "list"):
            for i, x in enumerate(node.get(key, ())):
                values(x, f"{path}.{i}")
        for k, v in node.get("dict", ()):
            values(v, f"{path}.{k}")

    values({"tuple": tree["args"]}, "args")
    values({"dict": tree["kwargs"]}, "kwargs")
    return fields


def merge_fields(into: dict[str, dict[str, Any]], sample: Sample) -> dict[str, dict[str, Any]]:
    """Fold one sample's fields into a summary: dtype, and `shape` if constant else shape_min/max."""
    for path, f in sample_fields(sample).items():
        have = into.get(path)
        if f["kind"] == "value":
            if have is None:
                into[path] = f
            elif have.get("type") != f["type"]:
                have["type"] = "mixed"
            continue
        shape = f.pop("shape")
        if have is None:
            into[path] = {**f, "shape_min": shape, "shape_max": list(shape)}
            continue
        if have.get("dtype") != f["dtype"]:
            have["dtype"] = "mixed"
        lo, hi = have.get("shape_min"), have.get("shape_max")
        if lo is not None and len(lo) == len(shape):
            have["shape_min"] = [min(a, b) for a, b in zip(lo, shape)]
            have["shape_max"] = [max(a, b) for a, b in zip(hi, shape)]
        else:
            have["shape_min"] = have["shape_max"] = None  # rank varies
    return into


def _present_fields(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, f in fields.items():
        f = dict(f)
        if f.get("kind") == "tensor" and f.get("shape_min") is not None and f["shape_min"] == f["shape_max"]:
            f["shape"] = f.pop("shape_min")
            f.pop("shape_max")
        out[path] = f
    return out


def batching_for(fields: Mapping[str, Mapping[str, Any]], declared: str | None = BATCHING_EXAMPLES) -> str:
    """`examples` when so declared and every tensor has a leading dimension of exactly 1, else `calls`."""
    if declared != BATCHING_EXAMPLES:
        return BATCHING_CALLS
    tensors = [f for f in fields.values() if f.get("kind") == "tensor"]
    if not tensors:
        return BATCHING_CALLS
    for f in tensors:
        lo, hi = f.get("shape_min"), f.get("shape_max")
        if not lo or not hi or lo[0] != 1 or hi[0] != 1:
            return BATCHING_CALLS
    return BATCHING_EXAMPLES


# ---------------------------------------------------------------------------------------------
# Batching


def _leaf_name(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _signature(sample: Sample, pad_values: Mapping[str, Any]) -> str:
    """Samples with equal signatures can be concatenated: same tree, plain values, dtypes and
    shapes, except the non-batch dims of padded fields."""
    tree, tensors = encode_sample(sample)
    shapes = {p: (_dtype_name(t.dtype), t.dim() if _leaf_name(p) in pad_values else list(t.shape[1:]))
              for p, t in tensors.items()}
    return json.dumps([tree, shapes], sort_keys=False, default=str)


def collate(samples: Sequence[Sample], pad_values: Mapping[str, Any] | None = None) -> Sample:
    """One batch from examples: tensors concatenated on dim 0, padded fields right-padded.

    Raises ValueError when the samples cannot share a batch (different trees, plain values or
    shapes outside the padded fields).
    """
    pad_values = pad_values or {}
    if len(samples) == 1:
        return samples[0]
    sig = _signature(samples[0], pad_values)
    for s in samples[1:]:
        if _signature(s, pad_values) != sig:
            raise ValueError("samples differ in structure, plain values or shapes")
    trees_tensors = [encode_sample(s) for s in samples]
    tree = trees_tensors[0][0]
    merged: dict[str, torch.Tensor] = {}
    for path, first in trees_tensors[0][1].items():
        parts = [tt[1][path] for tt in trees_tensors]
        if first.dim() == 0:
            raise ValueError(f"{path}: a 0-dim tensor has no batch dimension")
        pad = pad_values.get(_leaf_name(path))
        if pad is not None:
            target = [max(p.shape[d] for p in parts) for d in range(1, first.dim())]
            padded = []
            for p in parts:
                if list(p.shape[1:]) != target:
                    full = p.new_full((p.shape[0], *target), pad)
                    full[tuple(slice(0, n) for n in p.shape)] = p
                    p = full
                padded.append(p)
            parts = padded
        merged[path] = torch.cat(parts, dim=0)
    return decode_sample(tree, merged.__getitem__)


# ---------------------------------------------------------------------------------------------
# Where samples live: in memory, or in shards on disk


class _MemoryStore:
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> Sample:
        return self.samples[index]


class _ShardStore:
    """Samples of a validated set folder, read a shard at a time (the last few are kept)."""

    def __init__(self, path: Path, shards: list[dict[str, Any]], cache_shards: int = 2):
        self.path = path
        self.shards = shards
        self.starts = []
        total = 0
        for s in shards:
            self.starts.append(total)
            total += int(s["samples"])
        self.total = total
        self._cache: OrderedDict[int, list[Sample]] = OrderedDict()
        self._cache_shards = cache_shards

    def __len__(self) -> int:
        return self.total

    def _load(self, k: int) -> list[Sample]:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        samples = read_shard(self.path / self.shards[k]["file"])
        if len(samples) != int(self.shards[k]["samples"]):
            raise CalibrationError(f"{self.path / self.shards[k]['file']}: holds {len(samples)} samples, "
                                   f"{MANIFEST} says {self.shards[k]['samples']}")
        self._cache[k] = samples
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return samples

    def get(self, index: int) -> Sample:
        import bisect

        k = bisect.bisect_right(self.starts, index) - 1
        return self._load(k)[index - self.starts[k]]


def read_shard(path: Path) -> list[Sample]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CalibrationError(f"{path}: not a readable safetensors shard: {e}") from None
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not a quantkit calibration shard (header format {meta.get('format')!r})")
    try:
        trees = json.loads(meta["samples"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: shard header has no readable sample list: {e}") from None
    out = []
    for i, tree in enumerate(trees):
        def tensor(p: str, i: int = i) -> torch.Tensor:
            key = f"{i}/{p}"
            if key not in tensors:
                raise CalibrationError(f"{path}: sample {i} names tensor {p!r}, which the shard does not hold")
            return tensors[key]

        out.append(decode_sample(tree, tensor))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_shard(path: Path, samples: Sequence[Sample]) -> dict[str, Any]:
    """Write samples to `path` atomically (temp file, fsync, rename); returns the manifest entry."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    trees = []
    for i, s in enumerate(samples):
        tree, ts = encode_sample(s)
        trees.append(tree)
        for p, t in ts.items():
            # A copy of its own: safetensors refuses tensors that share memory (views, repeats).
            tensors[f"{i}/{p}"] = t.detach().to("cpu", copy=True).contiguous()
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "samples": json.dumps(trees, allow_nan=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest, size = _sha256(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {"file": path.name, "samples": len(samples), "bytes": size, "sha256": digest}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    from quantkit.outdir import atomic_write_json

    atomic_write_json(folder / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------
# Reading and checking a set folder


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a set folder, with its format and version checked (CalibrationError if not)."""
    folder = Path(folder)
    if not folder.exists():
        raise CalibrationError(f"{folder}: no such calibration set folder; collect one with `quantkit collect "
                               f"--out {folder}`")
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: a calibration set is a folder (manifest.json + shards), not a file")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CalibrationError(f"{mpath}: missing; {folder} is not a calibration set (collect one with "
                               "`quantkit collect`)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{mpath}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CalibrationError(f"{mpath}: not a quantkit calibration manifest (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                               f"expected {FORMAT!r})")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise CalibrationError(f"{mpath}: format version {version!r} is incompatible with this quantkit, which "
                               f"reads version {FORMAT_VERSION}; collect the set again with this version")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "samples", "bytes", "sha256"}
                                               <= set(s) for s in shards):
        raise CalibrationError(f"{mpath}: `shards` must list {{file, samples, bytes, sha256}} entries")
    return manifest


def verify_shards(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every listed shard exists, has the listed size and sha256 (CalibrationError naming the file)."""
    folder = Path(folder)
    for s in manifest["shards"]:
        name = str(s["file"])
        if Path(name).name != name or not _SHARD_RE.fullmatch(name):
            raise CalibrationError(f"{folder / MANIFEST}: bad shard file name {name!r}")
        p = folder / name
        if not p.is_file():
            raise CalibrationError(f"{p}: shard is missing (listed in {MANIFEST} with {s['samples']} samples)")
        size = p.stat().st_size
        if size != int(s["bytes"]):
            raise CalibrationError(f"{p}: shard is truncated or altered: {size} bytes, {MANIFEST} says {s['bytes']}")
        if _sha256(p) != s["sha256"]:
            raise CalibrationError(f"{p}: checksum mismatch (sha256 differs from {MANIFEST}): the shard is corrupt")
    listed = sum(int(s["samples"]) for s in manifest["shards"])
    if "samples" in manifest and int(manifest["samples"]) != listed:
        raise CalibrationError(f"{folder / MANIFEST}: says {manifest['samples']} samples but its shards hold {listed}")


# ---------------------------------------------------------------------------------------------
# The set


class CalibrationSet:
    """An ordered, immutable collection of samples with where they came from.

    Make one with `CalibrationSet.open(folder)`, `CalibrationSet.from_samples(...)`,
    `builtin_set(loaded)` or `synthetic_set(loaded, n, seed)`. `split`/`subset` return views that
    share the samples.
    """

    def __init__(self, store: _MemoryStore | _ShardStore, meta: dict[str, Any], indices: Sequence[int] | None = None,
                 fields: dict[str, dict[str, Any]] | None = None):
        self._store = store
        self._meta = meta
        self._indices = list(range(len(store))) if indices is None else list(indices)
        self._fields = fields

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CalibrationSet":
        """Open a set folder; CalibrationError names a missing, truncated or corrupt shard."""
        folder = Path(path)
        manifest = read_manifest(folder)
        verify_shards(folder, manifest)
        store = _ShardStore(folder, manifest["shards"])
        if len(store) == 0:
            raise CalibrationError(f"{folder}: the set holds no samples")
        meta = dict(manifest)
        meta["path"] = str(folder.resolve())
        if not manifest.get("complete", False):
            from quantkit import console

            console.warn(f"{folder}: collection did not finish ({len(store)} samples so far); "
                         "`quantkit collect ... --resume` completes it")
        return cls(store, meta, fields=manifest.get("fields"))

    @classmethod
    def from_samples(cls, samples: Iterable[Sample | Mapping[str, Any]], meta: Mapping[str, Any] | None = None
                     ) -> "CalibrationSet":
        """A set in memory; a plain mapping is taken as a sample's kwargs."""
        samples = [s if isinstance(s, Sample) else Sample((), dict(s)) for s in samples]
        meta = dict(meta or {})
        fields: dict[str, dict[str, Any]] = {}
        for s in samples:
            merge_fields(fields, s)
        meta["batching"] = batching_for(fields, meta.get("batching", BATCHING_CALLS))
        meta.setdefault("synthetic", False)
        meta.setdefault("pad_values", {})
        return cls(_MemoryStore(samples), meta, fields=fields)

    # -- what it is ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Sample:
        return self._store.get(self._indices[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in self._indices:
            yield self._store.get(i)

    def __repr__(self) -> str:
        return f"CalibrationSet({len(self)} samples from {self.source}{', SYNTHETIC' if self.synthetic else ''})"

    @property
    def synthetic(self) -> bool:
        return bool(self._meta.get("synthetic"))

    @property
    def path(self) -> Path | None:
        p = self._meta.get("path")
        return Path(p) if p else None

    @property
    def module(self) -> str | None:
        """The submodule whose inputs these are (None: the whole model)."""
        return self._meta.get("module") or None

    @property
    def batching(self) -> str:
        return self._meta.get("batching") or BATCHING_CALLS

    @property
    def pad_values(self) -> dict[str, Any]:
        return dict(self._meta.get("pad_values") or {})

    @property
    def source(self) -> str:
        src = self._meta.get("source")
        if isinstance(src, Mapping):
            return str(src.get("description") or src.get("path") or src.get("kind"))
        return str(src or "unknown")

    @property
    def fields(self) -> dict[str, dict[str, Any]]:
        """path -> {kind: tensor, dtype, shape | shape_min/shape_max} or {kind: value, type}, over the whole set."""
        if self._fields is None:
            fields: dict[str, dict[str, Any]] = {}
            for s in self:
                merge_fields(fields, s)
            self._fields = fields
        return _present_fields(self._fields)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def info(self) -> dict[str, Any]:
        """What report.json records under "calibration"."""
        m = self._meta
        src = m.get("source")
        out = {
            "path": m.get("path"),
            "source": self.source,
            "source_detail": dict(src) if isinstance(src, Mapping) else None,
            "synthetic": self.synthetic,
            "samples_total": len(self),
            "model": m.get("model"),
            "module": self.module,
            "created": m.get("created"),
            "batching": self.batching,
            "complete": m.get("complete", True),
            "format_version": m.get("version", FORMAT_VERSION) if m.get("path") else None,
            "fields": self.fields,
        }
        if len(self) != len(self._store):
            out["subset_of"] = len(self._store)
        for key in ("tokenizer", "max_length", "seed"):
            if key in m:
                out[key] = m[key]
        return out

    # -- views ---------------------------------------------------------------------------------

    def subset(self, indices: Iterable[int] | slice) -> "CalibrationSet":
        """A view of the samples at `indices` (positions in this set)."""
        if isinstance(indices, slice):
            picked = self._indices[indices]
        else:
            picked = []
            for i in indices:
                if not -len(self) <= i < len(self):
                    raise IndexError(f"sample {i} out of range for a set of {len(self)}")
                picked.append(self._indices[i])
        return CalibrationSet(self._store, self._meta, picked, self._fields)

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple["CalibrationSet", "CalibrationSet"]:
        """(calibration, held-out): disjoint, deterministic for (len, fraction, seed), each in set order.

        Reports evaluate on the held-out part only. With at least 2 samples each part gets at least one.
        """
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        n = len(self)
        k = round(n * heldout_fraction)
        if heldout_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        held = set(random.Random(seed).sample(range(n), k))
        calib = [i for i in range(n) if i not in held]
        return self.subset(calib), self.subset(sorted(held))

    # -- replay --------------------------------------------------------------------------------

    def batch_groups(self, batch_size: int) -> list[list[int]]:
        """Positions of the samples in each batch (see the module docstring for the rule)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.batching != BATCHING_EXAMPLES or batch_size == 1:
            return [[i] for i in range(len(self))]
        pad = self.pad_values
        open_groups: dict[str, list[int]] = {}
        done: list[tuple[int, list[int]]] = []
        for i in range(len(self)):
            sig = _signature(self[i], pad)
            group = open_groups.setdefault(sig, [])
            group.append(i)
            if len(group) == batch_size:
                done.append((group[0], group))
                del open_groups[sig]
        done += [(g[0], g) for g in open_groups.values()]
        done.sort(key=lambda x: x[0])
        return [g for _, g in done]

    def batches(self, batch_size: int = 8, device: torch.device | str | None = "cpu", dtype: torch.dtype | None = None
                ) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """(args, kwargs) per batch on `device`; floating tensors cast to `dtype`, integers unchanged."""
        pad = self.pad_values
        for group in self.batch_groups(batch_size):
            sample = collate([self[i] for i in group], pad)
            sample = to_device(sample, device, dtype)
            yield sample.args, sample.kwargs

    def forward_loop(self, batch_size: int = 8, device: torch.device | str | None = "cpu",
                     dtype: torch.dtype | None = None, progress: bool = True,
                     groups: Sequence[Sequence[int]] | None = None, desc: str = "calibrate"
                     ) -> Callable[["nn.Module"], None]:
        """A `forward_loop(model)` for `mtq.quantize`: runs every batch through the model.

        `groups` runs only those batches (sample positions per batch, as `batch_groups` gives them):
        a data-parallel rank's shard, batched exactly as the single-process run batches it.
        For a set captured at a submodule (`module`), the loop calls `model.get_submodule(module)`
        when the model has it (quantize the whole pipeline, calibrate that part), else `model`
        itself (the model passed in is that submodule). Progress counts samples.
        """
        def loop(model: "nn.Module") -> None:
            from tqdm.auto import tqdm

            from quantkit import console

            target = self.target_of(model)
            batches = self.batch_groups(batch_size) if groups is None else [list(g) for g in groups]
            pad = self.pad_values
            with torch.no_grad(), tqdm(total=sum(len(g) for g in batches), desc=desc, unit="sample", leave=False,
                                       disable=not progress or console.is_quiet()) as bar:
                for group in batches:
                    s = to_device(collate([self[i] for i in group], pad), device, dtype)
                    target(*s.args, **s.kwargs)
                    bar.update(len(group))

        return loop

    def target_of(self, model: "nn.Module") -> "nn.Module":
        name = self.module
        if not name:
            return model
        try:
            return model.get_submodule(name)
        except AttributeError:
            return model

    # -- writing -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, shard_size: int = 64) -> Path:
        """Write this set (or view) as a set folder; the folder must not hold a set yet."""
        folder = Path(path)
        meta = {k: v for k, v in self._meta.items() if k not in ("path", "shards", "samples", "fields", "version",
                                                                   "format", "complete", "updated")}
        writer = SetWriter.create(folder, meta)
        samples = list(self)
        for start in range(0, len(samples), shard_size):
            writer.write(samples[start:start + shard_size], rows=(start, min(start + shard_size, len(samples))))
        writer.finish()
        return folder


class SetWriter:
    """Appends shards to a set folder; the manifest only ever lists shards written in full.

    Order of a write: shard to a temporary name, fsync, rename into place, then the manifest
    (atomically). A crash before the manifest update leaves an unlisted shard that a resume
    overwrites; a listed shard is always complete and carries its sha256.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest

    @classmethod
    def create(cls, folder: Path, meta: Mapping[str, Any]) -> "SetWriter":
        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise CalibrationError(f"{folder}: already holds a calibration set")
        folder.mkdir(parents=True, exist_ok=True)
        now = _now()
        from quantkit import __version__

        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "quantkit_version": __version__,
                    "created": now, "updated": now, "complete": False, "synthetic": False,
                    **meta, "samples": 0, "rows_done": 0, "fields": {}, "shards": []}
        manifest.update(format=FORMAT, version=FORMAT_VERSION, complete=False)
        writer = cls(folder, manifest)
        writer._remove_stale()
        _write_manifest(folder, manifest)
        return writer

    @classmethod
    def resume(cls, folder: Path) -> "SetWriter":
        """Continue a set folder: listed shards are checked; unlisted and temporary files are removed."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_shards(folder, manifest)
        writer = cls(folder, manifest)
        writer._remove_stale()
        return writer

    def _remove_stale(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in self.folder.iterdir():
            stale_tmp = p.name.startswith(".shard-") and ".tmp-" in p.name
            if stale_tmp or (_SHARD_RE.fullmatch(p.name) and p.name not in listed):
                p.unlink(missing_ok=True)

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    @property
    def rows_done(self) -> int:
        return int(self.manifest.get("rows_done", 0))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def write(self, samples: Sequence[Sample], rows: tuple[int, int]) -> dict[str, Any]:
        """Write one shard of `samples`, which came from data rows [rows[0], rows[1])."""
        index = len(self.manifest["shards"])
        entry = write_shard(self.folder / SHARD_PATTERN.format(index), samples)
        entry["first_sample"] = self.samples
        entry["rows"] = [int(rows[0]), int(rows[1])]
        fields = self.manifest.setdefault("fields", {})
        for s in samples:
            merge_fields(fields, s)
        _crash_point("before-manifest", index)
        self.manifest["shards"].append(entry)
        self.manifest["samples"] = self.samples + len(samples)
        self.manifest["rows_done"] = int(rows[1])
        self.manifest["batching"] = batching_for(fields, self.manifest.get("batching"))
        self.manifest["updated"] = _now()
        _write_manifest(self.folder, self.manifest)
        _crash_point("after-shard", index)
        return entry

    def finish(self, **extra: Any) -> dict[str, Any]:
        if self.samples == 0:
            raise CalibrationError(f"{self.folder}: no samples were captured, nothing to write")
        self.manifest.update(extra)
        self.manifest["batching"] = batching_for(self.manifest["fields"], self.manifest.get("batching"))
        self.manifest["complete"] = True
        self.manifest["updated"] = _now()
        _write_manifest(self.folder, self.manifest)
        return self.manifest


# Test hook: QUANTKIT_COLLECT_CRASH=<point>:<shard index> makes the process exit hard (os._exit)
# at that point, as a kill would. Points: before-manifest (the shard file is in place but not
# listed), after-shard (shard and manifest written).
_CRASH_ENV = "QUANTKIT_COLLECT_CRASH"


def _crash_point(point: str, index: int) -> None:
    spec = os.environ.get(_CRASH_ENV)
    if spec and spec == f"{point}:{index}":
        os._exit(17)


# ---------------------------------------------------------------------------------------------
# Built-in and synthetic sets


def calibration_dir() -> Path:
    """calibration/ of a checkout, else the `quantkit.calibration` data package of a wheel."""
    import quantkit

    root = Path(quantkit.__file__).resolve().parent.parent
    if (root / "calibration").is_dir() and (root / "pyproject.toml").is_file():
        return root / "calibration"
    # A data package without __init__.py is a namespace package: resources.files() gives a
    # MultiplexedPath there, whose str() is no path; the spec's search location is.
    import importlib.util

    spec = importlib.util.find_spec("quantkit.calibration")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(str(resources.files("quantkit.calibration")))


def builtin_names() -> list[str]:
    d = calibration_dir()
    return sorted(p.name for p in d.iterdir()
                  if p.is_dir() and ((p / "sentences.txt").is_file() or (p / MANIFEST).is_file())) if d.is_dir() else []


def read_sentences(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_pad_values(loaded: "LoadedModel") -> dict[str, Any]:
    """Padding for tokenized whole-model inputs: input_ids -> pad id, masks and type ids -> 0."""
    tok = loaded.tokenizer
    pad_id = getattr(tok, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tok, "eos_token_id", None) or 0
    return {"input_ids": int(pad_id), "attention_mask": 0, "token_type_ids": 0, "position_ids": 0}


def text_samples(loaded: "LoadedModel", texts: Sequence[str]) -> list[Sample]:
    """One unpadded sample (kwargs of [1, L] tensors) per text, from the model's tokenizer."""
    return [Sample((), {k: v.clone() for k, v in loaded.tokenize([t]).items()}) for t in texts]


def builtin_set(loaded: "LoadedModel", name: str | None = None, max_samples: int | None = None) -> CalibrationSet:
    """The built-in set `name` (default: the model's) from calibration/<name>/.

    A text set is tokenized here, one sentence per sample, unpadded; a collected set is opened.
    """
    name = name or loaded.default_calibration
    if not name:
        raise CalibrationError(f"{loaded.spec}: has no built-in calibration set; collect one with "
                               "`quantkit collect` and pass --calib (built-in sets: "
                               f"{', '.join(builtin_names()) or 'none'})")
    folder = calibration_dir() / name
    if not folder.is_dir():
        close = difflib.get_close_matches(name, builtin_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CalibrationError(f"{name}: no built-in calibration set of that name in {calibration_dir()} "
                               f"(there are: {', '.join(builtin_names()) or 'none'}){hint}")
    if (folder / MANIFEST).is_file():
        cs = CalibrationSet.open(folder)
        return cs.subset(range(min(max_samples, len(cs)))) if max_samples else cs
    path = folder / "sentences.txt"
    if not path.is_file():
        raise CalibrationError(f"{folder}: holds neither sentences.txt nor {MANIFEST}")
    if loaded.tokenizer is None:
        raise CalibrationError(f"{name}: is a text set, but {loaded.spec} has no tokenizer; collect its inputs "
                               "with `quantkit collect` and pass --calib")
    sentences = read_sentences(path)
    if max_samples:
        sentences = sentences[:max_samples]
    if not sentences:
        raise CalibrationError(f"{path}: holds no sentences")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = {
        "source": {"kind": "builtin-text", "name": name, "path": str(path), "sha256": digest,
                   "description": f"built-in {name} ({len(sentences)} sentences, calibration/{name}/sentences.txt)"},
        "model": loaded.spec, "module": None, "synthetic": False, "created": _now(),
        "batching": BATCHING_EXAMPLES, "pad_values": text_pad_values(loaded),
        "tokenizer": type(loaded.tokenizer).__name__, "max_length": loaded.max_length,
    }
    return CalibrationSet.from_samples(text_samples(loaded, sentences), meta)


def synthetic_samples(loaded: "LoadedModel", n: int, seed: int) -> list[Sample]:
    """Random model inputs: token ids for a tokenizer model, else noise shaped like example_inputs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    if loaded.tokenizer is not None and "input_ids" in loaded.input_names:
        vocab = int(getattr(loaded.tokenizer, "vocab_size", None) or len(loaded.tokenizer))
        hi = max(9, min(48, loaded.max_length))
        for _ in range(n):
            length = int(torch.randint(8, hi + 1, (1,), generator=g))
            kw = {"input_ids": torch.randint(0, vocab, (1, length), generator=g)}
            if "attention_mask" in loaded.input_names:
                kw["attention_mask"] = torch.ones(1, length, dtype=torch.long)
            if "token_type_ids" in loaded.input_names:
                kw["token_type_ids"] = torch.zeros(1, length, dtype=torch.long)
            out.append(Sample((), kw))
        return out
    if loaded.example_inputs:
        for _ in range(n):
            kw = {}
            for k, v in loaded.example_inputs.items():
                if v.is_floating_point():
                    kw[k] = torch.randn(v.shape, generator=g).to(v.dtype)
                elif v.dtype == torch.bool:
                    kw[k] = torch.randint(0, 2, v.shape, generator=g).bool()
                else:
                    lo, hi = (int(v.min()), int(v.max())) if v.numel() else (0, 0)
                    kw[k] = torch.randint(lo, hi + 1, v.shape, generator=g).to(v.dtype)
            out.append(Sample((), kw))
        return out
    raise CalibrationError(f"{loaded.spec}: cannot make synthetic inputs: the model has neither a tokenizer nor "
                           "example inputs")


def synthetic_set(loaded: "LoadedModel", n: int = 64, seed: int = 0) -> CalibrationSet:
    """Random inputs, marked synthetic (reports say so). Only for an explicit --synthetic."""
    if n < 1:
        raise CalibrationError(f"--synthetic needs at least one sample, got {n}")
    meta = {"source": {"kind": "synthetic", "seed": seed, "description": f"SYNTHETIC random inputs (seed {seed})"},
            "model": loaded.spec, "module": None, "synthetic": True, "created": _now(), "seed": seed,
            "batching": BATCHING_EXAMPLES,  # falls back to calls for example_inputs without a batch dim of 1
            "pad_values": text_pad_values(loaded) if loaded.tokenizer is not None else {}}
    return CalibrationSet.from_samples(synthetic_samples(loaded, n, seed), meta)
