"""A blob of a remote artifact store streamed to the caller, with a single byte range honoured.

Answers as Starlette's FileResponse does for a local blob, so a client cannot tell the backends
apart: 200 with the whole blob, 206 with `Content-Range` for one range (`bytes=a-b`, `bytes=a-`,
`bytes=-n`), 416 with `Content-Range: bytes */size` for a range that starts past the end, 400 for
a malformed one. A header asking for several ranges gets the whole blob (RFC 9110 lets a server
ignore Range; resuming clients ask for one), as does an `If-Range` that names another version.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.responses import Response, StreamingResponse

from cloud.errors import ApiError
from cloud.store import ArtifactStore

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, stop) of one byte range of a `size`-byte blob; None to send the whole blob.
    ApiError 400 for a malformed header; None with start past the end is the caller's 416."""
    value = header.strip()
    if "," in value:
        return None
    match = _RANGE.fullmatch(value.replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        raise ApiError(400, "bad_request", "malformed Range header",
                       "send one range: 'Range: bytes=START-', 'bytes=START-END' or 'bytes=-LENGTH'")
    first, last = match.groups()
    if first == "":  # the last `last` bytes
        return max(size - int(last), 0), size
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        raise ApiError(400, "bad_request", "malformed Range header: the range ends before it starts",
                       "send 'Range: bytes=START-END' with START <= END")
    return start, stop


def streamed_blob(store: ArtifactStore, digest: str, size: int, request_headers: Mapping[str, str],
                  headers: dict[str, str], record: Callable[[int], Any] | None) -> Response:
    """The download answer for a blob `store` streams; `record` (if any) is told the body's
    length before it goes out, as CountedFileResponse does for a local blob."""
    headers = {**headers, "Accept-Ranges": "bytes"}
    wanted = request_headers.get("range")
    if_range = request_headers.get("if-range")
    span = None
    if wanted is not None and (if_range is None or if_range == headers.get("ETag")):
        span = parse_range(wanted, size)
    if span is not None and not span[0] < size:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, stop = span if span is not None else (0, size)
    body = store.read_range(digest, start, stop)  # opened before the status is sent
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    headers["Content-Length"] = str(stop - start)
    if record is not None:
        record(stop - start)  # counted before the body goes out, as for a local blob
    return StreamingResponse(body, status_code=206 if span is not None else 200,
                             media_type="application/octet-stream", headers=headers)
