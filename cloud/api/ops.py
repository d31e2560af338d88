"""Liveness and Prometheus figures."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cloud.api.deps import ERRORS, Coord, Token
from cloud.telemetry import CONTENT_TYPE
from common import __version__

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/metrics", response_class=Response, responses={**ERRORS, 200: {"content": {CONTENT_TYPE: {}}}})
def metrics(request: Request, coord: Coord, token: Token) -> Response:
    """The Prometheus text format, from this app's prometheus-client registry (cloud/telemetry.py).
    The admin token is needed unless the `metrics_public` setting opens it (for a scraper on a
    private network): run and device counts are the operator's."""
    if not coord.settings.metrics_public:
        coord.auth.check_admin(token)
    return Response(request.app.state.telemetry.render(), media_type=CONTENT_TYPE)
