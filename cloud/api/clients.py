"""Devices: enrollment with a run's enroll token, revocation by the admin."""

from __future__ import annotations

from fastapi import APIRouter, Response

from cloud.api.bodies import ENROLL_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS, ERRORS_422, AdminOnly, ClientId, Coord, Token
from common.protocol import ClientCredentials, ClientRegistration

router = APIRouter(prefix="/v1/clients", tags=["clients"], route_class=GuardedRoute)


@router.post("", status_code=201, responses=ERRORS_422)
@body_rule(ENROLL_JSON)
def register_client(reg: ClientRegistration, coord: Coord, token: Token) -> ClientCredentials:
    return coord.runs.enroll(token, reg)


@router.delete("/{client_id}", status_code=204, responses=ERRORS, dependencies=[AdminOnly])
def revoke_client(client_id: ClientId, coord: Coord) -> Response:
    coord.auth.revoke(client_id)
    return Response(status_code=204)
