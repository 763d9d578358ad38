"""The on-disk format of a set folder: `manifest.json` plus `shard-NNNNN.safetensors` files.

Reading (`read_manifest`, `verify_shards`, `read_shard`, `ShardStore`) checks what it reads and
names the file on any fault; writing (`write_shard`, `SetWriter`) is crash-safe: a shard is renamed
into place before the manifest lists it, and the manifest is replaced atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from quantkit.calib.batching import batching_for
from quantkit.calib.codec import Sample, decode_sample, encode_sample, merge_fields
from quantkit.digest import sha256_of_file
from quantkit.errors import CalibrationError
from quantkit.textlimits import first_line, shorten

FORMAT = "quantkit.calibration"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"
_SHARD_RE = re.compile(r"shard-(\d{5})\.safetensors")
MAX_MANIFEST_BYTES = 64 << 20  # per-shard entries and per-field summaries: a few KiB per shard


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
    return _decode_samples(path, _sample_trees(path, meta), tensors.get)


def _sample_trees(path: Path, meta: Mapping[str, Any]) -> list:
    """The sample list of a shard's header; CalibrationError names the shard when it is unreadable."""
    try:
        trees = json.loads(meta["samples"])
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise CalibrationError(f"{path}: shard header has no readable sample list: {first_line(e)}") from None
    if not isinstance(trees, list):
        raise CalibrationError(f"{path}: shard header's sample list is a {type(trees).__name__}, not a list")
    return trees


def _decode_samples(path: Path, trees: list, tensor_of: Callable[[str], torch.Tensor | None],
                    then: Callable[[Sample], Any] = lambda sample: sample) -> list:
    """`then(sample)` of each sample of a shard's header, its tensors from `tensor_of("<sample>/<path>")`
    (None: the shard does not hold it). CalibrationError names the shard and the sample of a malformed
    tree."""
    out = []
    for i, tree in enumerate(trees):
        def tensor(p: str, i: int = i) -> torch.Tensor:
            found = tensor_of(f"{i}/{p}")
            if found is None:
                raise CalibrationError(f"{path}: sample {i} names tensor {shorten(p)}, which the shard does not hold")
            return found

        try:
            out.append(then(decode_sample(tree, tensor)))
        except CalibrationError:
            raise
        except (TypeError, KeyError, ValueError, AttributeError, RecursionError) as e:
            raise CalibrationError(f"{path}: sample {i} has a malformed tree ({type(e).__name__}: "
                                   f"{first_line(e)})") from None
    return out


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
        digest, size = sha256_of_file(tmp), tmp.stat().st_size
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
    from quantkit.errors import InputError
    from quantkit.textlimits import read_json_limited

    try:
        manifest = read_json_limited(mpath, "calibration manifest", max_bytes=MAX_MANIFEST_BYTES)
    except InputError as e:
        raise CalibrationError(str(e)) from None
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
    for i, s in enumerate(shards):
        for key in ("samples", "bytes"):
            if not _is_count(s[key]):
                raise CalibrationError(f"{mpath}: shards[{i}].{key} is {shorten(s[key])}, not a whole number >= 0")
        if not isinstance(s["file"], str) or not isinstance(s["sha256"], str):
            raise CalibrationError(f"{mpath}: shards[{i}]: `file` and `sha256` must be strings")
    for key in ("samples", "rows_done"):
        if key in manifest and not _is_count(manifest[key]):
            raise CalibrationError(f"{mpath}: `{key}` is {shorten(manifest[key])}, not a whole number >= 0")
    for key in ("fields", "pad_values"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise CalibrationError(f"{mpath}: `{key}` must be a mapping, got {shorten(manifest[key])}")
    return manifest


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# safetensors' dtype codes -> torch dtype names (as the manifest's fields spell them)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
              "C64": "complex64"}


def shard_sample_fields(path: Path) -> list[dict[str, dict[str, Any]]]:
    """Each sample's fields (path -> dtype and shape, or value type) from a shard's header alone:
    no tensor data is read. CalibrationError names the shard when its header is malformed."""
    from safetensors import SafetensorError, safe_open

    from quantkit.calib.codec import sample_fields

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            info = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CalibrationError(f"{path}: not a readable safetensors shard: {first_line(e)}") from None

    def standin(key: str) -> torch.Tensor | None:
        if key not in info:
            return None
        code, shape = info[key]
        name = _ST_DTYPES.get(code)
        if name is None or not hasattr(torch, name):
            raise CalibrationError(f"{path}: tensor {shorten(key)} has dtype {shorten(code)}, which quantkit "
                                   "cannot read")
        # A stand-in of the right dtype and shape that takes no memory.
        return torch.empty((), dtype=getattr(torch, name)).expand(shape)

    return _decode_samples(path, _sample_trees(path, meta), standin, then=sample_fields)


def _field_mismatch(got: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    if got["kind"] != want.get("kind"):
        return f"is a {got['kind']}, the manifest says {shorten(want.get('kind'))}"
    if got["kind"] == "value":
        return None if want.get("type") in (got["type"], "mixed") else \
            f"is a {got['type']} value, the manifest says {shorten(want.get('type'))}"
    if want.get("dtype") not in (got["dtype"], "mixed"):
        return f"has dtype {got['dtype']}, the manifest says {shorten(want.get('dtype'))}"
    shape = got["shape"]
    lo, hi = want.get("shape_min", want.get("shape")), want.get("shape_max", want.get("shape"))
    if isinstance(lo, list) and isinstance(hi, list):
        if len(lo) != len(shape) or any(not (a <= n <= b) for a, n, b in zip(lo, shape, hi)):
            return f"has shape {shape}, the manifest says {lo}" + (f"..{hi}" if lo != hi else "")
    return None


def check_fields(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every sample of every listed shard matches the manifest's field list (tree, dtypes, shapes),
    and every listed field occurs: a set whose data and manifest disagree is refused on open."""
    fields = manifest.get("fields")
    if not fields:
        return
    seen: set[str] = set()
    for s in manifest["shards"]:
        path = folder / s["file"]
        for i, got in enumerate(shard_sample_fields(path)):
            for name, f in got.items():
                want = fields.get(name)
                if not isinstance(want, Mapping):
                    raise CalibrationError(f"{path}: sample {i} holds field {shorten(name)}, which {MANIFEST} does "
                                           "not list (the shard and the manifest disagree)")
                problem = _field_mismatch(f, want)
                if problem:
                    raise CalibrationError(f"{path}: sample {i} field {shorten(name)} {problem} (the shard and "
                                           f"{MANIFEST} disagree)")
                seen.add(name)
    missing = [k for k in fields if k not in seen]
    if missing:
        raise CalibrationError(f"{folder / MANIFEST}: lists field(s) {shorten(missing)} that no sample holds (the "
                               "shards and the manifest disagree)")


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
        if sha256_of_file(p) != s["sha256"]:
            raise CalibrationError(f"{p}: checksum mismatch (sha256 differs from {MANIFEST}): the shard is corrupt")
    listed = sum(int(s["samples"]) for s in manifest["shards"])
    if "samples" in manifest and int(manifest["samples"]) != listed:
        raise CalibrationError(f"{folder / MANIFEST}: says {manifest['samples']} samples but its shards hold {listed}")



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
        from quantkit.version import __version__

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
