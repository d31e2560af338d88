"""`cotune edge serve`: an OpenAI-compatible HTTP server over an EdgeModel (and the router).

Importing this package does not import FastAPI; `create_app` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_sdk.serve.chat import DEFAULT_CHAT_TEMPLATE, ChatFormatter
from edge_sdk.serve.engine import Escalation, ServeEngine

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(engine: ServeEngine, chat: ChatFormatter | None = None, **limits: Any) -> FastAPI:
    """See `edge_sdk.serve.app.create_app` (limits: max_body_bytes, max_queue)."""
    from edge_sdk.serve.app import create_app as _create

    return _create(engine, chat, **limits)


__all__ = ["DEFAULT_CHAT_TEMPLATE", "ChatFormatter", "Escalation", "ServeEngine", "create_app"]
