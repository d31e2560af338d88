"""The coordinator's HTTP API (FastAPI). Routes stay thin: checks and state live in service.py."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select

from cloud.db import Client, Run, Update
from cloud.errors import ApiError
from cloud.rounds import RoundDriver
from cloud.service import Coordinator
from cloud.settings import CoordinatorSettings
from common import __version__
from common.protocol import (
    SHA256_PATTERN,
    BuildInfo,
    BuildList,
    BuildRequest,
    ClientCredentials,
    ClientRegistration,
    DeviceProfile,
    ErrorDetail,
    GenerateRequest,
    GenerateResponse,
    RoundInfo,
    RoundSummary,
    RunCreated,
    RunSpec,
    RunStatus,
    UpdateReceipt,
)

log = logging.getLogger("cotune.api")

_bearer = HTTPBearer(auto_error=False, description="admin, enrollment or client token")
_ERRORS = {code: {"model": _Err, "description": text} for code, text, _Err in [
    (401, "missing or unknown token", ErrorDetail),
    (403, "token valid but not allowed here", ErrorDetail),
    (404, "no such resource (for this caller)", ErrorDetail),
    (409, "conflicts with the run's state", ErrorDetail),
]}


def get_coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


def bearer_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    return creds.credentials if creds else None


Coord = Annotated[Coordinator, Depends(get_coordinator)]
# Bounded path parameters: an id or round number out of range is a 422, never a database error.
RunId = Annotated[str, FastApiPath(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
ClientId = Annotated[str, FastApiPath(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
RoundNo = Annotated[int, FastApiPath(ge=1, le=1_000_000)]
Token = Annotated[str | None, Depends(bearer_token)]


def require_admin(coord: Coord, token: Token) -> None:
    coord.check_admin(token)


def require_client(coord: Coord, token: Token) -> Client:
    return coord.authenticate_client(token)


def admin_or_client(coord: Coord, token: Token) -> Client | None:
    """None for the admin; the client row otherwise (whose view is then narrowed)."""
    if coord.is_admin(token):
        return None
    return coord.authenticate_client(token)


Viewer = Annotated[Client | None, Depends(admin_or_client)]


def create_app(settings: CoordinatorSettings, start_driver: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        coordinator = Coordinator(settings)
        app.state.coordinator = coordinator
        if settings.run is not None:
            created = await run_in_threadpool(coordinator.create_run, settings.run)
            log.info("run %s ready (%s)", created.name, "created" if created.created else "resumed")
        driver = RoundDriver(coordinator)
        app.state.driver = driver
        if start_driver:
            driver.start()
        try:
            yield
        finally:
            driver.stop()
            coordinator.engine.dispose()

    app = FastAPI(
        title="cotune coordinator",
        version=__version__,
        description="Federated co-tuning of a cloud LLM and on-device SLMs. "
        "Errors carry `detail: {code, message, hint}`.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail.model_dump()})

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics(coord: Coord) -> str:
        with coord.Session() as s:
            runs = dict(s.execute(select(Run.state, func.count()).group_by(Run.state)).all())
            clients = s.scalar(select(func.count()).select_from(Client)) or 0
            updates = s.scalar(select(func.count()).select_from(Update)) or 0
        lines = ["# TYPE cotune_runs gauge"]
        lines += [f'cotune_runs{{state="{state}"}} {n}' for state, n in sorted(runs.items())]
        lines += ["# TYPE cotune_clients gauge", f"cotune_clients {clients}",
                  "# TYPE cotune_updates_total counter", f"cotune_updates_total {updates}"]
        return "\n".join(lines) + "\n"

    @app.post("/v1/runs", tags=["runs"], status_code=201, responses={**_ERRORS, 422: {"model": ErrorDetail}},
              dependencies=[Depends(require_admin)])
    def create_run(spec: RunSpec, coord: Coord, response: Response) -> RunCreated:
        created = coord.create_run(spec)
        if not created.created:
            response.status_code = 200
        return created

    @app.get("/v1/runs", tags=["runs"], responses=_ERRORS, dependencies=[Depends(require_admin)])
    def list_runs(coord: Coord) -> list[RunStatus]:
        return coord.list_runs()

    @app.get("/v1/runs/{run_id}", tags=["runs"], responses=_ERRORS)
    def run_status(run_id: RunId, coord: Coord, viewer: Viewer) -> RunStatus:
        return coord.run_status(run_id, viewer)

    @app.get("/v1/runs/{run_id}/rounds/current", tags=["rounds"], responses=_ERRORS)
    def current_round(run_id: RunId, coord: Coord, client: Annotated[Client, Depends(require_client)]) -> RoundInfo:
        return coord.current_round(client, run_id)

    @app.get("/v1/runs/{run_id}/rounds/{number}", tags=["rounds"], responses=_ERRORS)
    def round_summary(run_id: RunId, number: RoundNo, coord: Coord,
                      viewer: Viewer) -> RoundSummary:
        return coord.round_summary(run_id, number, viewer)

    @app.post("/v1/clients", tags=["clients"], status_code=201, responses=_ERRORS)
    def register_client(reg: ClientRegistration, coord: Coord, token: Token) -> ClientCredentials:
        return coord.register_client(token, reg)

    @app.delete("/v1/clients/{client_id}", tags=["clients"], status_code=204, responses=_ERRORS,
                dependencies=[Depends(require_admin)])
    def revoke_client(client_id: ClientId, coord: Coord) -> Response:
        coord.revoke_client(client_id)
        return Response(status_code=204)

    @app.get("/v1/artifacts/{sha256}", tags=["artifacts"], responses=_ERRORS,
             response_class=FileResponse)
    def download(sha256: str, request: Request, coord: Coord, token: Token) -> FileResponse:
        import re

        if not re.fullmatch(SHA256_PATTERN, sha256):
            raise ApiError(404, "not_found", "artifact names are lowercase hex sha256 digests")
        path, client = coord.artifact_for_download(token, sha256)
        if client is not None:
            coord.record_transfer(client, "down", _range_bytes(request.headers.get("range"), path))
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"ETag": f'"{sha256}"', "Cache-Control": "private, immutable"})

    @app.post("/v1/runs/{run_id}/builds", tags=["builds"], status_code=201,
              responses={**_ERRORS, 422: {"model": ErrorDetail}}, dependencies=[Depends(require_admin)])
    def publish_builds(run_id: RunId, request: BuildRequest, coord: Coord) -> list[BuildInfo]:
        """Export the run's current SLM to edge builds now (GGUF / ONNX), with parity checks."""
        from cloud.builds import publish_builds as publish

        return publish(coord, run_id, request.targets)

    @app.get("/v1/runs/{run_id}/builds", tags=["builds"], responses=_ERRORS)
    def list_builds(run_id: RunId, coord: Coord, viewer: Viewer,
                    arch: Annotated[str | None, Query(max_length=64)] = None,
                    ram_bytes: Annotated[int | None, Query(ge=0, le=2**50)] = None,
                    cores: Annotated[int, Query(ge=1, le=4096)] = 1,
                    backends: Annotated[str | None, Query(max_length=256, description="comma-separated")] = None,
                    ) -> BuildList:
        """The run's edge builds; with a device profile, also the one that fits it best."""
        from cloud.builds import list_builds as listing

        profile = None
        if arch is not None or ram_bytes is not None or backends is not None:
            profile = DeviceProfile(arch=arch or "unknown", ram_bytes=ram_bytes or 0, cores=cores,
                                    backends=[b for b in (backends or "").split(",") if b][:16])
        return listing(coord, run_id, viewer, profile)

    @app.post("/v1/generate", tags=["inference"], responses={**_ERRORS, 422: {"model": ErrorDetail}})
    def generate(request: GenerateRequest, coord: Coord,
                 client: Annotated[Client, Depends(require_client)]) -> GenerateResponse:
        """The run's LLM answers a prompt a device escalated (edge-to-cloud collaboration)."""
        return coord.generate(client, request)

    @app.put(
        "/v1/runs/{run_id}/rounds/{number}/updates/{client_id}",
        tags=["rounds"],
        responses={**_ERRORS, 200: {"model": UpdateReceipt, "description": "already accepted before"},
                   413: {"model": ErrorDetail}, 422: {"model": ErrorDetail}},
        status_code=201,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "safetensors file; metadata holds cotune.num_samples and cotune.metrics"}},
    )
    async def upload_update(run_id: RunId, number: RoundNo, client_id: ClientId, request: Request,
                            response: Response, coord: Coord, token: Token) -> UpdateReceipt:
        client = await run_in_threadpool(coord.authenticate_client, token)
        await run_in_threadpool(coord.check_can_upload, client, run_id, number, client_id)
        limit = coord.settings.max_update_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        spool = await _spool(request, coord.spool_dir, limit)
        try:
            receipt = await run_in_threadpool(coord.accept_update, client, run_id, number, spool)
        finally:
            spool.unlink(missing_ok=True)
        if receipt.duplicate:
            response.status_code = 200
        return receipt

    return app


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"update body is over the {limit}-byte limit",
                    "check the LoRA settings (rank, target modules) of the run")


async def _spool(request: Request, spool_dir: Path, limit: int) -> Path:
    """Stream the body to a temporary file, stopping as soon as it passes the limit."""
    fd, name = tempfile.mkstemp(dir=spool_dir, suffix=".part")
    path = Path(name)
    written = 0
    try:
        with open(fd, "wb") as fh:
            async for chunk in request.stream():
                written += len(chunk)
                if written > limit:
                    raise _too_large(limit)
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _range_bytes(header: str | None, path: Path) -> int:
    """Bytes a (single) Range request will send; the whole file otherwise."""
    size = path.stat().st_size
    if not header or not header.startswith("bytes=") or "," in header:
        return size
    start_s, _, end_s = header[6:].partition("-")
    try:
        if not start_s:
            return min(size, int(end_s))
        start = int(start_s)
        end = int(end_s) if end_s else size - 1
        return max(0, min(end, size - 1) - start + 1)
    except ValueError:
        return size
