"""Edge builds: published by the admin, reported by devices, listed per caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.bodies import ADMIN_JSON, CLIENT_JSON, GuardedRoute, body_rule
from cloud.api.deps import ERRORS, ERRORS_422, AdminOnly, Coord, CurrentClient, RunId, Viewer
from common.protocol import BuildInfo, BuildList, BuildRequest, DeviceBuildReport, DeviceProfile

router = APIRouter(prefix="/v1/runs/{run_id}", tags=["builds"], route_class=GuardedRoute)


@router.post("/builds", status_code=201, responses=ERRORS_422, dependencies=[AdminOnly])
@body_rule(ADMIN_JSON)
def publish_builds(run_id: RunId, request: BuildRequest, coord: Coord) -> list[BuildInfo]:
    """Export the run's current SLM to edge builds now (GGUF / ONNX), with parity checks."""
    return coord.builds.publish(run_id, request.targets)


@router.get("/builds", responses=ERRORS)
def list_builds(run_id: RunId, coord: Coord, viewer: Viewer,
                arch: Annotated[str | None, Query(max_length=64)] = None,
                ram_bytes: Annotated[int | None, Query(ge=0, le=2**50)] = None,
                cores: Annotated[int, Query(ge=1, le=4096)] = 1,
                backends: Annotated[str | None, Query(max_length=256, description="comma-separated")] = None,
                ) -> BuildList:
    """The run's edge builds; with a device profile, also the one that fits it best."""
    profile = None
    if arch is not None or ram_bytes is not None or backends is not None:
        profile = DeviceProfile(arch=arch or "unknown", ram_bytes=ram_bytes or 0, cores=cores,
                                backends=[b for b in (backends or "").split(",") if b][:16])
    return coord.builds.list_builds(run_id, viewer, profile)


@router.post("/device-builds", status_code=201, responses=ERRORS_422)
@body_rule(CLIENT_JSON)
def report_device_build(run_id: RunId, report: DeviceBuildReport, coord: Coord,
                        client: CurrentClient) -> BuildInfo:
    """A device reports a build it made of its own SLM (sending the same again changes nothing);
    only that device and the admin see it."""
    return coord.builds.report_device_build(client, run_id, report)
