"""Rounds: what a device does now, round summaries, and update uploads (streamed to a spool
file under a size limit, then checked in full before anything is recorded)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud.api.bodies import BodyRule, GuardedRoute, body_rule, client_gate
from cloud.api.deps import ERRORS, ClientId, Coord, CurrentClient, RoundNo, RunId, Token, Viewer
from cloud.errors import InvalidRequestDetail
from common.protocol import ErrorDetail, RoundInfo, RoundSummary, UpdateReceipt

router = APIRouter(prefix="/v1/runs/{run_id}/rounds", tags=["rounds"], route_class=GuardedRoute)

UPDATE_BODY = BodyRule(limit=lambda s: s.max_update_bytes, gate=client_gate, what="the update body",
                       hint="check the LoRA settings (rank, target modules) of the run", streamed=True)


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
               413: {"model": ErrorDetail}, 422: {"model": InvalidRequestDetail}},
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "safetensors file; metadata holds cotune.num_samples and cotune.metrics"}},
)
@body_rule(UPDATE_BODY)
async def upload_update(run_id: RunId, number: RoundNo, client_id: ClientId, request: Request,
                        response: Response, coord: Coord, token: Token) -> UpdateReceipt:
    client = await run_in_threadpool(coord.auth.client, token)
    await run_in_threadpool(coord.updates.check_can_upload, client, run_id, number, client_id)
    # A declared length over the limit was refused before this (GuardedRoute); a chunked body
    # is refused as soon as it passes the limit.
    spool = await _spool(request, coord.spool_dir, coord.settings.max_update_bytes)
    try:
        receipt = await run_in_threadpool(coord.updates.accept_update, client, run_id, number, spool)
    finally:
        spool.unlink(missing_ok=True)
    if receipt.duplicate:
        response.status_code = 200
    return receipt


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
                    raise UPDATE_BODY.too_large(limit)
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path
