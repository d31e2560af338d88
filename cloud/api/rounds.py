"""Rounds: what a device does now, round summaries, and update uploads (streamed to a spool
file under a size limit, then checked in full before anything is recorded)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud.api.deps import ERRORS, ClientId, Coord, CurrentClient, RoundNo, RunId, Token, Viewer
from cloud.errors import ApiError
from common.protocol import ErrorDetail, RoundInfo, RoundSummary, UpdateReceipt

router = APIRouter(prefix="/v1/runs/{run_id}/rounds", tags=["rounds"])


# Before /{number}: "current" would otherwise be read as a (bad) round number.
@router.get("/current", responses=ERRORS)
def current_round(run_id: RunId, coord: Coord, client: CurrentClient) -> RoundInfo:
    return coord.runs.current_round(client, run_id)


@router.get("/{number}", responses=ERRORS)
def round_summary(run_id: RunId, number: RoundNo, coord: Coord, viewer: Viewer) -> RoundSummary:
    return coord.runs.round_summary(run_id, number, viewer)


@router.put(
    "/{number}/updates/{client_id}",
    responses={**ERRORS, 200: {"model": UpdateReceipt, "description": "already accepted before"},
               413: {"model": ErrorDetail}, 422: {"model": ErrorDetail}},
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "safetensors file; metadata holds cotune.num_samples and cotune.metrics"}},
)
async def upload_update(run_id: RunId, number: RoundNo, client_id: ClientId, request: Request,
                        response: Response, coord: Coord, token: Token) -> UpdateReceipt:
    client = await run_in_threadpool(coord.auth.client, token)
    await run_in_threadpool(coord.updates.check_can_upload, client, run_id, number, client_id)
    limit = coord.settings.max_update_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    spool = await _spool(request, coord.spool_dir, limit)
    try:
        receipt = await run_in_threadpool(coord.updates.accept_update, client, run_id, number, spool)
    finally:
        spool.unlink(missing_ok=True)
    if receipt.duplicate:
        response.status_code = 200
    return receipt


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
