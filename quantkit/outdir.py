"""Output folders that are never half-written, never someone else's, and never written twice at once.

`check_output(path)` refuses, before any work, an `--out` that is not ours to replace: the current
folder or one holding it, a calibration set (or a folder holding or inside one), a file, a path
below a file, a folder that holds anything but a quantkit output (every output folder gets the
marker file `MARKER`), a folder we cannot write in. `output_lock(path)` takes `.NAME.lock` beside
the folder (a second run into it exits 2 naming the lock). `OutputFolder.staged(path)` builds the
results in a sibling `.NAME.partial-*` folder and swaps it into place only when the run finished,
under that lock; leftovers of a killed run are cleaned (and said) by the next one.
`atomic_write_*` do the same for single files inside an existing folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from quantkit.errors import InputError

MARKER = ".quantkit-output"
# What a quantkit run folder may hold (an output written before the marker existed is recognised
# by holding nothing else): replacing such a folder loses nothing quantkit did not make.
RUN_FILES = frozenset({
    MARKER, "recipe.yaml", "plan.json", "modelopt_state.pth", "run.json", "report.json", "report.md", "report.html",
    "model.onnx", "model.onnx.data", "export.json", "audit.json", "build_engine.sh", "model.engine", "engine.json",
    "sensitivity.json", "suggested-recipe.yaml", "comparison.json", "comparison.md", "comparison.html"})
CALIBRATION_MANIFEST = "manifest.json"


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


# ---------------------------------------------------------------------------------------------
# Whose folder is it?


def is_quantkit_output(folder: Path) -> bool:
    """A folder quantkit wrote: it has the marker, or (older runs) holds only quantkit's own files."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if (folder / MARKER).is_file():
        return True
    names = {p.name for p in folder.iterdir()}
    return bool(names) and names <= RUN_FILES and "run.json" in names


def write_marker(folder: Path, kind: str) -> None:
    from quantkit.version import __version__

    atomic_write_json(folder / MARKER, {"written_by": "quantkit", "kind": kind, "quantkit_version": __version__})


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path("/")


def check_output(path: str | os.PathLike, *, what: str = "--out", protect: Iterable[str | os.PathLike | None] = (),
                 replace: bool = True) -> Path:
    """The resolved folder `path`, if quantkit may write it; else InputError (exit 2) saying why.

    `protect`: folders a run reads (its calibration set) that it must neither replace, hold nor
    write into. With `replace`, an existing folder is acceptable only as a quantkit output (or
    empty); without, only as an existing folder (export and build add files to a run folder)."""
    raw = Path(path)
    final = Path(os.path.abspath(raw))
    cwd = Path.cwd().resolve()
    resolved = final.resolve()
    if _is_within(cwd, resolved):
        which = "the current folder" if resolved == cwd else f"a folder that holds the current folder ({cwd})"
        raise InputError(f"{what} {raw}: is {which}; quantkit replaces its output folder as a whole, so it "
                         "never writes there: pick a new folder, e.g. runs/NAME")
    for p in protect:
        if not p:
            continue
        p = Path(p).resolve()
        if _is_within(p, resolved) or _is_within(resolved, p):
            rel = "is" if p == resolved else ("holds" if _is_within(p, resolved) else "lies inside")
            raise InputError(f"{what} {raw}: {rel} the calibration set {p}, which this run reads; pick another folder")
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        kind = "a symbolic link" if final.is_symlink() else "a file"
        raise InputError(f"{what} {raw}: exists and is {kind}, not a quantkit output folder; pick another path "
                         "(nothing was changed)")
    anchor = _nearest_existing(final.parent)
    if not anchor.is_dir():
        raise InputError(f"{what} {raw}: {anchor} is a file, so no folder can be made below it; pick another path")
    if final.is_dir() and replace and any(final.iterdir()) and not is_quantkit_output(final):
        if (final / CALIBRATION_MANIFEST).is_file():
            raise InputError(f"{what} {raw}: holds a calibration set ({CALIBRATION_MANIFEST}); quantkit will not "
                             "replace it: pick another folder")
        raise InputError(f"{what} {raw}: exists and is not a quantkit output folder (no {MARKER} marker, and it "
                         "holds files quantkit did not write); pick a new folder or remove it yourself")
    if replace and final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
        raise InputError(f"{what} {raw}: not writable here; pick another folder")
    _probe_writable(anchor if not final.is_dir() else final, what, raw)
    return final


def _probe_writable(folder: Path, what: str, raw: Path) -> None:
    """Create and remove a file in `folder`: permission bits do not tell (root, read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=folder)
    except OSError as e:
        raise InputError(f"{what} {raw}: cannot write in {folder} ({e.strerror or e}); pick a writable folder "
                         "(checked before any work)") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


# ---------------------------------------------------------------------------------------------
# One writer at a time

_HELD: dict[Path, int] = {}


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold `.NAME.lock` beside the folder for the block; another holder means InputError (exit 2).

    Re-entrant in one process (the run holds it from its first check to its last write). The lock
    is an flock: a killed run releases it (the file it leaves behind is harmless and reused); a run
    that ends removes it."""
    final = Path(os.path.abspath(path))
    lock = lock_path(final)
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield lock
        finally:
            _HELD[lock] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, final)
    _HELD[lock] = 1
    try:
        yield lock
    finally:
        del _HELD[lock]
        # Unlinked while still held: a run that opened the old file sees that it is gone (_acquire).
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, final: Path) -> int:
    import fcntl

    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{final}: another quantkit run is writing this folder (lock {lock} is held); wait "
                             "for it to finish or pick another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder released and removed it between our open and flock: take the new one
    raise InputError(f"{final}: could not take the lock {lock}; is another quantkit run starting and stopping?")


def clean_leftovers(final: Path) -> list[str]:
    """Remove what a killed run left beside and in `final` (call with the lock held); say what went.

    `.NAME.partial-*` (a staging folder), `.NAME.old-*` (the previous folder, moved aside during
    the swap: put back when NAME itself is gone), `.FILE.*.tmp` (a single-file atomic write)."""
    from quantkit import console

    said = []
    parent = final.parent
    if not parent.is_dir():
        return said
    for p in sorted(parent.glob(f".{final.name}.old-*")):
        if not final.exists() and p.is_dir():
            os.replace(p, final)
            said.append(f"{final}: restored the previous folder from {p.name} (a run was killed while swapping)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            said.append(f"{p}: removed (the previous folder of a run killed while swapping)")
    for p in sorted(parent.glob(f".{final.name}.partial-*")):
        shutil.rmtree(p, ignore_errors=True)
        said.append(f"{p}: removed (the staging folder of an interrupted run)")
    if final.is_dir() and is_quantkit_output(final):
        for p in sorted(final.iterdir()):
            if p.name != MARKER and any(p.name.startswith(f".{n}.") for n in RUN_FILES):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                said.append(f"{p}: removed (a file an interrupted run was writing)")
    for line in said:
        console.warn(line)
    return said


def _link_or_copy(src: str, dst: str) -> None:
    # Files in a run folder are only ever replaced (renamed over), never changed in place, so a hard
    # link is as good as a copy and costs nothing for a large modelopt_state.pth.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class OutputFolder:
    """A run's output folder, written under a temporary name and renamed into place at the end."""

    @staticmethod
    @contextlib.contextmanager
    def staged(final: str | os.PathLike, keep_existing: bool = False, kind: str = "run",
               protect: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces `final` (old content removed last).

        With keep_existing, the temporary folder starts as a copy of `final` so a stage can add
        files to an existing run folder (export, build) and still be all-or-nothing. The folder is
        checked (check_output) and locked (output_lock) for the whole block."""
        final = check_output(final, protect=protect, replace=not keep_existing)
        with output_lock(final):
            clean_leftovers(final)
            final = check_output(final, protect=protect, replace=not keep_existing)  # leftovers may have moved
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
            try:
                if keep_existing and final.is_dir():
                    shutil.rmtree(tmp)
                    shutil.copytree(final, tmp, copy_function=_link_or_copy)
                write_marker(tmp, kind)
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; results are meant to be shared
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
