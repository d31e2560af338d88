"""Blob downloads by digest (with Range), counted against the downloading client's round."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from cloud.api.deps import ERRORS, Coord, Token
from cloud.errors import ApiError
from cloud.state.records import Direction
from common.protocol import SHA256_PATTERN

router = APIRouter(tags=["artifacts"])


@router.get("/v1/artifacts/{sha256}", responses=ERRORS, response_class=FileResponse)
def download(sha256: str, request: Request, coord: Coord, token: Token) -> FileResponse:
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise ApiError(404, "not_found", "artifact names are lowercase hex sha256 digests")
    if coord.auth.is_admin(token):
        path = coord.artifacts.for_admin(sha256)
    else:
        client = coord.auth.client(token)
        path = coord.artifacts.for_client(client, sha256)
        sent = range_bytes(request.headers.get("range"), path.stat().st_size)
        coord.updates.record_transfer(client, Direction.down, sent)
    return FileResponse(path, media_type="application/octet-stream",
                        headers={"ETag": f'"{sha256}"', "Cache-Control": "private, immutable"})


def range_bytes(header: str | None, size: int) -> int:
    """Bytes a (single) Range request will send; the whole file otherwise."""
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
