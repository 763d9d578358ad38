"""`CalibrationSet`: an ordered, immutable collection of samples, split, batched and replayed.

The samples live in memory or in a set folder (read a shard at a time); `split`/`subset` give
views, `batches`/`forward_loop` replay them for `mtq.quantize`, `save` writes a set folder.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from quantkit.calib.batching import BATCHING_CALLS, BATCHING_EXAMPLES, _signature, batching_for, collate
from quantkit.calib.codec import Sample, _present_fields, call_model, merge_fields, to_device
from quantkit.calib.set_folder import (FORMAT_VERSION, SetWriter, _ShardStore, check_fields, read_manifest,
                                       verify_shards)
from quantkit.errors import CalibrationError

if TYPE_CHECKING:
    from torch import nn


class _MemoryStore:
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> Sample:
        return self.samples[index]



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
        check_fields(folder, manifest)
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
                for k, group in enumerate(batches):
                    s = to_device(collate([self[i] for i in group], pad), device, dtype)
                    call_model(target, s, f"calibration batch {k} (samples {group[0]}..{group[-1]})")
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
