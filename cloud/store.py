"""Content-addressed blob store on a local directory: the digest is the name and the check.

A blob is durable before anything refers to it: its data is fsync'ed before it is renamed into
place, and its directory after, so that after a power cut a database row committed later never
points at an empty or missing file (a rename is only durable once its directory is synced).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from common.digest import file_sha256


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def put_bytes(self, data: bytes) -> str:
        return self.put_chunks([data])

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        """Write to a temporary file, fsync, then rename into place: a crash leaves no half blob."""
        sha = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    sha.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            return self._commit(Path(tmp_name), sha.hexdigest())
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def put_file(self, source: Path, digest: str | None = None) -> str:
        """Move a finished file (e.g. a spooled upload) into the store, its data synced first."""
        if digest is None:
            digest = file_sha256(source)
        sync_file(Path(source))
        return self._commit(Path(source), digest)

    def _commit(self, tmp: Path, digest: str) -> str:
        """Rename a synced file into place and sync the directories that changed."""
        target = self.path(digest)
        if not target.parent.is_dir():
            target.parent.mkdir(exist_ok=True)
            _sync_dir(self.root)
        if target.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
            _sync_dir(target.parent)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()


def sync_file(path: Path) -> None:
    """fsync a file's data (through a read-only descriptor: fsync flushes the file, not the descriptor)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
