"""Edge-to-cloud collaboration: a device escalates a prompt to the run's LLM."""

from __future__ import annotations

from fastapi import APIRouter

from cloud.api.bodies import CLIENT_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS_422, Coord, CurrentClient
from common.protocol import ErrorDetail, GenerateRequest, GenerateResponse

router = APIRouter(tags=["inference"], route_class=GuardedRoute)


_BUSY = {429: {"model": ErrorDetail, "description": "rate limited or busy; see Retry-After"}}


@router.post("/v1/generate", responses={**ERRORS_422, **_BUSY})
@body_rule(CLIENT_JSON)
def generate(request: GenerateRequest, coord: Coord, client: CurrentClient) -> GenerateResponse:
    """The run's LLM answers a prompt a device escalated (edge-to-cloud collaboration)."""
    return coord.generation.generate(client, request)
