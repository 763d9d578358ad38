"""The one seam between quantkit and the private internals of ModelOpt, transformers and torch.onnx.

Everything quantkit uses of an upstream package that is not its public API is reached through the
modules here (`modelopt`, `transformers`, `torch_onnx`), each access behind `require`, which fails
loudly (CompatError, naming the missing attribute, the installed version and the supported ones)
instead of falling back to a silent default. `SUPPORTED` states the versions these were read
against; they agree with the pins in pyproject.toml (tests/test_compat.py checks both).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from quantkit.errors import QuantkitError

# The versions the internals used here were read against, as pyproject.toml pins them.
SUPPORTED = {"nvidia-modelopt": "==0.47.*", "transformers": ">=4.57", "torch": ">=2.8"}


class CompatError(QuantkitError):
    """An upstream internal quantkit relies on is not there: the installed version is not a supported one."""

    exit_code = 2


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def supports(package: str, installed_version: str) -> bool:
    """Whether quantkit supports `installed_version` of `package` (SUPPORTED, as pyproject pins it)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(installed_version) in SpecifierSet(SUPPORTED[package])
    except InvalidVersion:
        return False


def require(obj: Any, attr: str, package: str, owner: str | None = None) -> Any:
    """getattr(obj, attr), or CompatError saying what is missing and which versions quantkit supports."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        where = owner or getattr(obj, "__name__", None) or type(obj).__name__
        raise CompatError(f"{package} {installed(package)}: {where}.{attr} is missing; quantkit relies on it and "
                          f"supports {package} {SUPPORTED[package]}") from None
