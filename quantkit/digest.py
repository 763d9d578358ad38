"""The SHA-256 of a file, as quantkit records it (calibration shards and sources, ONNX graphs and
their external data in engine.json): one helper over hashlib.file_digest, streaming the file.
"""

from __future__ import annotations

import hashlib
import os


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in blocks (a multi-GB graph is never held in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
