"""Downloads by digest: the admin reads any blob, a client only its own run's visible ones."""

from __future__ import annotations

from pathlib import Path

from cloud.errors import not_found
from cloud.state import CoordinatorState
from cloud.state.records import ClientRecord
from cloud.store import BlobStore


class ArtifactsService:
    def __init__(self, state: CoordinatorState, store: BlobStore) -> None:
        self.state = state
        self.store = store

    def for_admin(self, digest: str) -> Path:
        if not self.store.has(digest):
            raise not_found(f"artifact {digest}")
        return self.store.path(digest)

    def for_client(self, client: ClientRecord, digest: str) -> Path:
        if not self.state.artifact_visible(client.run_id, digest) or not self.store.has(digest):
            # Same answer whether it exists elsewhere or not: no probing of other runs' blobs.
            raise not_found(f"artifact {digest} in this client's run")
        return self.store.path(digest)
