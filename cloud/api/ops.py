"""Liveness and Prometheus figures."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from cloud.api.deps import ERRORS, Coord, Token
from common import __version__

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
def metrics(coord: Coord, token: Token) -> str:
    """Prometheus counters; the admin token is needed unless the `metrics_public` setting opens
    them (for a scraper on a private network): run and device counts are the operator's."""
    if not coord.settings.metrics_public:
        coord.auth.check_admin(token)
    counts = coord.state.counts()
    lines = ["# TYPE cotune_runs gauge"]
    lines += [f'cotune_runs{{state="{state}"}} {n}' for state, n in sorted(counts.runs_by_state.items())]
    lines += ["# TYPE cotune_clients gauge", f"cotune_clients {counts.clients}",
              "# TYPE cotune_updates_total counter", f"cotune_updates_total {counts.updates}"]
    return "\n".join(lines) + "\n"
