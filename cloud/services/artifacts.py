"""Downloads by digest: the admin reads any blob, a client only its own run's visible ones."""

from __future__ import annotations

from pathlib import Path

from cloud.errors import not_found
from cloud.state import CoordinatorState
from cloud.state.records import ClientRecord
from cloud.store import ArtifactStore


class ArtifactsService:
    def __init__(self, state: CoordinatorState, store: ArtifactStore) -> None:
        self.state = state
        self.store = store

    def admin_size(self, digest: str) -> int:
        """The blob's size, once it is known to be stored (404 if not)."""
        return self._size(digest, f"artifact {digest}")

    def client_size(self, client: ClientRecord, digest: str) -> int:
        """The blob's size, if it is stored and visible to the client's run (404 if not)."""
        # Same answer whether it exists elsewhere or not: no probing of other runs' blobs.
        what = f"artifact {digest} in this client's run"
        if not self.state.artifact_visible(client.run_id, digest):
            raise not_found(what)
        return self._size(digest, what)

    def for_admin(self, digest: str) -> Path:
        """A local file of the blob (fetched first from a remote store), under admin_size's rules."""
        self.admin_size(digest)
        return self.store.path(digest)

    def for_client(self, client: ClientRecord, digest: str) -> Path:
        """A local file of the blob (fetched first from a remote store), under client_size's rules."""
        self.client_size(client, digest)
        return self.store.path(digest)

    def _size(self, digest: str, what: str) -> int:
        try:
            return self.store.size(digest)
        except FileNotFoundError:
            raise not_found(what) from None
