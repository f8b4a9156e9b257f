"""HTTP routes: thin, they validate, hand the work to `Serving`, and shape the HTTP reply."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..metrics import CONTENT_TYPE_LATEST

from .engine import QueueFull
from .protocol import ChatCompletionRequest, CompletionRequest
from .serving import APIError, Serving, endpoint_name

router = APIRouter()


def _serving(request: Request) -> Serving:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise APIError(503, "the model is not loaded yet", "service_unavailable")
    return serving


def _submit(serving: Serving, job) -> None:
    try:
        serving.engine.submit(job)
    except QueueFull as error:
        raise APIError(429, str(error), "rate_limit_exceeded", headers={"Retry-After": "1"}) from error


async def _complete(http: Request, body, chat: bool):
    serving = _serving(http)
    proxy = http.app.state.proxy
    if proxy is not None:
        if body.stream:
            return StreamingResponse(await proxy.stream(body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await proxy.complete(body, chat))
    job = serving.chat_job(body) if chat else serving.completion_job(body)
    _submit(serving, job)
    if body.stream:
        async def events():
            try:
                async for event in serving.stream(body, job, chat):
                    yield event
            finally:
                job.cancelled.set()  # the client left (or the stream ended): free the rows

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    endpoint = endpoint_name(chat)
    try:
        results = await _unless_disconnected(http, serving.results(job))
    except Exception:
        serving.record(endpoint, 500, job)
        raise
    finally:
        job.cancelled.set()  # done, failed, or the client left: free the rows
    if results is None:  # nobody is waiting for the answer
        serving.record(endpoint, CLIENT_CLOSED, job)
        return Response(status_code=CLIENT_CLOSED)
    serving.record(endpoint, 200, job, results, body.n)
    return JSONResponse(serving.response(body, job, results, chat))


CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first


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


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: Request):
    return await _complete(http, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: Request):
    return await _complete(http, body, chat=False)


@router.get("/v1/models")
async def models(http: Request):
    serving = _serving(http)
    return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": 0,
                                        "owned_by": "hguard"}]}


@router.get("/metrics")
async def metrics(http: Request):
    serving = _serving(http)
    if serving.metrics is None:
        raise APIError(404, "metrics are disabled on this server", "not_found_error")
    return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(http: Request):
    serving = _serving(http)
    return {"status": "ok", "queue_depth": serving.engine.queue_depth, "running": serving.engine.running}
