"""The interface every artifact store backend implements (documented in `cloud.store`)."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

_DIGEST = re.compile(r"[0-9a-f]{64}")


class StoreConfigError(ValueError):
    """The store named by the settings cannot be used (no such bucket, no access, no endpoint)."""


class StoreUnavailable(OSError):
    """A remote store did not answer a request that should have worked; worth retrying."""


class DigestMismatch(ValueError):
    """Bytes whose SHA-256 is not the digest they were stored or fetched under."""


class ArtifactStore(ABC):
    """Content-addressed blobs: the lowercase hex SHA-256 of a blob's bytes is its name.

    `root` is a local directory the store owns; `root / "tmp"` exists and is scratch space on
    the same disk as the local files `path` hands out (aggregation spills there)."""

    root: Path
    # True when the blobs live off this machine: `path` may fetch, and downloads are streamed
    # with `read_range` rather than served from a local file.
    remote: bool = False

    @abstractmethod
    def path(self, digest: str) -> Path:
        """A local file holding the blob (fetched first if the store is remote)."""

    @abstractmethod
    def has(self, digest: str) -> bool: ...

    @abstractmethod
    def size(self, digest: str) -> int:
        """The blob's length in bytes; FileNotFoundError if the store does not hold it."""

    @abstractmethod
    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        """Store the concatenated chunks; returns their digest. Storing a held digest again is a no-op."""

    @abstractmethod
    def put_file(self, source: Path, digest: str | None = None) -> str:
        """Move a finished file into the store (`source` is consumed); returns its digest."""

    @abstractmethod
    def read_range(self, digest: str, start: int, stop: int) -> Iterator[bytes]:
        """The blob's bytes [start, stop), in chunks; FileNotFoundError if the store does not hold it."""

    @abstractmethod
    def describe(self) -> str:
        """Where the blobs are, for messages."""

    def put_bytes(self, data: bytes) -> str:
        return self.put_chunks([data])

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()


def check_digest(digest: str) -> str:
    """`digest` if it is a lowercase hex SHA-256, else a ValueError (it becomes a key or a file name)."""
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"{digest[:80]!r} is not a lowercase hex sha256 digest")
    return digest
