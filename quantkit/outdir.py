"""Output folders that are never half-written.

`OutputFolder.staged(path)` builds a run's results in a sibling temporary folder and swaps it into
place only when the run finished; an interrupted or failed run leaves the previous folder intact.
`atomic_write_*` do the same for single files inside an existing folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class OutputFolder:
    """A run's output folder, written under a temporary name and renamed into place at the end."""

    @staticmethod
    @contextlib.contextmanager
    def staged(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces `final` (old content removed last).

        With keep_existing, the temporary folder starts as a copy of `final` so a stage can add
        files to an existing run folder (export, build) and still be all-or-nothing.
        """
        final = Path(final).resolve()
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            if keep_existing and final.is_dir():
                shutil.rmtree(tmp)
                shutil.copytree(final, tmp)
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
