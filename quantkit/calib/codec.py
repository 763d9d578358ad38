"""The codec of one calibration sample: a tree of tensors and plain values <-> JSON + named tensors.

A sample is one captured call, `Sample(args, kwargs)`, kept exactly as the module received it.
`encode_sample` gives the JSON tree (stored in a shard's header) and the tensors by path;
`sample_fields`/`merge_fields` summarise the per-path dtypes and shapes a manifest records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from quantkit.errors import CalibrationError


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


def describe_inputs(sample: Sample, limit: int = 6) -> str:
    """`input_ids int64[2, 22], pixel_values float32[2, 3, 32, 32]`: what a call received, for messages."""
    _, tensors = encode_sample(sample)
    parts = [f"{p.split('.', 1)[-1]} {_dtype_name(t.dtype)}{list(t.shape)}" for p, t in tensors.items()]
    more = f", … {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "no tensors"


def call_model(model: Any, sample: Sample, what: str) -> Any:
    """model(*args, **kwargs); an exception of the model's own becomes one line naming the batch and its
    inputs (ModelRaised, exit 2) instead of a traceback from deep inside the model."""
    from quantkit.errors import ModelRaised, QuantkitError

    try:
        return model(*sample.args, **sample.kwargs)
    except QuantkitError:
        raise
    except Exception as e:
        first = next((line for line in str(e).strip().splitlines() if line.strip()), "")
        raise ModelRaised(f"{type(model).__name__} raised on {what}, inputs {describe_inputs(sample)}: "
                          f"{type(e).__name__}: {first}") from e
