"""The HTTP side: Starlette routes speaking OpenAI's chat-completions API, served by uvicorn.

Every failure is an OpenAI-shaped JSON error with the right status; nothing a client
sends can raise a traceback or stop the server. A client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from qwen3_chat.serve.engine import Job, Result, ServeEngine
from qwen3_chat.serve.schema import ApiError, bad, chunk, completion, new_id, parse_request
from qwen3_chat.serve.schema import reasoning_fields as reasoning_delta

DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: a long conversation with tools fits easily
log = logging.getLogger("qwen3_chat.serve")
# What a client still listening hears when its job is cancelled under it (shutdown).
CANCELLED = ApiError(503, "the server is shutting down; the request was cancelled",
                     type="server_error", code="cancelled")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing (413) anything over `limit` bytes before reading it all.

    Only `Content-Type: application/json`: a web page can send text/plain or form bodies
    to 127.0.0.1 without a CORS preflight, and must not get to use the local model."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise bad("the request needs 'Content-Type: application/json'", code="bad_content_type")
    length = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is over the {limit}-byte limit",
                       code="request_too_large")  # fmt: skip
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (ValueError, RecursionError) as e:
        raise bad(f"the body is not valid JSON: {str(e)[:120]}") from None


class _CancellingResponse(Response):
    """Runs `respond` while watching for the client leaving; either way, `job` is cancelled
    at the end (a no-op when it already finished), so a dropped client frees the model."""

    def __init__(self, job: Job, respond: Callable[[Send], Any]):
        self.job, self.respond = job, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.job.cancel()
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                try:
                    await self.respond(send)
                except OSError:  # the socket broke mid-write: same as a disconnect
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.job.cancel()


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def _stream(job: Job, cid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    yield _sse(chunk(cid, model, {"role": "assistant", "content": ""}))
    while True:
        kind, value = await job.out.get()
        if kind == "reasoning":
            yield _sse(chunk(cid, model, reasoning_delta(value)))
        elif kind == "content":
            yield _sse(chunk(cid, model, {"content": value}))
        elif kind in ("error", "cancelled"):  # headers are sent: the error is an event
            yield _sse((value or CANCELLED).body())
            break
        elif kind == "done":
            result: Result = value
            if result.tool_calls:
                calls = [c.to_dict(i) for i, c in enumerate(result.tool_calls)]
                yield _sse(chunk(cid, model, {"tool_calls": calls}))
            yield _sse(chunk(cid, model, {}, result.finish_reason))
            if include_usage:
                yield _sse(chunk(cid, model, {}, use=result.usage))
            break
    yield _sse("[DONE]")


async def _collect(job: Job) -> Result:
    while True:
        kind, value = await job.out.get()
        if kind in ("error", "cancelled"):
            raise value or CANCELLED
        if kind == "done":
            return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def host_name(header: str) -> str:
    """The host of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def create_app(engine: ServeEngine, *, model_ids: Iterable[str], api_key: str | None = None,
               max_body: int = DEFAULT_MAX_BODY,
               local_only: bool = False) -> Starlette:  # fmt: skip
    """The ASGI app; `model_ids` are the names a request may use for the served model;
    `local_only` (a loopback bind) refuses requests addressed to any other host name."""
    ids = list(dict.fromkeys(model_ids))
    created = int(time.time())

    def check_key(request: Request) -> None:
        """The API key when one is set; on loopback, also the Host header: a page whose
        name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name there."""
        if local_only and not is_loopback(host_name(request.headers.get("host", ""))):
            raise ApiError(400, "this server answers only requests addressed to "
                           "127.0.0.1 or localhost", code="bad_host")  # fmt: skip
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):  # fmt: skip
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           code="invalid_api_key")  # fmt: skip

    def model_card(mid: str) -> dict[str, Any]:
        return {"id": mid, "object": "model", "created": created, "owned_by": "qwen3-chat"}

    async def chat(request: Request) -> Response:
        check_key(request)
        req = parse_request(await _read_json(request, max_body))
        if req.model not in ids:
            raise ApiError(404, f"model {req.model!r} is not served here (try {ids[0]!r})",
                           param="model", code="model_not_found")  # fmt: skip
        plan = await run_in_threadpool(engine.plan, req)
        job = engine.submit(plan, asyncio.get_running_loop())
        cid = new_id()
        if req.stream:
            body = StreamingResponse(_stream(job, cid, req.model, req.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
            return _CancellingResponse(job, lambda send: body.stream_response(send))

        async def respond(send: Send) -> None:
            try:
                result = await _collect(job)
                out: Response = JSONResponse(completion(cid, req.model, result.message(),
                                                        result.finish_reason, result.usage))
            except ApiError as e:
                out = error_response(e)
            await out({"type": "http"}, _no_receive, send)

        return _CancellingResponse(job, respond)

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card(m) for m in ids]})

    async def model(request: Request) -> Response:
        check_key(request)
        mid = request.path_params["model_id"]
        if mid not in ids:
            raise ApiError(404, f"model {mid!r} is not served here", code="model_not_found")
        return JSONResponse(model_card(mid))

    async def health(request: Request) -> Response:
        check_key(request)  # it lists recent requests: as private as the rest
        return JSONResponse(engine.health())

    async def on_api_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return error_response(e)

    async def on_http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, str(e.detail), type=kind))

    async def on_crash(request: Request, e: Exception) -> Response:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}",
                                       type="server_error"))  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.stop)  # cancel what runs; the worker ends

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                            Exception: on_crash},  # fmt: skip
        lifespan=lifespan,
    )


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back from getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(engine: ServeEngine, sock: socket.socket, *, model_ids: Iterable[str],
          api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> None:  # fmt: skip
    """Run until SIGINT/SIGTERM; open generations are cancelled and streams told so."""
    import uvicorn

    local = is_loopback(sock.getsockname()[0])
    app = create_app(engine, model_ids=model_ids, api_key=api_key, max_body=max_body,
                     local_only=local)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2,
                            server_header=False, access_log=False)  # fmt: skip

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            engine.cancel_all()  # open streams end now instead of at the graceful timeout
            await super().shutdown(sockets)

    server = Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; with these no-op
    # handlers in place that ends here, so a SIGTERM/Ctrl-C shutdown returns normally.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _ignore) for s in _STOP_SIGNALS} if main else {}
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum: int, frame: Any) -> None:
    pass
