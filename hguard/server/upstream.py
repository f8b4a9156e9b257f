"""The upstream of proxy mode, treated as untrusted: bounded reads, Server-Sent Events read as the
spec says, and every body and chunk validated (upstream_schema.py) before any of it is used.

Whatever goes wrong is one clean OpenAI error: 502 for a broken upstream (unreachable, a redirect, a
body that is HTML or not JSON, a body or event over its bound, a wrong shape, a stream that ends before
its answer) and 504 for a stalled one (no answer, or no event, within the timeout; keep-alive lines and
SSE comments are not events). The client never sees the upstream's URL, HTML or stack traces: the
upstream's own OpenAI-shaped error keeps its message, param and code (a 4xx its status too), anything
else is said in a sentence of ours, and the details go to the log ("hguard.server.upstream").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time

import httpx

from .errors import APIError
from .upstream_schema import parse_json

log = logging.getLogger("hguard.server.upstream")

MAX_BODY_BYTES = 32 * 1024 * 1024  # a non-streamed answer (n choices with logprobs fit easily)
MAX_EVENT_BYTES = 4 * 1024 * 1024  # one stream event
MAX_ERROR_BYTES = 64 * 1024  # an error body: enough for any message, read no further
MAX_MESSAGE_CHARS = 1000
HEALTH_EVERY = 2.0  # seconds a /health answer about the upstream is reused
IDENTITY_EVERY = 60.0  # seconds what the upstream said it is (its models' `owned_by`) is reused
POOLS = 8  # HTTP clients the upstream's requests are spread over (Upstream.__init__ says why)
KEEPALIVE = 64  # idle upstream connections kept open, in all
_NOT_A_MESSAGE = re.compile(r"<[a-zA-Z!/][^>]*>|Traceback \(most recent call last\)|\bFile \"[^\"]+\", line \d+")


def broken(message: str, detail: object = "") -> APIError:
    """A 502 for an upstream that answered something unusable; `detail` goes to the log only."""
    log.warning("upstream: %s%s", message, f" ({str(detail)[:500]})" if detail else "")
    return APIError(502, message, "upstream_error")


def stalled(seconds: float, what: str, detail: object = "") -> APIError:
    """A 504 for an upstream that sent nothing for `seconds`; `detail` goes to the log only."""
    log.warning("upstream: %s within %g s%s", what, seconds, f" ({detail})" if detail else "")
    return APIError(504, f"the upstream sent nothing for {seconds:g} s ({what})", "upstream_timeout")


def _own_message(message: object) -> str | None:
    """The upstream's own error message, when it is one a client may read (short text, no HTML, no
    traceback)."""
    if not isinstance(message, str) or not message.strip() or _NOT_A_MESSAGE.search(message):
        return None
    return message.strip()[:MAX_MESSAGE_CHARS]


def relayed_error(status: int, payload: object, headers: httpx.Headers | None = None) -> APIError:
    """The upstream's error (status, parsed body) as this server's: its message, param and code where its
    body is OpenAI's shape (or TGI's, an `error` string); 5xx, 1xx and 3xx become 502, and an upstream
    that refuses this server's own key (401, 403: a misconfigured server, not the client's fault) a 502
    that says so without its message; a 429 keeps Retry-After."""
    error = payload.get("error") if isinstance(payload, dict) else None
    fields = error if isinstance(error, dict) else {"message": error}
    message = _own_message(fields.get("message"))
    param, code = fields.get("param"), fields.get("code")
    retry = {"Retry-After": headers["retry-after"]} if status == 429 and headers and "retry-after" in headers else None
    if status in (401, 403):
        log.warning("upstream refused this server's key (%s): %s", status, str(payload)[:500])
        return APIError(502, "the upstream refused this server's credentials (--upstream-api-key)", "upstream_error")
    if message is None:
        log.warning("upstream error %s: %s", status, str(payload)[:500])
        message = f"the upstream failed ({status})" if not 400 <= status < 500 else f"the upstream refused the request ({status})"
        param = code = None
    return APIError(status if 400 <= status < 500 else 502, f"upstream: {message}", "upstream_error",
                    param=param if isinstance(param, str) else None,
                    code=str(code)[:100] if isinstance(code, (str, int)) else None, headers=retry)


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The response's body, or a 502 once it passes `limit` bytes (nothing past the limit is read)."""
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limit:
            raise broken(f"the upstream's answer is larger than {limit} bytes")
    return bytes(body)


class Events:
    """The data of each Server-Sent Event of an upstream stream, in order; comments (":..."), other
    fields and events without data (keep-alives) are skipped. `next()` waits at most `timeout` seconds
    for an event, however many keep-alives come meanwhile. A reader task reads up to `AHEAD` events
    ahead of `next()`, so that `ready()` can tell a consumer that more has arrived (proxy mode then
    scores several events' tokens in one forward); `close()` stops it."""

    AHEAD = 64

    def __init__(self, response: httpx.Response, timeout: float) -> None:
        self.timeout = timeout
        self._chunks = response.aiter_bytes()
        self._buffer = b""
        self._ended = False
        self._queue: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None

    def ready(self) -> bool:
        """Whether another event (or the stream's end) has arrived already: `next()` would not wait."""
        return self._queue is not None and not self._queue.empty()

    async def next(self) -> str | None:
        """The next event's data; None once the stream has ended."""
        if self._reader is None:
            self._queue = asyncio.Queue(maxsize=self.AHEAD)
            self._reader = asyncio.create_task(self._read())
        try:
            async with asyncio.timeout(self.timeout):
                data, error = await self._queue.get()
        except TimeoutError:
            raise stalled(self.timeout, "no stream event") from None
        if error is not None:
            raise error
        return data

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self) -> None:
        while True:
            try:
                data, error = await self._event(), None
            except httpx.TimeoutException:
                data, error = None, stalled(self.timeout, "no stream event")
            except httpx.HTTPError as problem:
                data, error = None, broken("the upstream's stream broke off", repr(problem))
            except APIError as problem:  # an event or line past its bound
                data, error = None, problem
            await self._queue.put((data, error))
            if data is None:
                return

    async def _event(self) -> str | None:
        data: list[str] = []
        size = 0
        while (line := await self._line()) is not None:
            if line == "":
                if "".join(data).strip():
                    return "\n".join(data)
                data, size = [], 0
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                if name == "data":
                    data.append(value.removeprefix(" "))
                    size += len(value)
                    if size > MAX_EVENT_BYTES:
                        raise broken(f"an upstream stream event is larger than {MAX_EVENT_BYTES} bytes")
        return "\n".join(data) if "".join(data).strip() else None  # an unterminated last event counts

    async def _line(self) -> str | None:
        while b"\n" not in self._buffer and not self._ended:
            if len(self._buffer) > MAX_EVENT_BYTES:
                raise broken(f"an upstream stream line is longer than {MAX_EVENT_BYTES} bytes")
            try:
                self._buffer += await self._chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
        if not self._buffer and self._ended:
            return None
        line, sep, rest = self._buffer.partition(b"\n")
        self._buffer = rest
        return line.rstrip(b"\r").decode("utf-8", errors="replace")


class Upstream:
    """HTTP to the upstream: requests with this server's key, bounded and checked answers, its health."""

    def __init__(self, url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        # the paths below start with /v1; an OpenAI-style base URL (".../v1") means the same server
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no pool limit of their own: the proxy bounds its streams, and a pool smaller than that bound
        # would turn healthy but busy upstream connections into timeouts. Requests take the clients in
        # turn: httpx's pool (httpcore 1.0) scans all its connections, some of them more than once, at
        # every request and every response's end, so 32 streams on one pool spent more of the proxy's
        # event loop in that scan than in relaying
        self.clients = [httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False,
                                          limits=httpx.Limits(max_connections=None,
                                                              max_keepalive_connections=KEEPALIVE // POOLS))
                        for _ in range(POOLS)]
        self.client = self.clients[0]  # health and identity checks
        self._turn = itertools.cycle(self.clients)
        self._health: tuple[float, str | None] = (-HEALTH_EVERY, None)
        self._health_lock = asyncio.Lock()
        self._identity: tuple[float, bool] = (-IDENTITY_EVERY, False)
        self._identity_lock = asyncio.Lock()

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def post(self, path: str, body: dict) -> httpx.Response:
        """The upstream's 2xx response, its body not read yet (the caller closes it); anything else is
        raised as this server's error."""
        try:
            client = next(self._turn)
            request = client.build_request("POST", f"{self.url}{path}", json=body)
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise stalled(self.timeout, "no answer", self.url) from None
        except httpx.HTTPError as error:
            raise broken("the upstream is unreachable", f"{self.url}: {error!r}") from None
        if not 200 <= response.status_code < 300:
            try:
                payload = await read_bounded(response, MAX_ERROR_BYTES)
            except APIError:
                payload = b""
            except httpx.HTTPError as error:
                payload = repr(error).encode()
            finally:
                await response.aclose()
            parsed = parse_json(payload)
            raise relayed_error(response.status_code, parsed if parsed is not None else payload.decode(errors="replace"),
                                response.headers)
        return response

    async def body(self, path: str, body: dict) -> object:
        """A non-streamed answer, parsed (not yet validated: the caller knows its shape)."""
        response = await self.post(path, body)
        try:
            payload = await read_bounded(response, MAX_BODY_BYTES)
        except httpx.TimeoutException:
            raise stalled(self.timeout, "the answer stopped coming") from None
        except httpx.HTTPError as error:
            raise broken("the upstream's answer broke off", repr(error)) from None
        finally:
            await response.aclose()
        parsed = parse_json(payload)
        if parsed is None:
            raise broken("the upstream answered with something that is not JSON", payload[:200])
        return parsed

    async def events(self, path: str, body: dict) -> tuple[httpx.Response, Events]:
        """A streamed answer: the response (the caller closes it) and its events; a response that is
        not an event stream is an error here, before the client's stream starts."""
        response = await self.post(path, body)
        kind = response.headers.get("content-type", "")
        if not kind.startswith("text/event-stream"):
            try:
                payload = await read_bounded(response, MAX_ERROR_BYTES)
            except (APIError, httpx.HTTPError):
                payload = b""
            finally:
                await response.aclose()
            parsed = parse_json(payload)
            if isinstance(parsed, dict) and "error" in parsed:
                raise relayed_error(502, parsed)
            raise broken(f"the upstream answered a stream request with {kind.split(';')[0] or 'no content type'}",
                         payload[:200])
        return response, Events(response, self.timeout)

    async def is_vllm(self) -> bool:
        """Whether the upstream says it is vLLM (`owned_by: "vllm"` in `GET /v1/models`), which returns
        token ids when asked (`return_token_ids`); asked at most once every IDENTITY_EVERY seconds (once
        every HEALTH_EVERY while the upstream does not answer). An upstream that cannot tell is not."""
        async with self._identity_lock:
            checked, vllm = self._identity
            if time.monotonic() - checked < IDENTITY_EVERY:
                return vllm
            models = None
            try:
                request = self.client.build_request("GET", f"{self.url}/v1/models", timeout=min(self.timeout, 5.0))
                response = await self.client.send(request, stream=True)
                try:
                    if 200 <= response.status_code < 300:
                        models = parse_json(await read_bounded(response, MAX_ERROR_BYTES * 16))
                finally:
                    await response.aclose()
            except (httpx.HTTPError, APIError) as error:
                log.warning("upstream identity: %s: %r", self.url, error)
            data = models.get("data") if isinstance(models, dict) else None
            vllm = isinstance(data, list) and any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in data)
            self._identity = (time.monotonic() - (IDENTITY_EVERY - HEALTH_EVERY if models is None else 0), vllm)
            return vllm

    async def health(self) -> str | None:
        """Why the upstream cannot serve now (None: it can), from `GET /v1/models`, asked at most once
        every HEALTH_EVERY seconds however often /health is."""
        async with self._health_lock:
            checked, problem = self._health
            if time.monotonic() - checked < HEALTH_EVERY:
                return problem
            try:
                response = await self.client.get(f"{self.url}/v1/models", timeout=min(self.timeout, 5.0))
                problem = None if 200 <= response.status_code < 300 else \
                    f"the upstream answers {response.status_code} to GET /v1/models"
            except httpx.TimeoutException:
                problem = "the upstream does not answer"
            except httpx.HTTPError as error:
                log.warning("upstream health: %s: %r", self.url, error)
                problem = "the upstream is unreachable"
            self._health = (time.monotonic(), problem)
            return problem
