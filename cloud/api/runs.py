"""Runs: created and listed by the admin, read by the admin or a device of the run."""

from __future__ import annotations

from fastapi import APIRouter, Response

from cloud.api.bodies import ADMIN_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS, ERRORS_422, AdminOnly, Coord, RunId, Viewer
from common.protocol import RunCreated, RunSpec, RunStatus

router = APIRouter(prefix="/v1/runs", tags=["runs"], route_class=GuardedRoute)


@router.post("", status_code=201, responses=ERRORS_422, dependencies=[AdminOnly])
@body_rule(ADMIN_JSON)
def create_run(spec: RunSpec, coord: Coord, response: Response) -> RunCreated:
    created = coord.runs.create(spec)
    if not created.created:
        response.status_code = 200
    return created


@router.get("", responses=ERRORS, dependencies=[AdminOnly])
def list_runs(coord: Coord) -> list[RunStatus]:
    return coord.runs.list_runs()


@router.get("/{run_id}", responses=ERRORS)
def run_status(run_id: RunId, coord: Coord, viewer: Viewer) -> RunStatus:
    return coord.runs.status(run_id, viewer)
