"""``serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over an ``AsyncEngine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as server-sent events when
``stream`` is true, ending with ``[DONE]``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus). Bad input gets an OpenAI-style error body with a one-line message: 400 for malformed JSON,
a field of the wrong type or out of range, or a prompt over the context window; 429 when the queue is full.
A client that disconnects aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import UserError, one_line
from ..runtime.serving import QueueFull, RequestOutput
from ..runtime.serving.async_engine import AsyncEngine, RequestStream
from ..runtime.serving.chat import ChatTemplate
from ..runtime.speculation import RequestError
from .openai_protocol import COMPLETION_MAX_TOKENS, ChatRequest, CompletionRequest, error_body

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(one_line(message), kind, status), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"{where or 'body'}: {first.get('msg', 'invalid value')}"


def create_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model id ``model_name``."""
    app = FastAPI(title="mlc-magicdec", docs_url=None, redoc_url=None)
    cfg = engine.engine.config
    source = engine.engine.artifact.config.chat_template
    template = ChatTemplate(source, engine.engine.tokenizer, cfg) if source else None

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "mlc-magicdec"}
        return {"object": "list", "data": [{**card, "max_model_len": cfg.context_window}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        config = body.generation(body.max_tokens or COMPLETION_MAX_TOKENS)
        return await _respond(engine, request, body, body.prompt, config, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if template is None:
            return _error(400, "this model has no chat template; use /v1/completions")
        try:
            text = template.render([m.model_dump(exclude_none=True) for m in body.messages])
        except RequestError as e:
            return _error(400, str(e))
        ids = engine.engine.tokenizer.encode(text, add_special_tokens=False).ids
        limit = body.max_completion_tokens or body.max_tokens or max(cfg.context_window - len(ids), 1)
        return await _respond(engine, request, body, ids, body.generation(limit), model_name, chat=True)

    return app


async def _respond(engine, request, body, prompt, config, model_name: str, chat: bool) -> Response:
    try:
        stream = engine.submit(prompt, config)
    except QueueFull as e:
        return _error(429, str(e), "rate_limit_error")
    except UserError as e:
        return _error(400, str(e))
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model_name,
    }
    if body.stream:
        events = _sse(stream, meta, chat, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    return await _whole(stream, request, meta, chat)


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    return {
        "index": 0,
        key: {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    }


def _usage(out: RequestOutput) -> dict | None:
    u = out.usage
    return (
        None
        if u is None
        else {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }
    )


def _failed(out: RequestOutput) -> bool:
    return out.finish_reason == "error"


async def _sse(stream: RequestStream, meta: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per output, the usage chunk if asked, then ``[DONE]``. If the client goes
    away, the generator is closed and the request aborted."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    try:
        async for out in stream:
            if _failed(out):
                yield f"data: {json.dumps(error_body(out.error or 'internal error', 'server_error'))}\n\n"
                break
            if out.text or out.finished:
                finish = out.finish_reason if out.finish_reason != "abort" else "stop"
                chunk = {**meta, "object": kind, "choices": [_choice(chat, out.text, finish, delta=True)]}
                if out.finished:
                    chunk["timing"] = out.timing  # an extension: queueing, prefill and decode seconds
                yield f"data: {json.dumps(chunk)}\n\n"
            if out.finished and include_usage:
                yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': _usage(out)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()


async def _whole(stream: RequestStream, request: Request, meta: dict, chat: bool) -> Response:
    """Wait for the whole response, aborting the request if the client disconnects first."""
    text, last = [], None
    iterator = aiter(stream)
    try:
        while last is None or not last.finished:
            try:
                last = await asyncio.wait_for(anext(iterator), DISCONNECT_POLL_S)
                text.append(last.text)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
    finally:
        stream.abort()
    if _failed(last):
        return _error(500, last.error or "internal error", "server_error")
    kind = "chat.completion" if chat else "text_completion"
    choice = _choice(chat, "".join(text), last.finish_reason, delta=False)
    return JSONResponse(
        {**meta, "object": kind, "choices": [choice], "usage": _usage(last), "timing": last.timing}
    )


class BackgroundServer:
    """uvicorn serving ``engine`` in a thread on ``host`` (a free port unless ``port`` is given), for the
    load benchmark and tests; ``close`` stops the server and the engine."""

    def __init__(self, engine: AsyncEngine, model_name: str, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.engine = engine
        config = uvicorn.Config(create_app(engine, model_name), host=host, port=port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="mlc-magicdec-http", daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.02)
        if not self.server.started:
            raise UserError(f"cannot serve on {host}:{port}; is the port in use?")
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.engine.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(
    artifact: Path,
    config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: int | None = None,
    draft_model: Path | None = None,
) -> None:
    """Load ``artifact`` and serve it until interrupted."""
    import uvicorn

    from .console import status

    with status.status("loading artifact and calibrating"):
        engine = AsyncEngine(artifact, config, threads=threads, draft_model=draft_model)
    app = create_app(engine, Path(artifact).name)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.close()
