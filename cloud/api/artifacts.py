"""Blob downloads by digest (with Range), counted against the downloading client's round.

A blob in a local directory is sent from its file. A blob in a bucket (an s3:// artifact_dir)
is streamed from the bucket through the coordinator, with the client's Range passed on as a
ranged GET (cloud/api/ranged.py), rather than answered with a redirect to a presigned URL:
devices then need to reach only the coordinator (a MinIO or private bucket endpoint is often
not reachable from a device's network, and opening it up means a second address, a second TLS
setup and a second place credentials and policies must be right), the bytes each client takes
are still counted against its round, and the edge client is unchanged (it does not follow
redirects, and would have to drop its bearer token on the hop, since S3 refuses a presigned
request that also carries an Authorization header). The price is the coordinator's bandwidth,
which a redirect would move to the bucket.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from starlette.types import Message, Receive, Scope, Send

from cloud.api.bodies import GuardedRoute
from cloud.api.deps import ERRORS, Coord, Token
from cloud.api.ranged import streamed_blob
from cloud.errors import ApiError
from cloud.state.records import Direction
from cloud.store import StoreUnavailable
from common.protocol import SHA256_PATTERN, ErrorDetail

log = logging.getLogger("cotune.api")
router = APIRouter(tags=["artifacts"], route_class=GuardedRoute)

_RESPONSES = {**ERRORS, 503: {"model": ErrorDetail, "description": "the artifact store did not answer; retry"}}


@router.get("/v1/artifacts/{sha256}", responses=_RESPONSES, response_class=FileResponse)
def download(sha256: str, coord: Coord, token: Token, request: Request) -> Response:
    if not re.fullmatch(SHA256_PATTERN, sha256):
        raise ApiError(404, "not_found", "artifact names are lowercase hex sha256 digests")
    headers = {"ETag": f'"{sha256}"', "Cache-Control": "private, immutable"}
    record: Callable[[int], Any] | None = None
    with _store_errors():
        if coord.auth.is_admin(token):
            size = coord.artifacts.admin_size(sha256)
        else:
            client = coord.auth.client(token)
            size = coord.artifacts.client_size(client, sha256)
            record = partial(coord.updates.record_transfer, client, Direction.down)
        if coord.store.remote:
            return streamed_blob(coord.store, sha256, size, request.headers, headers, record)
    path = coord.store.path(sha256)
    if record is None:
        return FileResponse(path, media_type="application/octet-stream", headers=headers)
    return CountedFileResponse(path, record, media_type="application/octet-stream", headers=headers)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """A remote store that does not answer is a 503 the client retries; what failed is logged
    here, not told to the client."""
    try:
        yield
    except StoreUnavailable as exc:
        log.warning("artifact download failed: %s", exc)
        raise ApiError(503, "store_unavailable", "the artifact store did not answer", "retry later") from None


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
