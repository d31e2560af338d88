"""The coordinator's HTTP app: assembles the per-resource routers (cloud/api/) around one
`Coordinator` and runs its round driver for the app's lifetime."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cloud import telemetry
from cloud.api import artifacts, builds, clients, inference, ops, rounds, runs, secagg, ui
from cloud.coordinator import Coordinator
from cloud.errors import ApiError, invalid_request
from cloud.settings import CoordinatorSettings
from common import __version__
from common.protocol import ErrorDetail

log = logging.getLogger("cotune.api")

# Codes for the errors Starlette and FastAPI raise themselves (no route, wrong method, a body
# that is not JSON), so that every error answer has the API's shape.
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
               415: "unsupported_media_type"}


def create_app(settings: CoordinatorSettings, start_driver: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        coordinator = Coordinator(settings)
        telemetry.live(app.state.telemetry, coordinator.state)
        app.state.coordinator = coordinator
        if settings.run is not None:
            created = await run_in_threadpool(coordinator.runs.create, settings.run)
            log.info("run %s ready (%s)", created.name, "created" if created.created else "resumed")
        driver = coordinator.driver()
        app.state.driver = driver
        if start_driver:
            driver.start()
        try:
            yield
        finally:
            driver.stop()
            telemetry.retire(app.state.telemetry)
            coordinator.close()

    app = FastAPI(
        title="cotune coordinator",
        version=__version__,
        description="Federated co-tuning of a cloud LLM and on-device SLMs. "
        "Errors carry `detail: {code, message, hint}`.",
        lifespan=lifespan,
    )
    # One registry per app, so several apps in one process keep their figures apart.
    app.state.telemetry = telemetry.Telemetry()
    app.add_middleware(telemetry.MetricsMiddleware, telemetry=app.state.telemetry)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail.model_dump()},
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer lists each error's `input`: the request echoed back.
        return JSONResponse(status_code=422, content={"detail": invalid_request(exc.errors()).model_dump()})

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = ErrorDetail(code=code, message=str(exc.detail)[:200])
        return JSONResponse(status_code=exc.status_code, content={"detail": detail.model_dump()},
                            headers=exc.headers)

    for module in (ops, runs, rounds, secagg, clients, artifacts, builds, inference, ui):
        app.include_router(module.router)
    return app
