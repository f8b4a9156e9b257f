"""build_app(settings) -> FastAPI: the model is loaded in the lifespan, errors are rendered in one place.

Every error leaves as the OpenAI error body `{"error": {"message", "type", "param", "code"}}`:
validation problems are 400 naming the field (an unknown field is named as unsupported), a missing or
wrong API key 401, an unknown route or model 404, an oversized body 413, a full queue 429 with
Retry-After, a server that is not ready 503. Nothing a client sends produces a 500.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..guard import Guard
from ..metrics import Metrics
from .engine import Engine
from .errors import APIError
from .memory import TrimAfterLarge
from .endpoint import Serving
from .proxy import ProxiedChat, ProxiedCompletion, Proxy
from .requests import GuardDefaults
from .routes import router
from .serving import HostedChat, HostedCompletion

MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, whether or not it says its length.
    A Content-Length over the limit is refused before anything is read; a chunked body is counted as it
    arrives and refused once it passes the limit (the route's body parsing re-raises the HTTP error)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes"

    async def _refuse(self, scope, receive, send):
        await _error(413, self._message(), "invalid_request_error")(scope, receive, send)


class ApiKey:
    """ASGI middleware: /v1/ needs `Authorization: Bearer <key>` (401 otherwise; the scheme's case does
    not matter, RFC 9110 section 11.1). A plain ASGI layer,
    not an `@app.middleware("http")` one: those hide the client's disconnect from the route, which then
    could not stop generating for a client that left."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(token.encode(), self.key):
                response = _error(401, "Incorrect or missing API key", "invalid_request_error", code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


@dataclass
class ServerSettings:
    model: str | None = None  # local directory or hub id; None: the built-in organism
    probe: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    dtype: str | None = None
    device_map: str | None = None
    max_batch_size: int = 32
    max_queue: int = 256
    upstream: str | None = None  # proxy mode: an OpenAI-compatible server to forward to
    upstream_timeout: float = 60.0
    upstream_api_key: str | None = None
    metrics: bool = True
    defaults: GuardDefaults = field(default_factory=GuardDefaults)
    engine: str = "hf"  # "hf": transformers generate in this process; "vllm": vLLM with the probe in its forward
    enforce_eager: bool = False  # vLLM: no torch.compile, no CUDA graphs
    max_model_len: int | None = None  # vLLM: the context it reserves KV cache for (default: the model's)


def model_path(settings: ServerSettings) -> str:
    """The weights to load: --model, or the built-in organism's directory."""
    if settings.model is None:
        from ..organism import path

        return str(path("instruct"))
    return settings.model


def make_engine(guard: Guard, settings: ServerSettings, metrics: Metrics | None):
    """The engine the settings ask for, started; None in proxy mode (the upstream generates)."""
    if settings.upstream:
        return None
    if settings.engine == "vllm":
        from ..vllm.engine import VllmEngine

        dtype = settings.dtype or "auto"  # vLLM's default: as saved (the organism: bfloat16)
        args = {"max_model_len": settings.max_model_len} if settings.max_model_len else {}
        engine = VllmEngine(guard, model_path(settings), max_batch_size=settings.max_batch_size,
                            max_queue=settings.max_queue, metrics=metrics, dtype=dtype,
                            enforce_eager=settings.enforce_eager, engine_args=args)
    else:
        engine = Engine(guard, settings.max_batch_size, settings.max_queue, metrics)
    engine.start()
    return engine


def make_servings(guard: Guard, engine, name: str, settings: ServerSettings,
                  metrics: Metrics | None) -> tuple[Serving, Serving, Proxy | None]:
    """The chat and the completions endpoints' servings in the settings' mode, and in proxy mode the
    `Proxy` they share (its open streams are bounded by the engine's batch and queue)."""
    if not settings.upstream:
        return (HostedChat(guard, engine, name, settings.defaults, metrics),
                HostedCompletion(guard, engine, name, settings.defaults, metrics), None)
    proxy = Proxy(guard, settings.upstream, settings.upstream_timeout, settings.upstream_api_key,
                  max_streams=settings.max_batch_size + settings.max_queue)
    return (ProxiedChat(proxy, name, settings.defaults, metrics),
            ProxiedCompletion(proxy, name, settings.defaults, metrics), proxy)


def load_guard(settings: ServerSettings) -> Guard:
    """The model as the server sees it: loaded (the HF engine), or a weightless front of it (vLLM holds the
    weights)."""
    import torch

    if settings.engine == "vllm":
        from ..vllm.engine import front

        return front(model_path(settings), settings.probe)

    kwargs = {}
    if settings.dtype:
        kwargs["dtype"] = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
    if settings.device_map:
        kwargs["device_map"] = settings.device_map
    if settings.model is None:
        from ..organism import path

        return Guard.from_pretrained(path("instruct"), probe=settings.probe, dtype=torch.float32)
    return Guard.from_pretrained(settings.model, probe=settings.probe, **kwargs)


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, param, code).body(), status_code=status, headers=headers)


def _validation_message(error: dict) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if error.get("type") == "extra_forbidden":
        return f"Unrecognized or unsupported request argument: {param}", param
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    return f"{param or 'body'}: {error.get('msg', 'invalid value')}", param


def _without_422(openapi):
    """FastAPI's OpenAPI document, less the 422 it adds to every route with a body: this server answers
    invalid requests with 400 (declared on each route), as the OpenAI API does."""

    def document() -> dict:
        schema = openapi()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    return document


def build_app(settings: ServerSettings | None = None, guard: Guard | None = None) -> FastAPI:
    """The OpenAI-compatible app. Pass `guard` to serve an already loaded model (tests, notebooks)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="hguard", version="0.1.0", lifespan=_lifespan(settings, guard))
    app.state.serving_chat = app.state.serving_completion = None  # each endpoint's serving, once loaded
    app.state.engine = app.state.proxy = None
    app.include_router(router)
    app.add_middleware(TrimAfterLarge)  # glibc keeps what a large request freed: give it back
    app.add_middleware(BodyLimit)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    _add_error_handlers(app)
    app.openapi = _without_422(app.openapi)
    return app


def _lifespan(settings: ServerSettings, guard: Guard | None):
    """Load the model (unless given), start the engine and the proxy; stop them on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = guard or load_guard(settings)
        name = settings.served_model_name or settings.model or "hguard-organism"
        metrics = Metrics(name) if settings.metrics else None
        if metrics is not None:
            loaded.step_timer = metrics.labels(metrics.probe_step).observe
        engine = app.state.engine = make_engine(loaded, settings, metrics)
        app.state.serving_chat, app.state.serving_completion, app.state.proxy = make_servings(
            loaded, engine, name, settings, metrics)
        try:
            yield
        finally:
            app.state.serving_chat = app.state.serving_completion = app.state.engine = None
            loaded.step_timer = None
            if app.state.proxy is not None:
                await app.state.proxy.close()
                app.state.proxy = None
            if engine is not None:
                engine.stop()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error body; a refused completion request counted in the metrics once."""

    def servings(request: Request) -> list[Serving]:
        state = request.app.state
        return [s for s in (state.serving_chat, state.serving_completion) if s is not None]

    def refused(request: Request, status: int) -> None:
        for serving in servings(request):
            if serving.endpoint.path == request.url.path:
                serving.record(status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        refused(request, error.status)
        if error.type in ("upstream_error", "upstream_timeout") and servings(request):
            metrics = servings(request)[0].metrics
            if metrics is not None:
                metrics.labels(metrics.upstream_errors, kind=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        refused(request, 400)
        message, param = _validation_message(error.errors()[0] if error.errors() else {})
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error(error.status_code, str(error.detail), kind, headers=error.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # a bug of ours, never the client's input
        logging.getLogger("hguard.server").error("unexpected error on %s", request.url.path, exc_info=error)
        return _error(500, f"internal error: {type(error).__name__}", "server_error")
