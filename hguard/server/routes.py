"""HTTP routes: thin, they validate, hand the work to their endpoint's serving (endpoint.py: `Hosted*`
serve the model, `Proxied*` forward to an upstream; all have `complete` and `stream`), and shape the
HTTP reply.

Each route declares the statuses it can answer with (hguard's own /openapi.json lists them), every
error in the OpenAI error body. A non-streamed completion also carries its verdict in headers
(`verdict_headers`), for clients that show headers but drop fields the OpenAI schema lacks.
"""

from __future__ import annotations

import asyncio
import functools
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..metrics import CONTENT_TYPE_LATEST

from .endpoint import CHAT, COMPLETION, Serving
from .errors import CLIENT_CLOSED, APIError
from .protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from .requests import check_model

router = APIRouter()

_ERRORS = {
    400: "An invalid or unsupported request; `param` names the field",
    401: "A missing or wrong API key (a server started with --api-key)",
    404: "An unknown model, route or disabled endpoint",
    413: "A request body over 4 MiB",
    429: "The queue is full (or, proxying, too many streams are open); retry after Retry-After seconds",
    500: "A fault of the server's own, never the client's input",
    502: "Proxy mode: the upstream failed, is unreachable, or refused this server's key",
    503: "The model is not loaded yet (or, /health: the engine has stopped or the upstream is down)",
    504: "Proxy mode: the upstream timed out",
    "4XX": "Proxy mode: the upstream's own client errors (TGI's 422, say) keep their status and message",
}
_VERDICT_HEADERS = {
    "x-hguard-verdict": {"description": "Each choice's verdict (ok, flagged, abstained, dampened), comma-separated "
                                        "in choice order; non-streamed responses only",
                         "schema": {"type": "string"}},
    "x-hguard-probability": {"description": "Each choice's hallucination probability (or null), comma-separated "
                                            "in choice order; non-streamed responses only",
                             "schema": {"type": "string"}},
}


def _responses(*statuses: int | str, completion: bool = False) -> dict:
    """The OpenAPI `responses` of a route: the error statuses it can send, in the OpenAI error body."""
    responses: dict = {status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in statuses}
    if completion:
        responses[200] = {"description": "The completion (JSON), or with `stream: true` its Server-Sent Events; "
                                         "each choice carries `hallucination`",
                          "content": {"text/event-stream": {}}, "headers": _VERDICT_HEADERS}
    return responses


_COMPLETION = _responses(400, 401, 404, 413, 429, 500, 502, 503, 504, "4XX", completion=True)


def verdict_headers(body: dict) -> dict[str, str]:
    """`x-hguard-verdict` and `x-hguard-probability` of a completion body: each choice's value,
    comma-separated in choice order (one value for n = 1), as HTTP writes a list in one header."""
    reports = [choice.get("hallucination") or {} for choice in body.get("choices", [])]
    if not reports:
        return {}
    return {"x-hguard-verdict": ", ".join(str(r.get("verdict")) for r in reports),
            "x-hguard-probability": ", ".join(json.dumps(r.get("probability")) for r in reports)}


def _serving(request: Request, endpoint: str = "serving_chat") -> Serving:
    """The app's serving of an endpoint (`app.state.serving_chat`, `serving_completion`); the chat one also
    stands for the server (every serving has the model's name and the metrics)."""
    serving = getattr(request.app.state, endpoint, None)
    if serving is None:
        raise APIError(503, "the model is not loaded yet", "service_unavailable")
    return serving


def with_cancellation(handler):
    """A route that races its handler against the client's disconnect: a client that leaves first gets
    499 and its work is cancelled (generation or scoring stops; the mode records the 499). A streamed
    reply is handed over at once, so only the wait for a whole answer is raced; a stream notices the
    client leaving itself."""

    @functools.wraps(handler)
    async def route(*args, **kwargs):
        answer = await _unless_disconnected(kwargs["http"], handler(*args, **kwargs))
        return Response(status_code=CLIENT_CLOSED) if answer is None else answer

    return route


async def _unless_disconnected(http: Request, work, poll: float = 0.25):
    """`work`'s result, or None as soon as the client has disconnected (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await http.is_disconnected():
                return None
    finally:
        task.cancel()


async def _complete(serving: Serving, body):
    """Hosted or proxied alike: the endpoint's serving builds the answer or the stream and records its
    metrics; the route shapes the HTTP reply."""
    if body.stream:
        return StreamingResponse(await serving.stream(body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await serving.complete(body)
    return JSONResponse(answer, headers=verdict_headers(answer))


@router.post(CHAT.path, responses=_COMPLETION)
@with_cancellation
async def chat_completions(body: ChatCompletionRequest, http: Request):
    return await _complete(_serving(http, "serving_chat"), body)


@router.post(COMPLETION.path, responses=_COMPLETION)
@with_cancellation
async def completions(body: CompletionRequest, http: Request):
    return await _complete(_serving(http, "serving_completion"), body)


def _model(serving: Serving) -> dict:
    return {"id": serving.model_name, "object": "model", "created": 0, "owned_by": "hguard"}


@router.get("/v1/models", responses=_responses(401, 503))
async def models(http: Request):
    return {"object": "list", "data": [_model(_serving(http))]}


@router.get("/v1/models/{model:path}", responses=_responses(401, 404, 503))
async def model(model: str, http: Request):
    serving = _serving(http)
    check_model(model, serving.model_name)
    return _model(serving)


@router.get("/metrics", responses=_responses(404, 503))
async def metrics(http: Request):
    serving = _serving(http)
    if serving.metrics is None:
        raise APIError(404, "metrics are disabled on this server", "not_found_error")
    return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", responses=_responses(503))
async def health(http: Request):
    """200 while this replica can answer; 503 (a load balancer takes it out) while the model is not
    loaded, the engine's worker has died (hosted), or the upstream does not answer (proxy)."""
    _serving(http)  # 503 until loaded
    proxy, engine = http.app.state.proxy, http.app.state.engine
    if proxy is not None:
        problem = await proxy.upstream.health()
        if problem:
            raise APIError(503, problem, "service_unavailable", code="upstream_unavailable")
        return {"status": "ok", "upstream": "ok", "open_streams": proxy.streams}
    if not engine.alive:
        raise APIError(503, "the engine's worker is not running", "service_unavailable", code="engine_stopped")
    return {"status": "ok", "engine": "running", "queue_depth": engine.queue_depth, "running": engine.running}
