"""Where sets come from besides a collected folder: the built-in sets and synthetic inputs.

`builtin_set` tokenizes calibration/<name>/sentences.txt (or opens a collected set shipped there);
`synthetic_set` makes random inputs, marked synthetic, only for an explicit --synthetic.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from quantkit.calib.batching import BATCHING_EXAMPLES
from quantkit.calib.calibration_set import CalibrationSet
from quantkit.calib.codec import Sample
from quantkit.calib.set_folder import MANIFEST, _now
from quantkit.digest import sha256_of_file
from quantkit.errors import CalibrationError

if TYPE_CHECKING:
    from quantkit.models import LoadedModel


def calibration_dir() -> Path:
    """calibration/ of a checkout, else the `quantkit.calibration` data package of a wheel."""
    root = Path(__file__).resolve().parents[2]  # quantkit/calib/sources.py -> the checkout
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
    digest = sha256_of_file(path)
    meta = {
        "source": {"kind": "builtin-text", "name": name, "path": str(path), "sha256": digest,
                   "description": f"built-in {name} ({len(sentences)} sentences, calibration/{name}/sentences.txt)"},
        "model": loaded.spec, "module": None, "synthetic": False, "created": _now(),
        "batching": BATCHING_EXAMPLES, "pad_values": text_pad_values(loaded),
        "tokenizer": type(loaded.tokenizer).__name__, "max_length": loaded.max_length,
    }
    return CalibrationSet.from_samples(text_samples(loaded, sentences), meta)


def synthetic_samples(loaded: "LoadedModel", n: int, seed: int) -> list[Sample]:
    """Random model inputs: example_inputs with their floating tensors replaced by noise (integer and
    bool tensors kept as they are), else random token ids for a tokenizer model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    if loaded.example_inputs:
        # Only floating tensors are noise. Integer and bool inputs are structure (token ids laid out
        # around image tokens, masks, class labels, timesteps): random ones make inputs the model
        # rejects or never sees (PaliGemma: "Image features and image tokens do not match").
        for _ in range(n):
            kw = {k: torch.randn(v.shape, generator=g).to(v.dtype) if torch.is_tensor(v) and v.is_floating_point()
                  else v.clone() if torch.is_tensor(v) else v
                  for k, v in loaded.example_inputs.items()}
            out.append(Sample((), kw))
        return out
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
