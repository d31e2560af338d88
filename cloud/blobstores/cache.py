"""A bounded local copy of a remote store's blobs, so that readers keep getting local files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cloud.store import BlobStore

# Temporary files of fetches and puts in flight start so; a crash leaves them, the next start removes them.
TEMP_PREFIX = "remote-"


class BlobCache:
    """A local `BlobStore` holding at most about `max_bytes`: once over, the blobs handed out
    least recently go first. A blob handed out within the last `hold_s` seconds is never
    evicted (the bound is exceeded instead), because its reader may not have opened it yet:
    a round's step reads its inputs and updates by path, one after another."""

    def __init__(self, root: Path, max_bytes: int, hold_s: float = 3600.0) -> None:
        self.store = BlobStore(root)
        self.max_bytes = max_bytes
        self.hold_s = hold_s
        self._lock = threading.Lock()
        for stale in self.tmp.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def tmp(self) -> Path:
        return self.store.root / "tmp"

    def get(self, digest: str) -> Path | None:
        """The cached file, marked as just used; None if it is not cached."""
        path = self.store.path(digest)
        with self._lock:  # not between an eviction's look at the clocks and its unlink
            try:
                os.utime(path)  # the mtime is the cache's last-use clock
            except FileNotFoundError:
                return None
        return path

    def add(self, source: Path, digest: str) -> Path:
        """Move a verified file into the cache (consuming `source`), then evict down to the bound."""
        with self._lock:  # no eviction between the rename and the blob's first use
            self.store.put_file(source, digest)
            path = self.store.path(digest)
            os.utime(path)
            self._evict(keep=path)
        return path

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries())

    def _evict(self, keep: Path) -> None:
        """Drop least recently used blobs until under the bound; never `keep`, which was just
        added for a reader (even when it alone is over the bound). Called under the lock."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        kept_since = time.time() - self.hold_s
        for mtime, size, path in entries:
            if total <= self.max_bytes or mtime > kept_since:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every cached blob: the two-hex-digit folders, not tmp."""
        entries = []
        for folder in self.root.iterdir():
            if len(folder.name) != 2 or not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                try:
                    info = entry.stat()
                except FileNotFoundError:  # evicted by another thread meanwhile
                    continue
                entries.append((info.st_mtime, info.st_size, Path(entry.path)))
        return entries
