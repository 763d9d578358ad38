"""One seam per upstream: outside quantkit/compat/, no module of quantkit reads or writes a private
attribute of ModelOpt, transformers or torch.onnx; compat's version guards agree with the pins.

"Private" is read from the upstream packages themselves: every `_name` they define (def, class,
`self._name =`, module-level `_name =`, a quoted "_name" as in a `__slots__`-like list of attribute
names, a `_module` file or package) and that quantkit does not
define for itself. A use is an attribute access on anything but `self`/`cls`, a getattr/hasattr/
setattr/delattr (or object.__setattr__) with that name as a string, a `__dict__["_name"]`, or an
import from a private module of those packages.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quantkit"
COMPAT = PACKAGE / "compat"
UPSTREAMS = ("modelopt", "transformers", "torch.onnx")
# Where the internals quantkit could touch are defined (all of ModelOpt's torch/onnx side; the core of
# transformers, not its 400 model folders; all of torch.onnx).
SCANNED = {"modelopt": ["torch", "onnx"], "transformers": ["*.py", "integrations", "utils", "generation"],
           "torch.onnx": ["."]}
# Private names of other libraries, out of this rule's scope (torch core, accelerate, datasets, the
# standard library): quantkit may read them where it must, and they are not ModelOpt/transformers/torch.onnx.
OTHER_LIBRARIES = {"_fields", "_hf_hook", "_old_forward", "_fingerprint", "_buffers", "_parameters", "_modules",
                   "_apply", "_forward_hooks", "_forward_pre_hooks", "_version"}
_DEFINED = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+(_[A-Za-z]\w*)|self\.(_[A-Za-z]\w*)\s*(?::|=(?!=))"
                      r"|^\s*(_[A-Za-z]\w*)\s*(?::|=(?!=))|[\"'](_[A-Za-z]\w*)[\"']", re.M)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and len(name) > 1


@functools.cache
def upstream_private_names() -> frozenset[str]:
    import torch.nn

    names: set[str] = set()
    for package, parts in SCANNED.items():
        spec = importlib.util.find_spec(package)
        root = Path(next(iter(spec.submodule_search_locations)))
        files: list[Path] = []
        for part in parts:
            files += list(root.glob(part)) if "*" in part else list((root / part).rglob("*.py"))
        for f in files:
            if f.suffix != ".py":
                continue
            names.update(p for p in f.relative_to(root).with_suffix("").parts if _private(p))
            for m in _DEFINED.finditer(f.read_text(errors="replace")):
                names.add(next(g for g in m.groups() if g))
    return frozenset(names - set(dir(torch.nn.Module)) - set(dir(torch.Tensor)) - OTHER_LIBRARIES)


def quantkit_defined_names(files) -> set[str]:
    """Private names quantkit gives its own objects (attributes, functions, flags it sets)."""
    out: set[str] = set()
    for f in files:
        tree = ast.parse(Path(f).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                out.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    out.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
                out.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_quantkit"):
                out.add(node.value)
    return out


def private_uses(source: str, private: frozenset[str] | set[str]) -> list[str]:
    """`line: what` for each use of an upstream private name in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("getattr", "hasattr", "setattr", "delattr", "__setattr__", "__getattribute__") \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in private:
                found.append(f"{line}: {name}(..., {node.args[1].value!r})")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant) \
                and node.slice.value in private:
            found.append(f"{line}: __dict__[{node.slice.value!r}]")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in modules:
                if any(m == u or m.startswith(u + ".") for u in UPSTREAMS) and any(_private(p) for p in m.split(".")):
                    found.append(f"{line}: import {m}")
            if isinstance(node, ast.ImportFrom) and any((node.module or "").startswith(u) for u in UPSTREAMS):
                found += [f"{line}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
    return found


def _package_files(outside_compat: bool) -> list[Path]:
    return [f for f in PACKAGE.rglob("*.py") if (COMPAT not in f.parents) == outside_compat]


def test_the_private_names_are_read_from_upstream():
    private = upstream_private_names()
    for name in ("_calibrator", "_calib_amax", "_registry", "_key_registry", "_get_registered_nn_class",
                 "_deploy", "_quantize_conv_weights_to_fp8", "_attn_implementation", "_global_mapping",
                 "_no_split_modules", "_internal", "_type_utils", "_amax", "_if_calib", "_use_constant_amax"):
        assert name in private, name
    assert len(private) > 1000


def test_the_detector_finds_each_kind_of_use():
    snippet = '''
from modelopt.torch._deploy.utils import torch_onnx
from torch.onnx._internal.torchscript_exporter import symbolic_helper
import transformers
amax = q._calibrator._calib_amax
ok = getattr(q, "_if_calib", False)
config._attn_implementation = "eager"
fn = Exporter.__dict__["_quantize_conv_weights_to_fp8"]
object.__setattr__(config, "_attn_implementation", "x")
self._calibrator = None
'''
    uses = private_uses(snippet, upstream_private_names())
    assert [u.split(":")[0] for u in uses].count("2") == 1 and len(uses) == 8, uses


def test_no_private_upstream_attribute_outside_compat():
    private = upstream_private_names() - quantkit_defined_names(_package_files(outside_compat=True))
    offenders = {}
    for f in _package_files(outside_compat=True):
        uses = private_uses(f.read_text(), private)
        if uses:
            offenders[str(f.relative_to(ROOT))] = uses
    assert not offenders, offenders


def test_compat_is_where_they_are():
    private = upstream_private_names()
    used = set()  # the private names compat/ names: as attributes, or as strings handed to require()
    for f in _package_files(outside_compat=False):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                used.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in private:
                used.add(node.value)
            elif isinstance(node, ast.ImportFrom):
                used.update(p for p in (node.module or "").split(".") if p in private)
    for name in ("_calibrator", "_calib_amax", "_registry", "_get_registered_nn_class", "_attn_implementation",
                 "_global_mapping", "_quantize_conv_weights_to_fp8", "_no_split_modules", "_deploy", "_internal",
                 "_is_none", "_if_calib", "_use_constant_amax", "_dynamic_block_quantize_forward"):
        assert name in used, (name, sorted(used))


def _pyproject_pins() -> dict[str, str]:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", d)
        pins[m.group(1).lower()] = m.group(2).replace(" ", "")
    return pins


def test_version_guards_agree_with_the_pins(monkeypatch):
    from quantkit import compat, nvfp4_cpu
    from quantkit.errors import QuantkitError

    pins = _pyproject_pins()
    for package, spec in compat.SUPPORTED.items():
        assert pins[package] == spec, f"compat.SUPPORTED[{package!r}] = {spec!r}, pyproject pins {pins[package]!r}"
    assert compat.supports("nvidia-modelopt", "0.47.3") and not compat.supports("nvidia-modelopt", "0.48.0")
    # nvfp4_cpu accepts the whole pinned series, not only the release it was read against.
    import modelopt

    was = nvfp4_cpu.is_installed()
    nvfp4_cpu.uninstall()
    try:
        monkeypatch.setattr(modelopt, "__version__", "0.47.1")
        nvfp4_cpu.install()
        assert nvfp4_cpu.is_installed()
        nvfp4_cpu.uninstall()
        monkeypatch.setattr(modelopt, "__version__", "0.48.0")
        with pytest.raises(QuantkitError, match=r"supports ==0\.47\.\*\), found 0\.48\.0"):
            nvfp4_cpu.install()
    finally:
        monkeypatch.undo()
        nvfp4_cpu.uninstall()
        if was:
            nvfp4_cpu.install()


def test_a_missing_internal_fails_naming_it_and_the_supported_versions():
    from quantkit.compat import CompatError
    from quantkit.compat import modelopt as modelopt_compat

    from modelopt.torch.quantization.calib import MaxCalibrator

    cal = MaxCalibrator(num_bits=8, axis=None)
    assert modelopt_compat.calib_amax(cal) is None  # present in 0.47: read, not defaulted
    del cal._calib_amax  # as in a ModelOpt that renamed it
    with pytest.raises(CompatError, match=r"nvidia-modelopt .*: MaxCalibrator\._calib_amax is missing; quantkit "
                                          r"relies on it and supports nvidia-modelopt ==0\.47\.\*"):
        modelopt_compat.calib_amax(cal)
