"""SHA-256 digests: how cotune names and checks every file it moves (artifacts, builds, checkpoints)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20  # read in 1 MiB pieces: a multi-GB weights file never sits in memory


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of a file's bytes."""
    sha = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def bytes_sha256(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex SHA-256 of bytes held in memory."""
    return hashlib.sha256(data).hexdigest()
