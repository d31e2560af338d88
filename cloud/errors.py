"""One error type for the API: an HTTP status plus what went wrong and what to do."""

from __future__ import annotations

from common.protocol import ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, hint=hint)


def unauthorized(message: str = "missing or invalid bearer token") -> ApiError:
    return ApiError(401, "unauthorized", message, "send 'Authorization: Bearer <token>'")


def forbidden(message: str, hint: str | None = None) -> ApiError:
    return ApiError(403, "forbidden", message, hint)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist")
