"""Content-addressed blob store on a local directory: the digest is the name and the check."""

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
        """Move a finished file (e.g. a spooled upload) into the store."""
        if digest is None:
            digest = file_sha256(source)
        return self._commit(Path(source), digest)

    def _commit(self, tmp: Path, digest: str) -> str:
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        if target.exists():
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
        return digest

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

