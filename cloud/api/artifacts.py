"""Blob downloads by digest (with Range), counted against the downloading client's round."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.types import Message, Receive, Scope, Send

from cloud.api.bodies import GuardedRoute
from cloud.api.deps import ERRORS, Coord, Token
from cloud.errors import ApiError
from cloud.state.records import Direction
from common.protocol import SHA256_PATTERN

router = APIRouter(tags=["artifacts"], route_class=GuardedRoute)


@router.get("/v1/artifacts/{sha256}", responses=ERRORS, response_class=FileResponse)
def download(sha256: str, coord: Coord, token: Token) -> FileResponse:
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise ApiError(404, "not_found", "artifact names are lowercase hex sha256 digests")
    headers = {"ETag": f'"{sha256}"', "Cache-Control": "private, immutable"}
    if coord.auth.is_admin(token):
        path = coord.artifacts.for_admin(sha256)
        return FileResponse(path, media_type="application/octet-stream", headers=headers)
    client = coord.auth.client(token)
    path = coord.artifacts.for_client(client, sha256)
    return CountedFileResponse(path, partial(coord.updates.record_transfer, client, Direction.down),
                               media_type="application/octet-stream", headers=headers)


class CountedFileResponse(FileResponse):
    """A FileResponse that counts the body bytes it is about to send, once its status and
    length are decided. Starlette parses the Range header (200: the whole file, 206: the
    ranges, 400 or 416: nothing sent), so the count is read off its answer rather than parsed
    a second time: a hostile Range header can make it neither negative nor larger than the file,
    and an unsatisfiable one records nothing."""

    def __init__(self, path: Path, record: Callable[[int], Any], **kwargs: Any) -> None:
        stat_result = path.stat()
        super().__init__(path, stat_result=stat_result, **kwargs)
        self._record = record
        self._size = stat_result.st_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (200, 206):
                # Counted before the body goes out, so a listing read after the download sees it.
                await run_in_threadpool(self._record, _body_length(message, self._size))
            await send(message)

        await super().__call__(scope, receive, counting_send)


def _body_length(start: Message, size: int) -> int:
    """The answer's Content-Length, within [0, size] (a multipart 206 adds its part headers)."""
    for name, value in start.get("headers", []):
        if name.lower() == b"content-length" and value.isdigit():
            return min(int(value), size)
    return size
