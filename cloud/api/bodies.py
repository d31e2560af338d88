"""Request bodies: who sends one is known, and how large it may be is enforced, before a byte
of it is read (ARCHITECTURE.md, "Privacy").

FastAPI reads and parses a route's body before it solves the route's dependencies, so a token
checked in a dependency comes too late: an anonymous caller could make the coordinator read and
parse any amount of JSON. Every router here uses `GuardedRoute`, which, for a route that takes
a body, first refuses a body declared (Content-Length) over the route's limit, then runs the
route's gate (who may send a body there), and only then reads the body, counting, up to the
limit, before FastAPI parses it. A route that streams its body itself (uploads) gets the first
two steps and applies the limit as it reads.

Written here rather than taken from Starlette's body-limit middleware: the limits are
coordinator settings read per request, and the answers must be the API's own errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param
from starlette.types import Message

from cloud.auth import hash_token
from cloud.coordinator import Coordinator
from cloud.errors import ApiError, too_large, unauthorized
from cloud.settings import CoordinatorSettings

Gate = Callable[[Coordinator, str | None], object]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

_RULE_ATTR = "__cotune_body_rule__"
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class BodyRule:
    """How a route takes its body: the most bytes it reads, and who may send one at all."""

    limit: Callable[[CoordinatorSettings], int]
    # Raises the API's 401/403 for a caller who may not send a body here; None lets anyone.
    gate: Gate | None = None
    what: str = "the JSON body"
    hint: str | None = "send a smaller body; the limit is a coordinator setting"
    # The route reads the body itself (as a stream) and applies `limit` as it does.
    streamed: bool = False

    def too_large(self, limit: int) -> ApiError:
        return too_large(self.what, limit, self.hint)


def bearer(request: Request) -> str | None:
    """The bearer token, read the way the routes' `HTTPBearer` dependency reads it."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


def admin_gate(coord: Coordinator, token: str | None) -> None:
    coord.auth.check_admin(token)


def client_gate(coord: Coordinator, token: str | None) -> None:
    coord.auth.client(token)


def enroll_gate(coord: Coordinator, token: str | None) -> None:
    # Only whether this is some run's enroll token; enrollment itself checks the rest.
    if not token or coord.state.run_by_enroll_token_hash(hash_token(token)) is None:
        raise unauthorized("enrollment needs a run's enroll token as the bearer token")


ADMIN_JSON = BodyRule(limit=lambda s: s.max_admin_json_bytes, gate=admin_gate)
CLIENT_JSON = BodyRule(limit=lambda s: s.max_json_bytes, gate=client_gate)
ENROLL_JSON = BodyRule(limit=lambda s: s.max_json_bytes, gate=enroll_gate)
_ANY_JSON = BodyRule(limit=lambda s: s.max_json_bytes)


def body_rule(rule: BodyRule) -> Callable[[Endpoint], Endpoint]:
    """Mark an endpoint with how it takes its body (put it under the router's decorator)."""

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _RULE_ATTR, rule)
        return endpoint

    return mark


class GuardedRoute(APIRoute):
    """An APIRoute that bounds and gates its body before FastAPI reads it (see the module)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        marked: BodyRule | None = getattr(self.endpoint, _RULE_ATTR, None)
        if marked is None and self.body_field is None:
            return handler  # takes no body: FastAPI never reads one
        rule = marked or _ANY_JSON
        reads = self.body_field is not None and not rule.streamed

        async def guarded(request: Request) -> Response:
            coord: Coordinator = request.app.state.coordinator
            limit = rule.limit(coord.settings)
            declared = request.headers.get("content-length")
            # (A malformed length never gets here: the HTTP server refuses it.)
            if declared is not None and _DIGITS.fullmatch(declared) and int(declared) > limit:
                raise rule.too_large(limit)
            if rule.gate is not None:
                await run_in_threadpool(rule.gate, coord, bearer(request))
            if not reads:
                return await handler(request)
            body = await _read_bounded(request, limit, rule)
            return await handler(_replaying(request, body))

        return guarded


async def _read_bounded(request: Request, limit: int, rule: BodyRule) -> bytes:
    """The whole body, refused as soon as it passes `limit` (chunked bodies declare no length)."""
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise rule.too_large(limit)
        body += chunk
    return bytes(body)


def _replaying(request: Request, body: bytes) -> Request:
    """The same request, its body served from memory to whoever reads it next (FastAPI)."""
    served = False

    async def receive() -> Message:
        nonlocal served
        if not served:
            served = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()  # after the body: waits for the disconnect, as the server's does

    return Request(request.scope, receive)
