"""How close a candidate output is to its reference: cosine, MSE, relative L2, max abs error, SNR.

Every number is computed in FP64 from tensors of any shape and dtype (FP16, BF16, FP8, integers are
upcast first). A NaN or Inf in either tensor is a failure (`Metrics.finite` False, with the reason),
never a number. `MetricsAccumulator` keeps sums over many batches so the final figures are exact;
`Thresholds` and `judge` turn figures into a `Verdict` that is truthy when it passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

# Values converted to FP64 at a time: bounds the extra memory of a huge activation to ~100 MB.
_CHUNK = 1 << 22
# Signed errors kept by a MetricsAccumulator for the percentiles (8 MB of FP64 each for values and keys).
DEFAULT_RESERVOIR = 1 << 20


def as_float64(x: Any) -> np.ndarray:
    """A torch tensor, numpy array (ml_dtypes included) or nested list as an FP64 numpy array, same shape."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"complex tensors are not supported (dtype {x.dtype})")
        try:
            return x.detach().cpu().to(torch.float64).numpy()
        except (RuntimeError, TypeError) as e:
            raise TypeError(f"cannot upcast a tensor of dtype {x.dtype} to float64: {e}") from None
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise TypeError(f"complex arrays are not supported (dtype {arr.dtype})")
    return arr.astype(np.float64)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _json_number(v: float | None) -> float | str | None:
    # Strict JSON has no Infinity/NaN: write them as strings that float() reads back.
    if v is None or math.isfinite(v):
        return v
    return str(v)


@dataclass(frozen=True)
class Metrics:
    """Candidate vs reference over `numel` values. When `finite` is False every figure is None.

    cosine: dot(r, c) / (|r| |c|); 1.0 when both tensors are all zero, 0.0 when only one is.
    mse: mean((c - r)^2).  rel_l2: |c - r| / |r| (0 when both are zero, inf when only r is).
    snr_db: 10 log10(sum(r^2) / sum((c - r)^2)); inf when the error is exactly zero.
    mean/median/p99_abs_err: of |c - r|. Percentiles use linear interpolation (numpy's default);
    `percentiles_exact` is False when they come from a uniform sample of the values (see
    MetricsAccumulator), in which case median and p99 are estimates; every other field is exact.
    """

    numel: int
    finite: bool
    reason: str | None = None
    cosine: float | None = None
    mse: float | None = None
    rel_l2: float | None = None
    max_abs_err: float | None = None
    snr_db: float | None = None
    mean_abs_err: float | None = None
    median_abs_err: float | None = None
    p99_abs_err: float | None = None
    percentiles_exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values; an infinite SNR or relative L2 is written as the string "inf"."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = _json_number(v) if isinstance(v, float) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k, v in kw.items():
            if isinstance(v, str) and k not in ("reason",):
                kw[k] = float(v)
        return cls(**kw)

    def failures(self, thresholds: Thresholds, label: str | None = None) -> list[str]:
        """Why these figures miss `thresholds`, one line each; empty when they pass."""
        p = f"{label}: " if label else ""
        if not self.finite:
            return [f"{p}not finite: {self.reason}"]
        out = []
        if self.cosine < thresholds.cosine_min:
            out.append(f"{p}cosine {self.cosine:.6f} < {thresholds.cosine_min}")
        if thresholds.snr_min_db is not None and self.snr_db < thresholds.snr_min_db:
            out.append(f"{p}SNR {self.snr_db:.2f} dB < {thresholds.snr_min_db} dB")
        return out

    def passes(self, thresholds: Thresholds) -> bool:
        return not self.failures(thresholds)

    def __str__(self) -> str:
        if not self.finite:
            return f"not finite: {self.reason}"
        return (
            f"cosine {self.cosine:.6f}, SNR {self.snr_db:.2f} dB, MSE {self.mse:.3e}, "
            f"rel L2 {self.rel_l2:.3e}, max |err| {self.max_abs_err:.3e}"
        )


@dataclass(frozen=True)
class Thresholds:
    """The pass/fail gate: cosine at least `cosine_min`, and SNR at least `snr_min_db` unless None."""

    cosine_min: float
    snr_min_db: float | None = None

    def __post_init__(self):
        if not (isinstance(self.cosine_min, (int, float)) and -1.0 <= self.cosine_min <= 1.0):
            raise ValueError(f"cosine_min must be a number in [-1, 1], got {self.cosine_min!r}")
        if self.snr_min_db is not None and not (
            isinstance(self.snr_min_db, (int, float)) and math.isfinite(self.snr_min_db)
        ):
            raise ValueError(f"snr_min_db must be a finite number or None, got {self.snr_min_db!r}")

    @classmethod
    def of_recipe(cls, recipe) -> "Thresholds":
        """A recipe's gate: its cosine_min (or the default for its precisions) and its SNR floor."""
        return cls(cosine_min=recipe.default_cosine_min(), snr_min_db=recipe.thresholds.snr_min_db)

    def to_dict(self) -> dict[str, Any]:
        return {"cosine_min": self.cosine_min, "snr_min_db": self.snr_min_db}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Thresholds:
        return cls(cosine_min=d["cosine_min"], snr_min_db=d.get("snr_min_db"))


@dataclass(frozen=True)
class Verdict:
    """The outcome of judging named Metrics against Thresholds: truthy when every one passed."""

    passed: bool
    thresholds: Thresholds
    metrics: Mapping[str, Metrics]
    failures: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """The report's "passed", "failures" and "thresholds" entries."""
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "thresholds": self.thresholds.to_dict(),
        }

    def __str__(self) -> str:
        if self.passed:
            return f"PASSED ({len(self.metrics)} compared, cosine >= {self.thresholds.cosine_min})"
        return "FAILED: " + "; ".join(self.failures)


def judge(metrics: Metrics | Mapping[str, Metrics | Mapping[str, Metrics]], thresholds: Thresholds) -> Verdict:
    """Judge one Metrics, {output: Metrics}, or {runtime: {output: Metrics}} (labelled "runtime/output")."""
    if isinstance(metrics, Metrics):
        metrics = {"output": metrics}
    flat: dict[str, Metrics] = {}
    for name, m in metrics.items():
        if isinstance(m, Mapping):
            flat.update({f"{name}/{inner}": v for inner, v in m.items()})
        else:
            flat[name] = m
    failures = tuple(line for name, m in flat.items() for line in m.failures(thresholds, name))
    return Verdict(passed=not failures, thresholds=thresholds, metrics=flat, failures=failures)


def _nonfinite_counts(a: np.ndarray) -> tuple[int, int]:
    nan = int(np.isnan(a).sum())
    return nan, int(a.size - nan - np.isfinite(a).sum())


class MetricsAccumulator:
    """Metrics over many (reference, candidate) batches, as if computed on their concatenation.

    Sums of r^2, c^2, r*c, (c-r)^2 and |c-r| and the max |c-r| are kept in FP64, so cosine, MSE,
    relative L2, SNR, mean and max abs error over all values are exact (not averages of per-batch
    figures). Median and 99th percentile need the values themselves: up to `reservoir_size` signed
    errors are kept as a uniform random sample of all values seen (bottom-k of random keys, seeded,
    so repeatable). While the total stays within it every value is kept and the percentiles are
    exact; beyond it they are estimates and `Metrics.percentiles_exact` is False. With
    reservoir_size=None every value is kept (what `compare` does).
    """

    def __init__(self, reservoir_size: int | None = DEFAULT_RESERVOIR, seed: int = 0):
        if reservoir_size is not None and reservoir_size < 1:
            raise ValueError(f"reservoir_size must be >= 1 or None, got {reservoir_size}")
        self.reservoir_size = reservoir_size
        self._rng = np.random.default_rng(seed)
        self.numel = 0
        self._sum_rr = self._sum_cc = self._sum_rc = self._sum_ee = self._sum_abs = 0.0
        self._max_abs = 0.0
        self._nonfinite = {"reference": [0, 0], "candidate": [0, 0]}  # [NaN, Inf]
        self._sample: list[np.ndarray] = []  # with a reservoir: one array, its keys in _keys
        self._keys = np.zeros(0)
        self._sampled = False  # True once some value was dropped from the sample

    def update(self, reference: Any, candidate: Any) -> MetricsAccumulator:
        rs, cs = _shape(reference), _shape(candidate)
        if rs != cs:
            raise ValueError(f"shape mismatch: reference {rs} vs candidate {cs}")
        ref = reference.reshape(-1) if hasattr(reference, "reshape") else np.asarray(reference).reshape(-1)
        cand = candidate.reshape(-1) if hasattr(candidate, "reshape") else np.asarray(candidate).reshape(-1)
        for start in range(0, ref.shape[0], _CHUNK):
            self._update_chunk(as_float64(ref[start : start + _CHUNK]), as_float64(cand[start : start + _CHUNK]))
        return self

    def _update_chunk(self, r: np.ndarray, c: np.ndarray) -> None:
        self.numel += r.size
        ok = True
        for side, a in (("reference", r), ("candidate", c)):
            if not np.isfinite(a).all():
                nan, inf = _nonfinite_counts(a)
                self._nonfinite[side][0] += nan
                self._nonfinite[side][1] += inf
                ok = False
        if not ok or self.has_nonfinite:
            return  # the result is a failure now; sums would only carry NaN along
        e = c - r
        ae = np.abs(e)
        self._sum_rr += float(np.dot(r, r))
        self._sum_cc += float(np.dot(c, c))
        self._sum_rc += float(np.dot(r, c))
        self._sum_ee += float(np.dot(e, e))
        self._sum_abs += float(ae.sum())
        if ae.size:
            self._max_abs = max(self._max_abs, float(ae.max()))
        self._add_to_sample(e)

    def _add_to_sample(self, e: np.ndarray) -> None:
        if self.reservoir_size is None:
            self._sample.append(e)
            return
        keys = self._rng.random(e.size)
        if self._keys.size == self.reservoir_size:
            # A full reservoir keeps the k smallest keys seen: a new value whose key is not below the
            # largest kept one cannot enter, so only the others go into the partition (the same set).
            entering = keys < self._keys.max()
            if not entering.all():
                self._sampled = True
                keys, e = keys[entering], e[entering]
        if self._sample:
            keys = np.concatenate([self._keys, keys])
            e = np.concatenate([self._sample[0], e])
        if e.size > self.reservoir_size:
            keep = np.argpartition(keys, self.reservoir_size - 1)[: self.reservoir_size]
            keys, e = keys[keep], e[keep]
            self._sampled = True
        self._keys, self._sample = keys, [e]

    @property
    def has_nonfinite(self) -> bool:
        return any(n for counts in self._nonfinite.values() for n in counts)

    def error_sample(self) -> np.ndarray:
        """The kept signed errors (candidate - reference): all of them, or a uniform sample."""
        if not self._sample:
            return np.zeros(0)
        if len(self._sample) > 1:
            self._sample = [np.concatenate(self._sample)]
        return self._sample[0]

    def result(self) -> Metrics:
        if self.numel == 0:
            raise ValueError("no values to compare (empty tensors, or no batch was added)")
        if self.has_nonfinite:
            parts = []
            for side, (nan, inf) in self._nonfinite.items():
                if nan or inf:
                    what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if s)
                    parts.append(f"{side} has {what}")
            return Metrics(numel=self.numel, finite=False, reason=f"{'; '.join(parts)} among {self.numel:,} values")
        n = self.numel
        rr, cc, rc, ee = self._sum_rr, self._sum_cc, self._sum_rc, self._sum_ee
        if rr == 0.0 and cc == 0.0:
            cosine = 1.0  # two all-zero tensors agree
        elif rr == 0.0 or cc == 0.0:
            cosine = 0.0  # no direction to agree with
        else:
            cosine = min(1.0, max(-1.0, rc / (math.sqrt(rr) * math.sqrt(cc))))
        if ee == 0.0:
            rel_l2, snr = 0.0, math.inf
        elif rr == 0.0:
            rel_l2, snr = math.inf, -math.inf
        else:
            rel_l2, snr = math.sqrt(ee / rr), 10.0 * math.log10(rr / ee)
        median, p99 = np.quantile(np.abs(self.error_sample()), [0.5, 0.99])
        return Metrics(
            numel=n,
            finite=True,
            cosine=float(cosine),
            mse=ee / n,
            rel_l2=rel_l2,
            max_abs_err=self._max_abs,
            snr_db=snr,
            mean_abs_err=self._sum_abs / n,
            median_abs_err=float(median),
            p99_abs_err=float(p99),
            percentiles_exact=not self._sampled,
        )


def compare(reference: Any, candidate: Any) -> Metrics:
    """Metrics of `candidate` against `reference` (same shape, any dtype), exact percentiles included."""
    return MetricsAccumulator(reservoir_size=None).update(reference, candidate).result()


def _check_names(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> None:
    missing = [k for k in reference if k not in candidate]
    extra = [k for k in candidate if k not in reference]
    if missing or extra:
        raise ValueError(f"output names differ: missing from candidate {missing}, not in reference {extra}")


def compare_outputs(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Metrics]:
    """compare() for each named output; both mappings must have the same names."""
    _check_names(reference, candidate)
    return {name: compare(reference[name], candidate[name]) for name in reference}


class OutputsAccumulator:
    """A MetricsAccumulator per named output, fed whole {name: tensor} batches."""

    def __init__(self, reservoir_size: int | None = DEFAULT_RESERVOIR, seed: int = 0):
        self._args = (reservoir_size, seed)
        self.by_output: dict[str, MetricsAccumulator] = {}

    def update(self, reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> OutputsAccumulator:
        _check_names(reference, candidate)
        for name in reference:
            acc = self.by_output.setdefault(name, MetricsAccumulator(*self._args))
            try:
                acc.update(reference[name], candidate[name])
            except ValueError as e:
                raise ValueError(f"output {name!r}: {e}") from None
        return self

    def result(self) -> dict[str, Metrics]:
        return {name: acc.result() for name, acc in self.by_output.items()}
