"""Compile targets of TensorRT-RTX: the compute capabilities its ahead-of-time compiler builds for,
and which one stands for each device a recipe names.

TensorRT-RTX 1.7 compiles for SM 7.5, 8.0, 8.6, 8.9, 12.0 and 12.1 only. Hopper, Thor and Orin
have no target of their own, so they get the nearest one with the same formats (FP8 -> SM89,
NVFP4 -> SM120, INT8/FP16 -> SM86): a compile check of the graph, not the engine to deploy there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from quantkit.errors import InputError

# compute capability -> TensorRT-RTX's ComputeCapability enum member
RTX_COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}

# A recipe's device -> (compute capabilities to compile for, the device it stands in for or None).
# Ampere covers both the datacenter (A100, SM80) and the RTX 30 (SM86) chips.
_DEVICE_TARGETS: dict[str, tuple[tuple[str, ...], bool]] = {
    "ada": (("8.9",), False),
    "blackwell": (("12.0",), False),
    "rtx": (("12.0",), False),
    "ampere": (("8.6", "8.0"), False),
    # No TensorRT-RTX target: the nearest with the same formats.
    "hopper": (("8.9",), True),   # FP8, INT8
    "thor": (("12.0",), True),    # NVFP4, FP8, INT8
    "orin": (("8.6",), True),     # INT8, FP16 (the Ampere ISA Orin's INT8 path shares)
}


@dataclass(frozen=True)
class CompileTarget:
    """One compute capability to compile for, and the device it was chosen for."""

    compute_capability: str  # "8.9"
    device: str | None = None  # the recipe's or --target's name ("ada", "hopper"), None when given as sm89
    stand_in: bool = False  # the device has no TensorRT-RTX target; this one has its formats

    def __post_init__(self) -> None:
        if self.compute_capability not in RTX_COMPUTE_CAPABILITIES:
            raise InputError(f"compute capability {self.compute_capability} is not a TensorRT-RTX target; "
                             f"it compiles for {', '.join(RTX_COMPUTE_CAPABILITIES)}")

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    @property
    def enum_name(self) -> str:
        return RTX_COMPUTE_CAPABILITIES[self.compute_capability]

    @property
    def note(self) -> str:
        if self.stand_in:
            return (f"{self.device} has no TensorRT-RTX target: compiled for {self.sm}, which has its formats. "
                    f"This checks the graph; it is not the engine to deploy on {self.device} "
                    f"(build that there with build_engine.sh)")
        return f"{self.sm}" + (f" ({self.device})" if self.device and self.device != self.sm else "")

    def to_dict(self) -> dict[str, Any]:
        return {"compute_capability": self.compute_capability, "sm": self.sm, "device": self.device,
                "stand_in": self.stand_in, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompileTarget":
        return cls(str(data["compute_capability"]), data.get("device"), bool(data.get("stand_in", False)))


TARGET_SYNTAX = (f"a device ({', '.join(_DEVICE_TARGETS)}) or a compute capability "
                 f"({', '.join('sm' + c.replace('.', '') for c in RTX_COMPUTE_CAPABILITIES)}, or 8.9)")


def parse_target(text: str) -> list[CompileTarget]:
    """'ada' -> [SM89]; 'ampere' -> [SM86, SM80]; 'hopper' -> [SM89, stand-in]; 'sm89' / '8.9' -> [SM89]."""
    key = text.strip().lower()
    if key in _DEVICE_TARGETS:
        ccs, stand_in = _DEVICE_TARGETS[key]
        return [CompileTarget(cc, key, stand_in) for cc in ccs]
    digits = key.removeprefix("sm_").removeprefix("sm")
    cc = digits if "." in digits else (f"{digits[:-1]}.{digits[-1]}" if digits.isdigit() and len(digits) >= 2 else "")
    if cc in RTX_COMPUTE_CAPABILITIES:
        return [CompileTarget(cc, None, False)]
    raise InputError(f"--target {text!r}: expected {TARGET_SYNTAX}")


def targets_for(names: Iterable[str]) -> list[CompileTarget]:
    """The compile targets of a recipe's `targets` (or --target values), each compute capability once
    (in first-named order); `cpu` compiles for nothing."""
    chosen: dict[str, CompileTarget] = {}
    for name in names:
        if name.strip().lower() == "cpu":
            continue
        for t in parse_target(name):
            # A device's own target beats another device's stand-in for the same compute capability.
            if t.compute_capability not in chosen or (chosen[t.compute_capability].stand_in and not t.stand_in):
                chosen[t.compute_capability] = t
    return list(chosen.values())
