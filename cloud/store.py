"""The coordinator's content-addressed artifact store: the SHA-256 of a blob is its name and its check.

Everything that stores or reads blobs (the round driver, the strategies, the services) imports
from here and sees one interface, `ArtifactStore` (`cloud/blobstores/base.py`):

- `path(digest)`: a local file holding the blob; `has`, `size`, `read_bytes`;
- `put_bytes`, `put_chunks`, `put_file` (which consumes its source): they return the digest,
  and storing a digest the store already holds is a no-op;
- `read_range(digest, start, stop)`: the bytes a download with a Range header asks for;
- `root`: a local directory of the store's, with scratch space in `root / "tmp"`.

`open_store(settings)` picks the backend from `artifact_dir`:

- a directory (the default, `BlobStore` below): blobs live in `artifact_dir/ab/abcd...`. A blob
  is durable before anything refers to it: its data is fsync'ed before it is renamed into place,
  and its directory after, so that after a power cut a database row committed later never
  points at an empty or missing file (a rename is only durable once its directory is synced).
  Downloads are served from the file (Starlette's FileResponse parses Range).
- `s3://bucket/prefix` (`cloud/blobstores/s3.py`, `pip install "cotune[s3]"`): an
  S3-compatible bucket that coordinator replicas on several machines share, with the endpoint,
  region and credentials from the `s3_*` settings or boto3's own chain (AWS_* variables,
  ~/.aws, an instance role). A blob's key is prefix + digest. A put hashes the bytes and refuses
  a digest they do not have, skips the upload when the key exists, and is atomic for readers
  (an S3 PUT, or a multipart upload's completion, makes the whole object appear at once).
  `path` hands out a file from a local cache (`artifact_cache_dir`, default
  `work_dir/artifact-cache`): fetched once, its SHA-256 checked, renamed into place whole, and
  evicted least recently used first once the cache is over `artifact_cache_bytes` (a blob handed
  out in the last hour is kept, so a round reading its inputs never loses one mid-step).
  Device downloads are streamed from the bucket with the Range honoured (`cloud/api/ranged.py`).
  A bucket that is missing or refuses access stops the coordinator at start-up with what to fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.blobstores.base import ArtifactStore, DigestMismatch, StoreConfigError, StoreUnavailable
from cloud.blobstores.s3url import is_s3_url
from common.digest import file_sha256

if TYPE_CHECKING:
    from cloud.settings import CoordinatorSettings

__all__ = ["ArtifactStore", "BlobStore", "DigestMismatch", "StoreConfigError", "StoreUnavailable", "open_store",
           "sync_file"]

_CHUNK = 1 << 20


def open_store(settings: CoordinatorSettings) -> ArtifactStore:
    """The store `settings.artifact_dir` names: an s3:// bucket, or a local directory."""
    if is_s3_url(settings.artifact_dir):
        from cloud.blobstores.s3 import S3BlobStore

        return S3BlobStore.from_settings(settings)
    return BlobStore(Path(settings.artifact_dir))


class BlobStore(ArtifactStore):
    """The blobs in a local directory."""

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

    def read_range(self, digest: str, start: int, stop: int) -> Iterator[bytes]:
        fh = self.path(digest).open("rb")  # opened now: a missing blob raises here, not mid-stream
        return _file_chunks(fh, start, stop)

    def describe(self) -> str:
        return str(self.root)


def _file_chunks(fh: io.BufferedReader, start: int, stop: int) -> Iterator[bytes]:
    with fh:
        fh.seek(start)
        left = stop - start
        while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
            left -= len(chunk)
            yield chunk


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
