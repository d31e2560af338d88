"""The OpenAI-compatible app served by `cotune edge serve` (ARCHITECTURE.md, "Edge runtime and export").

Routes under /v1: models, completions, chat/completions; streaming answers are server-sent
events (`data: {...}` chunks, then `data: [DONE]`). One model context serves one request at a
time: requests take an asyncio lock and run the engine in a worker thread, so concurrent
clients queue (up to `max_queue` waiting; more get 429). Bodies are read up to `max_body_bytes`
before any parsing. Every error has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
and never repeats the request's content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from edge_sdk.runtime import ContextOverflowError, EdgeRuntimeError
from edge_sdk.serve import openai_models as om
from edge_sdk.serve.chat import ChatFormatter, ChatTemplateError
from edge_sdk.serve.engine import Answer, Params, ServeEngine, UnknownModelError

log = logging.getLogger("cotune.edge.serve")

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_QUEUE = 32
_END = object()
Req = TypeVar("Req", bound=BaseModel)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = om.ErrorResponse(error=om.ErrorBody(message=self.message, type=self.type, param=self.param,
                                                   code=self.code))
        return JSONResponse(om.dump(body), status_code=self.status)


def _validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first bad field and what is wrong, without the value sent."""
    err = exc.errors(include_input=False, include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, "The request body is not valid JSON; send a JSON object.", code="invalid_json")
    if err["type"] == "extra_forbidden":
        # The unknown key is client input: say what is accepted rather than repeat it.
        return ApiError(400, "The request has an unrecognized argument; see the OpenAI API reference for "
                             "this route's fields.", code="unrecognized_argument")
    param = ".".join(str(p) for p in err["loc"])[:120] or None
    return ApiError(400, f"Invalid value for '{param}': {err['msg']}.", code="invalid_value", param=param)


async def _read_json(request: Request, model: type[Req], limit: int) -> Req:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"The request body is larger than {limit} bytes; send a shorter prompt.",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"The request body is larger than {limit} bytes; send a shorter prompt.",
                           code="request_too_large")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _usage(answer: Answer) -> om.Usage:
    return om.Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                    total_tokens=answer.prompt_tokens + answer.completion_tokens)


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = om.dump(payload) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(engine: ServeEngine, chat: ChatFormatter | None = None, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The app over one loaded model; the caller owns the model's lifetime."""
    app = FastAPI(title="cotune edge serve", docs_url=None, redoc_url=None, openapi_url=None)
    formatter = chat or ChatFormatter.for_model(engine.model)
    lock = asyncio.Lock()
    waiting = [0]
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        message = "No such route; this server answers under /v1." if exc.status_code == 404 else str(exc.detail)
        return ApiError(exc.status_code, message, code=str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, "The model failed while answering; see the server log.", "server_error",
                        "internal_error").response()

    def _adapter(model: str) -> str | None:
        try:
            return engine.resolve(model)
        except UnknownModelError:
            raise ApiError(404, "The model does not exist on this device; GET /v1/models lists the ids served.",
                           code="model_not_found", param="model") from None

    def _params(req: om._Sampling, max_tokens: int | None) -> Params:
        return Params(max_tokens=max_tokens or engine.model.context_length, temperature=req.temperature,
                      top_p=req.top_p, stop=tuple(req.stops()), seed=req.seed)

    async def _check_prompt(prompt: str) -> None:
        # Checked before queueing: a streamed answer cannot turn into a 400 once it has started.
        n = len(await run_in_threadpool(engine.model.tokenize, prompt))
        if n == 0:
            raise ApiError(400, "The prompt is empty after tokenization; send some text.", code="empty_prompt")
        if n >= engine.model.context_length:
            raise ApiError(400, f"The prompt is {n} tokens but this model's context holds "
                                f"{engine.model.context_length}; shorten it.", code="context_length_exceeded")

    async def _locked(fn: Callable[..., Any], *args: Any) -> Any:
        if waiting[0] >= max_queue:
            raise ApiError(429, f"{max_queue} requests are already waiting for the model; retry shortly.",
                           "rate_limit_error", "queue_full")
        waiting[0] += 1
        queued = True
        try:
            async with lock:
                waiting[0] -= 1
                queued = False
                return await run_in_threadpool(fn, *args)
        finally:
            if queued:  # the client left while still in the queue
                waiting[0] -= 1

    async def _answer(prompt: str, params: Params, adapter: str | None) -> Answer:
        try:
            return await _locked(engine.generate, prompt, params, adapter)
        except ContextOverflowError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        except (ValueError, EdgeRuntimeError) as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None

    # make_chunk(text, finish_reason, first, source): one SSE chunk of the route's type.
    Chunker = Callable[[str | None, str | None, bool, str], BaseModel | None]

    def _stream(make_chunk: Chunker, prompt: str, params: Params, adapter: str | None, include_usage: bool,
                make_usage: Callable[[Answer], BaseModel]) -> StreamingResponse:
        if waiting[0] >= max_queue:
            raise ApiError(429, f"{max_queue} requests are already waiting for the model; retry shortly.",
                           "rate_limit_error", "queue_full")

        async def events() -> AsyncIterator[str]:
            # Counted from inside the body: a response whose body never starts holds no place.
            waiting[0] += 1
            queued = True
            try:
                async with lock:
                    waiting[0] -= 1
                    queued = False
                    try:
                        pieces, done = await run_in_threadpool(engine.stream, prompt, params, adapter)
                        # With escalation the answer is decided before the first piece, so its source is known.
                        source = done[0].source if done else "local"
                        opening = make_chunk(None, None, True, source)
                        if opening is not None:
                            yield _sse(opening)
                        while (piece := await run_in_threadpool(next, pieces, _END)) is not _END:
                            yield _sse(make_chunk(piece, None, False, source))  # type: ignore[arg-type]
                        answer = done[0]
                        yield _sse(make_chunk(None, answer.finish_reason, False, source))  # type: ignore[arg-type]
                        if include_usage:
                            yield _sse(make_usage(answer))
                    except Exception:  # the stream has started: report in-band, as OpenAI does
                        log.exception("streamed generation failed")
                        yield _sse({"error": {"message": "The model failed while answering; see the server log.",
                                              "type": "server_error", "code": "internal_error"}})
            finally:
                if queued:  # the client left while still in the queue
                    waiting[0] -= 1
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [om.ModelCard(id=mid, created=created) for mid in engine.model_ids()]
        return om.dump(om.ModelList(data=cards))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _adapter(model_id)
        return om.dump(om.ModelCard(id=model_id, created=created))

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "backend": engine.model.backend_name,
                "chat_template": formatter.source, "escalation": engine.escalation is not None}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await _read_json(request, om.CompletionRequest, max_body_bytes)
        adapter = _adapter(req.model)
        prompt, params = req.prompt_text(), _params(req, req.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def base(source: str = "local") -> dict[str, Any]:
            return {"id": rid, "created": now, "model": req.model, "system_fingerprint": f"cotune-{source}",
                    "cotune_source": source}

        await _check_prompt(prompt)
        if req.stream:
            def chunk(text: str | None, finish: str | None, first: bool, source: str) -> BaseModel | None:
                if first:
                    return None  # completions have no role chunk; the first one carries text
                return om.Completion(**base(source), choices=[om.CompletionChoice(text=text or "",
                                                                                  finish_reason=finish)])

            def usage(answer: Answer) -> BaseModel:
                return om.Completion(**base(answer.source), choices=[], usage=_usage(answer))

            include = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(chunk, prompt, params, adapter, include, usage)
        answer = await _answer(prompt, params, adapter)
        return om.dump(om.Completion(**base(answer.source), usage=_usage(answer), choices=[
            om.CompletionChoice(text=answer.text, finish_reason=answer.finish_reason)]))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await _read_json(request, om.ChatCompletionRequest, max_body_bytes)
        adapter = _adapter(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = formatter.render(messages)
        except ChatTemplateError as exc:
            raise ApiError(400, f"The messages do not fit this model's chat template: {exc}",
                           code="invalid_messages", param="messages") from None
        params = _params(req, req.token_limit())
        # The template's own stop text ends chat answers as it ends them in evaluation.
        extra = tuple(s for s in formatter.stop if s not in params.stop)
        params = replace(params, stop=params.stop + extra)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def base(source: str = "local") -> dict[str, Any]:
            return {"id": rid, "created": now, "model": req.model, "system_fingerprint": f"cotune-{source}",
                    "cotune_source": source}

        await _check_prompt(prompt)
        if req.stream:
            def chunk(text: str | None, finish: str | None, first: bool, source: str) -> BaseModel:
                delta = om.Delta(role="assistant", content="") if first else om.Delta(content=text)
                return om.ChatCompletionChunk(**base(source), choices=[om.ChatChunkChoice(delta=delta,
                                                                                          finish_reason=finish)])

            def usage(answer: Answer) -> BaseModel:
                return om.ChatCompletionChunk(**base(answer.source), choices=[], usage=_usage(answer))

            include = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(chunk, prompt, params, adapter, include, usage)
        answer = await _answer(prompt, params, adapter)
        return om.dump(om.ChatCompletion(**base(answer.source), usage=_usage(answer), choices=[
            om.ChatChoice(message=om.AssistantMessage(content=answer.text), finish_reason=answer.finish_reason)]))

    return app
