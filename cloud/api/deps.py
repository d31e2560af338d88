"""What routes depend on, as typed `Annotated` dependencies: the coordinator, the bearer
token, who is calling, and bounded path parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as FastApiPath
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cloud.coordinator import Coordinator
from cloud.errors import InvalidRequestDetail
from cloud.state.records import ClientRecord
from common.protocol import ErrorDetail

_bearer = HTTPBearer(auto_error=False, description="admin, enrollment or client token")

# The error answers most routes share, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorDetail, "description": text} for code, text in [
    (401, "missing or unknown token"),
    (403, "token valid but not allowed here"),
    (404, "no such resource (for this caller)"),
    (409, "conflicts with the run's state"),
]}
# ... and those of a route that takes a body.
ERRORS_422: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    413: {"model": ErrorDetail, "description": "the body is over the route's limit"},
    422: {"model": InvalidRequestDetail, "description": "the body does not fit the schema or the run"},
}


def get_coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


def bearer_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    return creds.credentials if creds else None


Coord = Annotated[Coordinator, Depends(get_coordinator)]
Token = Annotated[str | None, Depends(bearer_token)]
# Bounded path parameters: an id or round number out of range is a 422, never a database error.
RunId = Annotated[str, FastApiPath(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
ClientId = Annotated[str, FastApiPath(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
RoundNo = Annotated[int, FastApiPath(ge=1, le=1_000_000)]


def require_admin(coord: Coord, token: Token) -> None:
    coord.auth.check_admin(token)


def require_client(coord: Coord, token: Token) -> ClientRecord:
    return coord.auth.client(token)


def admin_or_client(coord: Coord, token: Token) -> ClientRecord | None:
    """None for the admin; the client otherwise (whose view is then narrowed)."""
    return coord.auth.viewer(token)


AdminOnly = Depends(require_admin)
CurrentClient = Annotated[ClientRecord, Depends(require_client)]
Viewer = Annotated[ClientRecord | None, Depends(admin_or_client)]
