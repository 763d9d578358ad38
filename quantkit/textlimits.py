"""Bounds on what quantkit reads from files it is handed, and on what it quotes back in messages.

A recipe, run.json, plan.json or manifest is read whole only below a size limit, decoded as UTF-8,
and nested no deeper than `MAX_DEPTH`; a value quoted in an error message is cut to `QUOTE_CHARS`
(a 442-byte YAML of aliases once expanded into a 72 MB error line). Every refusal is an InputError
naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quantkit.errors import InputError

MAX_TEXT_BYTES = 4 << 20  # recipes and JSON records are a few KiB; plan.json of a large model a few MiB
MAX_DEPTH = 64  # nesting of a recipe or record (the deepest quantkit writes is about 6)
MAX_NODES = 200_000  # values in one document, aliases expanded
QUOTE_CHARS = 80


def shorten(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value), cut to `limit` characters (without building the whole repr of a huge value)."""
    if isinstance(value, (dict, list, tuple, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except RecursionError:
        return f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).splitlines() or ["no detail"])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_text_limited(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of `path`, refused (InputError naming it) when unreadable, too large or not UTF-8."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"{path}: {size} bytes is too large for a {what} (limit {max_bytes} bytes)")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: too large for a {what} (limit {max_bytes} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: the {what} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def check_depth(obj: Any, path: str | os.PathLike, what: str, max_depth: int = MAX_DEPTH,
                max_nodes: int = MAX_NODES) -> None:
    """Refuse a value nested deeper than `max_depth` or with more than `max_nodes` values (shared
    sub-values, as YAML aliases make them, count each time they appear). Iterative: no recursion."""
    stack = [(obj, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InputError(f"{path}: the {what} holds more than {max_nodes} values (YAML aliases expand into "
                             "copies); write it out plainly")
        if depth > max_depth:
            raise InputError(f"{path}: the {what} is nested more than {max_depth} levels deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value.keys() if isinstance(k, (tuple, frozenset)))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def read_json_limited(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """JSON from `path` within the bounds above; InputError naming the file otherwise."""
    text = read_text_limited(path, what, max_bytes)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (the {what}; line {e.lineno} column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: the {what} is nested too deeply to read") from None
    check_depth(data, path, what)
    return data
