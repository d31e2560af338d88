"""Runs: created, listed and stopped by the admin, read by the admin or a device of the run;
the admin's list of a run's devices."""

from __future__ import annotations

from fastapi import APIRouter, Response

from cloud.api.bodies import ADMIN_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS, ERRORS_422, AdminOnly, Coord, RunId, Viewer
from cloud.errors import forbidden
from common.protocol import DeviceInfo, RunCreated, RunSpec, RunStatus

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


@router.post("/{run_id}/stop", responses=ERRORS, dependencies=[AdminOnly])
def stop_run(run_id: RunId, coord: Coord) -> RunStatus:
    """End a running run now: its rounds stop advancing and its devices leave (409 if it is over)."""
    return coord.runs.stop(run_id)


@router.get("/{run_id}/clients", responses=ERRORS)
def list_devices(run_id: RunId, coord: Coord, viewer: Viewer) -> list[DeviceInfo]:
    """The run's devices (revoked ones too), with when each was last seen; the admin's only."""
    if viewer is not None:  # a device token is known, but this list is not a device's to read
        raise forbidden("only the admin token may list a run's devices")
    return coord.runs.devices(run_id)
