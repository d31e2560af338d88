"""The operator's dashboard at `/ui`: static files (HTML, JavaScript, CSS) shipped in the wheel
under `cloud/ui/`. The page calls the same `/v1` routes as every other client, with the token
the operator signs in with; this router serves files only and needs no token."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from cloud.errors import not_found

router = APIRouter(tags=["ui"], include_in_schema=False)

_ROOT = Path(__file__).resolve().parent.parent / "ui"
# A fixed list: a name from the URL never becomes a path on disk.
_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# Everything the page loads comes from this origin: no CDN, no inline script, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/ui")
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
def ui_index() -> Response:
    return _file("index.html")


@router.get("/ui/{name}")
def ui_file(name: str) -> Response:
    if name not in _FILES:
        raise not_found("that dashboard file")
    return _file(name)


def _file(name: str) -> Response:
    return FileResponse(_ROOT / name, media_type=_FILES[name], headers=_HEADERS)
