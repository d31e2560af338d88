"""One error type for the API: an HTTP status plus what went wrong and what to do.

A 4xx never echoes what the caller sent (ARCHITECTURE.md, "Privacy"): a request that does not
fit the schema is answered with where and why (locations and messages, a bounded number of
them), never with the input values, which could be anything up to the body limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from common.protocol import ErrorDetail

# At most this many schema problems are listed; the message counts the rest.
MAX_LISTED_ERRORS = 10
# A location part that is not a plain name may be a key the caller made up (input, then).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAX_MSG = 200


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, hint=hint)
        # e.g. Retry-After on a 429
        self.headers = headers


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str


class InvalidRequestDetail(ErrorDetail):
    """422: the request does not fit the API schema; `errors` says where and why."""

    errors: list[FieldProblem] | None = None


def unauthorized(message: str = "missing or invalid bearer token") -> ApiError:
    return ApiError(401, "unauthorized", message, "send 'Authorization: Bearer <token>'")


def forbidden(message: str, hint: str | None = None) -> ApiError:
    return ApiError(403, "forbidden", message, hint)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")


def too_large(what: str, limit: int, hint: str | None = None) -> ApiError:
    return ApiError(413, "too_large", f"{what} is over the {limit}-byte limit", hint)


def invalid_request(errors: Sequence[Mapping[str, Any]]) -> InvalidRequestDetail:
    """The 422 answer for schema errors (pydantic's or FastAPI's), without their `input`."""
    listed = [field_problem(e) for e in errors[:MAX_LISTED_ERRORS]]
    where = "; ".join(f"{'.'.join(map(str, p.loc)) or '(body)'}: {p.msg}" for p in listed)
    more = f" (and {len(errors) - len(listed)} more)" if len(errors) > len(listed) else ""
    return InvalidRequestDetail(code="invalid_request",
                                message=f"the request does not fit the API schema: {where}{more}",
                                hint="see /openapi.json for what this endpoint takes", errors=listed)


def field_problem(error: Mapping[str, Any]) -> FieldProblem:
    """One pydantic error as where and why, without its input."""
    loc = [p if isinstance(p, int) else str(p) for p in error.get("loc", ())]
    if error.get("type") == "extra_forbidden" and loc:
        loc[-1] = "(unknown field)"  # the name of a field the schema lacks is the caller's input
    loc = [p if isinstance(p, int) or _NAME.fullmatch(p) else "(key)" for p in loc]
    msg = str(error.get("msg", "invalid"))
    return FieldProblem(loc=loc, msg=msg if len(msg) <= _MAX_MSG else msg[:_MAX_MSG] + "...")
