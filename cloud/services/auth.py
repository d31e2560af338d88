"""Who is calling: the admin token, client tokens, and revocation."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from cloud.auth import hash_token, same_token
from cloud.errors import forbidden, not_found, unauthorized
from cloud.state import CoordinatorState, StateUnavailable
from cloud.state.records import ClientRecord

log = logging.getLogger("cotune.auth")

# A device's last_seen is written at most this often, so polling costs no write per request.
LAST_SEEN_EVERY_S = 30.0


class AuthService:
    def __init__(self, state: CoordinatorState, admin_token: str) -> None:
        self.state = state
        self.admin_token = admin_token

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and same_token(token, self.admin_token)

    def check_admin(self, token: str | None) -> None:
        if not self.is_admin(token):
            raise unauthorized("this endpoint needs the admin token")

    def client(self, token: str | None) -> ClientRecord:
        """The enrolled, unrevoked client this bearer token belongs to."""
        if not token:
            raise unauthorized()
        client = self.state.client_by_token_hash(hash_token(token))
        if client is None:
            raise unauthorized("unknown client token")
        if client.revoked:
            raise forbidden("this client's token was revoked", "enroll the device again")
        self._seen(client)
        return client

    def _seen(self, client: ClientRecord) -> None:
        now = datetime.now(timezone.utc)
        if client.last_seen is not None and now - client.last_seen < timedelta(seconds=LAST_SEEN_EVERY_S):
            return
        try:
            self.state.touch_client(client.id, now, LAST_SEEN_EVERY_S)
        except StateUnavailable as exc:  # a busy database must not fail the device's call
            log.warning("could not record that client %s was seen: %s", client.id, exc)

    def viewer(self, token: str | None) -> ClientRecord | None:
        """None for the admin (who sees everything); the client otherwise."""
        return None if self.is_admin(token) else self.client(token)

    def revoke(self, client_id: str) -> None:
        if not self.state.revoke_client(client_id):
            raise not_found(f"client {client_id!r}")


def check_member(viewer: ClientRecord | None, run_id: str, message: str) -> None:
    """A client may only act on the run it is enrolled in (the admin on any)."""
    if viewer is not None and viewer.run_id != run_id:
        raise forbidden(message)

