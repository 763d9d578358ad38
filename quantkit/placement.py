"""Models larger than one GPU: place a loaded model over several devices with Hugging Face accelerate
(`--device-map auto`), keep that placement through quantkit's preparation, and record it.

The map is sized for FP32 weights whatever the loaded dtype (quantkit's reference run converts the
placed model to FP32), whole decoder blocks per device (the model's `_no_split_modules`), on GPUs
only: a block offloaded to the CPU or disk lives on the meta device between calls, which ModelOpt's
quantizers and the per-layer dtype casts cannot work on, so a model that does not fit the GPUs is
refused with the sizes instead. accelerate keeps room for the largest layer on the first GPU (meant
for offloaded layers), so a small model whose embedding is a large share of it may not be split.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.compat.transformers import no_split_modules
from quantkit.errors import InputError

MODES = ("auto", "sequential")
HEADROOM = 0.85  # of each GPU's free memory for weights; the rest holds activations during calibration


@dataclasses.dataclass
class Placement:
    mode: str
    device_map: dict[str, str]  # module name ("" = the whole model) -> device
    main_device: str  # where inputs go
    bytes_per_device: dict[str, int]
    max_memory: dict[str, int] | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _accelerate():
    try:
        import accelerate
    except ImportError:
        raise InputError("--device-map needs Hugging Face accelerate: pip install accelerate") from None
    return accelerate


_SIZE = re.compile(r"^\s*([\d.]+)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_max_memory(spec: str | None) -> dict[int | str, int] | None:
    """`0=70GiB,1=70GiB` -> {0: bytes, 1: bytes}; `cpu=...` is refused (no offloading)."""
    if not spec:
        return None
    out: dict[int | str, int] = {}
    for item in spec.split(","):
        key, sep, size = item.partition("=")
        m = _SIZE.match(size)
        if not sep or not m or not key.strip().isdigit():
            raise InputError(f"--max-memory {spec!r}: expected GPU=SIZE[,GPU=SIZE], e.g. 0=70GiB,1=70GiB")
        out[int(key)] = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    return out


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fp32_bytes(model: nn.Module) -> int:
    """Weights and buffers with floating tensors counted as FP32 (what the placement is sized for)."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for t in list(model.parameters()) + list(model.buffers()))


def fp32_sizing(model: nn.Module) -> dict:
    """accelerate's sizing arguments that count every floating tensor at 4 bytes.

    `dtype=torch.float32` alone does not: accelerate counts each tensor at the smaller of its own
    size and the dtype's, so a BF16 model would be sized at 2 bytes a value and overflow the GPUs
    when the reference pass casts it to FP32. `special_dtypes` sizes the named tensors as given."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {"dtype": torch.float32,
            "special_dtypes": {name: torch.float32 for name, t in tensors if t.is_floating_point()}}


def infer_map(model: nn.Module, mode: str, device: torch.device,
              max_memory: dict[int | str, int] | None = None) -> tuple[dict[str, str], dict[str, int] | None]:
    """A module -> device map over the GPUs (or the CPU when `device` is the CPU)."""
    _accelerate()
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    if mode not in MODES:
        raise InputError(f"--device-map {mode}: use {', '.join(MODES)} or a JSON file mapping module names to devices")
    if device.type == "cpu":
        return {"": "cpu"}, None
    count = torch.cuda.device_count()
    if max_memory is None:
        max_memory = {i: int(torch.cuda.mem_get_info(i)[0] * HEADROOM) for i in range(count)}
    bad = [k for k in max_memory if not isinstance(k, int) or k >= count]
    if bad:
        raise InputError(f"--max-memory names GPU(s) {bad}, but {count} are visible")
    room = sum(max_memory.values())
    no_split = no_split_modules(model)
    # Sized as FP32 whatever the loaded dtype: quantkit's reference pass runs the placed model in FP32.
    sizing = fp32_sizing(model)
    if mode == "auto":  # accelerate's "auto"/"balanced": spread evenly rather than fill GPU 0 first
        max_memory = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                         **sizing)
    device_map = infer_auto_device_map(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                       **sizing)
    device_map = {k: (f"cuda:{v}" if isinstance(v, int) else str(v)) for k, v in device_map.items()}
    offloaded = sorted({v for v in device_map.values() if not v.startswith("cuda")})
    if offloaded:
        from accelerate.utils import compute_module_sizes, get_max_layer_size

        sizes = compute_module_sizes(model, **sizing)
        largest, _ = get_max_layer_size(list(model.named_children()), sizes, no_split)
        raise InputError(f"the model ({_size(fp32_bytes(model))} in FP32) does not fit the GPUs' "
                         f"{_size(room)} for weights, of which accelerate keeps {_size(largest)} "
                         f"(its largest layer) free on the first GPU (device map would offload to "
                         f"{', '.join(offloaded)}, which calibration cannot use); use more or larger GPUs, "
                         "or a larger --max-memory")
    return device_map, {str(k): int(v) for k, v in max_memory.items()}


def read_map(path: str | Path) -> dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--device-map {path}: use {', '.join(MODES)} or a JSON file mapping module names to "
                         "devices (no such file)")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--device-map {p}: not a readable JSON file: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InputError(f"--device-map {p}: expected a JSON object of module name -> device")
    return {k: (f"cuda:{v}" if isinstance(v, int) else str(v)) for k, v in data.items()}


def dispatch(model: nn.Module, spec: str, device: torch.device, max_memory: dict[int | str, int] | None = None,
             force_hooks: bool = False) -> Placement:
    """Place `model` by `spec` ("auto", "sequential" or a JSON file of module -> device) with accelerate."""
    _accelerate()
    from accelerate import dispatch_model

    if spec in MODES:
        device_map, memory = infer_map(model, spec, device, max_memory)
    else:
        device_map, memory = read_map(spec), None
    for dev in set(device_map.values()):
        if dev in ("cpu", "disk", "meta") and device.type == "cuda":
            raise InputError(f"--device-map: {dev} placement is offloading, which calibration cannot use")
        try:
            torch.device(dev)
        except RuntimeError:
            raise InputError(f"--device-map: {dev!r} is not a device") from None
    try:
        dispatch_model(model, device_map=device_map, force_hooks=force_hooks)
    except (ValueError, RuntimeError) as e:
        raise InputError(f"--device-map: accelerate could not place the model: {e}") from None
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    return Placement(mode=spec, device_map=dict(device_map), main_device=main,
                     bytes_per_device=bytes_per_device(model), max_memory=memory)


def bytes_per_device(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate hooks move data between devices: the model must not be moved as a whole."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def rebind_hooked_forwards(model: nn.Module) -> int:
    """Point accelerate's saved forward at the module's current class.

    accelerate wraps a placed module's bound `forward` (kept as `_old_forward`); quantkit's FP32
    guards and attention routing swap the module's class afterwards, and the stale bound method
    would bypass them. Returns how many modules were re-bound.
    """
    n = 0
    for m in model.modules():
        old = getattr(m, "_old_forward", None)
        if hasattr(m, "_hf_hook") and old is not None and getattr(old, "__func__", None) is not type(m).forward:
            m._old_forward = types.MethodType(type(m).forward, m)
            n += 1
    return n
