"""The changes quantkit makes outside a model on its behalf, recorded per model and undone with it.

Quantizing a model touches objects other models share: transformers' attention registries,
ModelOpt's QuantModuleRegistry and kernel globals, the rotary functions in a modeling file's
globals, the model's config. Each such change goes through the model's `Patches` (`of_model`),
which records how to undo it. Two models that make the same change share it (refcounted by a key);
it is undone when the last of them lets go: when the model itself is garbage-collected (the
Patches live as long as the model, not as its `QuantizedModel`), or earlier when `close()` runs
(`QuantizedModel.close()`, the end of its `with` block). Importing quantkit changes nothing.

The short-lived patches made *inside* one forward call (attention's matmul/softmax routing) restore
themselves when the call returns and are not recorded here.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable

_MISSING = object()
_LOCK = threading.RLock()
# key -> [holders, undo]; a change made once however many models hold it.
_SHARED: dict[Hashable, list] = {}


class Patches:
    """The changes one model holds. `hold` a shared change by key, `set_attr` one attribute,
    `local` a change only this model makes; `close()` undoes them in reverse order (idempotent)."""

    def __init__(self, owner: str = "model"):
        self.owner = owner
        self._keys: list[Hashable] = []
        self._local: list[Callable[[], None]] = []
        self._order: list[tuple[str, Any]] = []
        self.closed = False

    def hold(self, key: Hashable, apply: Callable[[], Callable[[], None]]) -> bool:
        """Make the change `apply()` (which returns its undo) unless some model holds `key` already;
        this model then holds it too. True when this call made the change."""
        with _LOCK:
            if self.closed:
                raise RuntimeError(f"quantkit: the changes of {self.owner} were undone; quantize it again")
            if key in self._keys:
                return False
            entry = _SHARED.get(key)
            made = entry is None
            if made:
                _SHARED[key] = [1, apply()]
            else:
                entry[0] += 1
            self._keys.append(key)
            self._order.append(("shared", key))
            return made

    def set_attr(self, obj: Any, name: str, value: Any) -> bool:
        """obj.name = value, shared by every model that sets the same attribute of the same object;
        undone by putting back what was there (or removing what was not)."""
        def apply() -> Callable[[], None]:
            space = _own_dict(obj)
            before = space.get(name, _MISSING) if space is not None else getattr(obj, name, _MISSING)
            setattr(obj, name, value)

            def undo() -> None:
                if getattr(obj, name, _MISSING) is not value:
                    return  # someone replaced it since: theirs now, not ours to put back
                if before is _MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, before)
            return undo

        # obj is kept alive by the key: an id alone could be reused by another object.
        return self.hold(("attr", id(obj), name, _Pin(obj)), apply)

    def local(self, undo: Callable[[], None]) -> None:
        """Record the undo of a change only this model made (e.g. its own config)."""
        with _LOCK:
            self._local.append(undo)
            self._order.append(("local", undo))

    def holds(self, key: Hashable) -> bool:
        return key in self._keys

    def close(self) -> None:
        """Undo this model's changes, newest first; shared ones only when no other model holds them."""
        with _LOCK:
            if self.closed:
                return
            self.closed = True
            errors = []
            for kind, item in reversed(self._order):
                try:
                    if kind == "local":
                        item()
                        continue
                    entry = _SHARED.get(item)
                    if entry is None:
                        continue
                    entry[0] -= 1
                    if entry[0] == 0:
                        del _SHARED[item]
                        entry[1]()
                except Exception as e:  # undo the rest; say which failed at the end
                    errors.append(f"{type(e).__name__}: {e}")
            self._keys.clear()
            self._local.clear()
            self._order.clear()
            if errors:
                raise RuntimeError(f"quantkit: undoing the changes of {self.owner} failed: " + "; ".join(errors))

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Pin:
    """Keeps an object alive inside a key and compares by identity (objects need not be hashable)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Pin) and other.obj is self.obj


def _own_dict(obj: Any) -> dict | None:
    try:
        return object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None


_BY_MODEL: "weakref.WeakKeyDictionary[Any, Patches]" = weakref.WeakKeyDictionary()


def of_model(model: Any) -> Patches:
    """The Patches of `model` (made on first use); closed when the model is garbage-collected.

    What a Patches records must never hold the model itself (submodules and configs are fine),
    or the model could not be collected."""
    with _LOCK:
        patches = _BY_MODEL.get(model)
        if patches is None or patches.closed:
            patches = Patches(type(model).__name__)
            _BY_MODEL[model] = patches
            weakref.finalize(model, patches.close)
        return patches


def release(model: Any) -> None:
    """Undo what quantkit changed on `model`'s behalf now (see `Patches.close`)."""
    with _LOCK:
        patches = _BY_MODEL.pop(model, None)
    if patches is not None:
        patches.close()


def active() -> int:
    """How many shared changes are in force in this process (0 when every model let go)."""
    return len(_SHARED)
