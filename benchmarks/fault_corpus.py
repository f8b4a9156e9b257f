"""The fault corpus of issue 22, shared by tests/test_server_faults.py and benchmarks/faults.py.

- `hostile_bodies(model)`: requests a client should never be able to hurt the server with (lone
  surrogates, huge arrays, prompts x n, deep nesting, wrong types, 1 MB strings, bytes that are not
  UTF-8 or not JSON), on both endpoints, streamed and not.
- `MisbehavingUpstream`: an OpenAI-compatible upstream on a loopback port that misbehaves as told
  (`UPSTREAM_MODES`: closes, stalls, 4xx/5xx/429, HTML, redirects, non-JSON, wrong shapes, keep-alives,
  error events, a 1 MB answer, a line over the event bound). It speaks raw HTTP/1.1 from its own
  thread, so it can break the protocol as well as the contract; every stall ends by itself.
- `send` and `classify`: one request and what became of it (2xx, 4xx, upstream 502/504, a 5xx of
  hguard's own, a truncated stream, a leak of upstream internals).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import httpx

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
ANSWER = ["Hel", "lo", " world"]  # what a well-behaved upstream answers
STALL_S = 8.0  # a stalling upstream gives up after this long (the proxy's timeout must be shorter)
LEAKS = ("Traceback", "<html", "sk-live", "/srv/", "127.0.0.1")  # upstream internals a client must not see


# ---- hostile request bodies -------------------------------------------------------------------------
def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def hostile_bodies(model: str) -> list[tuple[str, str, bytes]]:
    """(name, path, raw body) for each hostile request: every case on both endpoints, streamed and not."""
    mb = "a " * 500_000
    chat = {
        "surrogate content": {"messages": [{"role": "user", "content": "\ud800"}]},
        "surrogate text part": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
        "surrogate name": {"messages": [{"role": "user", "content": "hi", "name": "\udc00"}]},
        "messages a string": {"messages": "hi"},
        "content a number": {"messages": [{"role": "user", "content": 5}]},
        "20k messages": {"messages": [{"role": "user", "content": "hi"}] * 20_000},
        "1 MB content": {"messages": [{"role": "user", "content": mb}]},
        "n 17": {"messages": [{"role": "user", "content": "hi"}], "n": 17},
    }
    text = {
        "surrogate prompt": {"prompt": "\ud800"},
        "surrogate in prompt array": {"prompt": ["ok", "b\ud800"]},
        "500 prompts x n 16": {"prompt": ["Neirga Rere was a"] * 500, "n": 16, "max_tokens": 1},
        "3 prompts x n 16": {"prompt": ["Hi"] * 3, "n": 16, "max_tokens": 1},
        "200k token ids": {"prompt": list(range(5, 105)) * 2_000},
        "100 token-id prompts": {"prompt": [[5, 6]] * 100, "max_tokens": 1},
        "token id out of range": {"prompt": [10**9]},
        "empty prompt array": {"prompt": []},
        "1 MB prompt": {"prompt": mb},
        "prompt a dict": {"prompt": {"a": 1}},
    }
    shared = {
        "surrogate stop": {"stop": ["\ud800"]},
        "surrogate model": {"model": "\ud800"},
        "surrogate metadata key": {"metadata": {"\ud800": "x"}},
        "n a string": {"n": "2"},
        "max_tokens a list": {"max_tokens": [1]},
        "stop a dict": {"stop": {"a": 1}},
        "guard a list": {"guard": []},
        "temperature a word": {"temperature": "hot"},
        "1 MB stop": {"stop": [mb]},
        "1 MB model": {"model": mb},
        "unknown field": {"logit_bias": {"5": 100}},
    }
    raw = {
        "not JSON": b"{not json",
        "not UTF-8": b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}',
        "a JSON array": b"[1, 2, 3]",
        "JSON null": b"null",
        "empty body": b"",
        "nested 100k deep": ('{"model": "m", "metadata": ' + _deep(100_000) + "}").encode(),
        "nested 5k deep part": ('{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", '
                                '"text": "x", "x": ' + _deep(5_000) + "}]}]}").encode(),
    }
    cases = []
    for path, bodies, base in ((CHAT, chat, {"messages": [{"role": "user", "content": "Hi"}]}),
                               (TEXT, text, {"prompt": "Hi"})):
        for stream in (False, True):
            suffix = ", streamed" if stream else ""
            for name, fields in {**bodies, **shared}.items():
                body = {"model": model, **base, "max_tokens": 4, "stream": stream, **fields}
                cases.append((f"{name}{suffix}", path, json.dumps(body).encode()))
            for name, payload in raw.items():
                cases.append((f"{name}{suffix}", path, payload))
    return cases


def normal_body(path: str, model: str, stream: bool = False) -> dict:
    base = {"messages": [{"role": "user", "content": "Hi"}]} if path == CHAT else {"prompt": "Hi"}
    return {"model": model, **base, "max_tokens": 4, "temperature": 0, "stream": stream}


# ---- what became of a request -----------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    complete: bool  # the body arrived whole (a stream was not cut off)
    seconds: float


def send(client: httpx.Client, url: str, path: str, body: bytes | dict, timeout: float = 120.0) -> Reply:
    """One request; a body cut off mid-way is a Reply with complete=False, never an exception."""
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    start = time.perf_counter()
    status, kind, received = 0, "", b""
    try:
        with client.stream("POST", f"{url}{path}", content=content, timeout=timeout,
                           headers={"Content-Type": "application/json"}) as response:
            status, kind = response.status_code, response.headers.get("content-type", "")
            for piece in response.iter_bytes():
                received += piece
        return Reply(status, kind, received, True, time.perf_counter() - start)
    except httpx.HTTPError:
        return Reply(status, kind, received, False, time.perf_counter() - start)


def events(body: bytes) -> list[str]:
    return [line[len("data:"):].strip() for line in body.decode(errors="replace").splitlines()
            if line.startswith("data:")]


def classify(reply: Reply) -> str:
    """'2xx', '4xx', 'upstream_5xx' (502/504: the upstream failed), 'hguard_5xx', 'truncated' (a body
    cut off, or a stream that ends without [DONE] or with an error event that is not its last event),
    or 'leak' (upstream internals in what the client got)."""
    if not reply.complete:
        return "truncated"
    if reply.content_type.startswith("text/event-stream"):
        data = events(reply.body)
        if not data or data[-1] != "[DONE]":
            return "truncated"
        try:
            parsed = [json.loads(d) for d in data[:-1]]
        except ValueError:
            return "truncated"
        errors = [i for i, p in enumerate(parsed) if isinstance(p, dict) and "error" in p]
        if errors and errors != [len(parsed) - 1]:
            return "truncated"
    if any(leak.encode() in reply.body for leak in LEAKS):
        return "leak"
    if reply.status in (502, 504):
        return "upstream_5xx"
    if reply.status >= 500 or reply.status < 200:
        return "hguard_5xx"
    return f"{reply.status // 100}xx"


def answered(reply: Reply, path: str) -> bool:
    """A normal request's reply is a whole, well-formed answer with its guard report."""
    if reply.status != 200 or not reply.complete:
        return False
    if reply.content_type.startswith("text/event-stream"):
        data = events(reply.body)
        chunks = [json.loads(d) for d in data[:-1]] if data and data[-1] == "[DONE]" else []
        return any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks) and \
            not any("error" in c for c in chunks)
    body = json.loads(reply.body)
    choice = body["choices"][0]
    return "hallucination" in choice and ("message" in choice if path == CHAT else "text" in choice)


# ---- a misbehaving upstream ---------------------------------------------------------------------------
def _chunk(chat: bool, piece: str | None = None, finish: str | None = None, index: int = 0) -> dict:
    choice: dict = {"index": index, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["delta"] = {"content": piece} if piece is not None else {}
    else:
        choice["text"] = piece or ""
    return {"id": "up", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": "up", "choices": [choice]}


def _body(chat: bool, text: str, n: int = 1) -> dict:
    def choice(i: int) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {"index": i, "finish_reason": "stop", "logprobs": None, **content}

    return {"id": "up", "object": "chat.completion" if chat else "text_completion", "created": 0, "model": "up",
            "choices": [choice(i) for i in range(n)],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _sse(*items) -> list[bytes]:
    return [(item if isinstance(item, str) else f"data: {json.dumps(item)}\n\n").encode() for item in items]


HTML_TRACE = ("<html><body><h1>500 Internal Server Error</h1><pre>Traceback (most recent call last):\n"
              '  File "/srv/vllm/api_server.py", line 12, in completions\nKeyError: "x"</pre></body></html>')


def _wrong(chat: bool, how: str) -> dict:
    good = _chunk(chat, "Hi")
    if how == "choices null":
        return {**good, "choices": None}
    if how == "choice a string":
        return {**good, "choices": ["Hi"]}
    if how == "content a number":
        return {**good, "choices": [{**good["choices"][0], "delta": {"content": 5}, "text": 5}]}
    return good


# mode -> (stream?) -> what the upstream does; see MisbehavingUpstream._answer
UPSTREAM_MODES = [
    "ok", "keep-alives and comments", "no [DONE] after the finish", "error event mid-stream",
    "close before answering", "close mid-answer", "stall before answering", "stall mid-answer",
    "400 openai error", "401 with a key in it", "404", "422 tgi string", "429 retry-after", "500 html traceback",
    "503 text", "200 html", "200 empty", "302 redirect", "200 not json", "choices null", "choice a string",
    "content a number", "a JSON list", "NaN", "surrogate text", "more choices than asked", "ends before finishing",
    "1 MB answer", "a line over 4 MiB",
]


class MisbehavingUpstream:
    """An OpenAI-compatible upstream on a loopback port, misbehaving as `mode` says (set it between
    requests, or per request as `metadata.upstream_mode`); `GET /v1/models` answers 200 unless mode is
    'down'."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MisbehavingUpstream":
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop)
        self._server = started.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if method == "GET":
                    ok = self.mode != "down" and path == "/v1/models"
                    await self._respond(writer, 200 if ok else 503, {"object": "list", "data": []} if ok else "down")
                    continue
                request = json.loads(body or b"{}")
                mode = (request.get("metadata") or {}).get("upstream_mode", self.mode)  # one request's own mode
                if not await self._answer(writer, path.endswith("/chat/completions"), bool(request.get("stream")),
                                          int(request.get("n") or 1), mode):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:  # stopped (__exit__): end quietly (Python 3.11's stream callback
            pass  # calls exception() on a cancelled handler and logs the CancelledError it raises)
        finally:
            writer.close()

    async def _respond(self, writer, status: int, body, kind: str = "application/json",
                       headers: dict | None = None) -> None:
        payload = body if isinstance(body, bytes) else (json.dumps(body) if not isinstance(body, str) else body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(payload)}\r\n{extra}\r\n"
                     .encode() + payload)
        await writer.drain()

    async def _stream(self, writer, pieces: list[bytes], end: bool = True, pause: float = 0.0) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(pause)
        if end:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def _stall(self, writer, keep_alive: bool) -> None:
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline and not writer.is_closing():
            if keep_alive:
                writer.write(b"2\r\n:\n\r\n")  # an SSE comment in its own HTTP chunk
                await writer.drain()
            await asyncio.sleep(0.2)

    async def _answer(self, writer, chat: bool, stream: bool, n: int, mode: str) -> bool:
        """Answer one request as `mode` says; False: close the connection afterwards."""
        text = "".join(ANSWER)
        good = [_chunk(chat, p) for p in ANSWER] + [_chunk(chat, finish="stop")]
        errors = {"400 openai error": (400, {"error": {"message": "bad n", "type": "BadRequestError", "param": "n",
                                                       "code": 400}}, {}),
                  "401 with a key in it": (401, {"error": {"message": "Incorrect API key provided: sk-live-1234",
                                                           "type": "invalid_request_error", "code": "invalid_api_key"}}, {}),
                  "404": (404, {"detail": "Not Found"}, {}),
                  "422 tgi string": (422, {"error": "Input validation error: too long", "error_type": "validation"}, {}),
                  "429 retry-after": (429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": "7"}),
                  "500 html traceback": (500, HTML_TRACE, {}),
                  "503 text": (503, "upstream overloaded at 127.0.0.1:9 (/srv/models)", {})}
        if mode in errors:
            status, body, headers = errors[mode]
            await self._respond(writer, status, body, "text/html" if isinstance(body, str) else "application/json",
                                headers)
        elif mode == "close before answering":
            return False
        elif mode == "stall before answering":
            await self._stall(writer, keep_alive=False)
            return False
        elif mode == "302 redirect":
            await self._respond(writer, 302, b"", headers={"Location": "http://127.0.0.1:9/login"})
        elif mode == "200 html":
            await self._respond(writer, 200, HTML_TRACE, "text/html")
        elif mode == "200 empty":
            await self._respond(writer, 200, b"", "text/event-stream" if stream else "application/json")
        elif mode == "200 not json":
            await self._respond(writer, 200, b"{nope", "application/json")
        elif not stream:
            body = _body(chat, text, n)
            if mode in ("choices null", "choice a string", "content a number"):
                body = {**body, "choices": _wrong(chat, mode)["choices"]}
                if mode == "content a number":
                    choice = body["choices"][0]
                    body["choices"] = [{**choice, "message": {"role": "assistant", "content": 5}, "text": 5,
                                        "finish_reason": "stop"}]
            elif mode == "a JSON list":
                body = [body]
            elif mode == "more choices than asked":
                body = _body(chat, text, n + 3)
            elif mode == "1 MB answer":
                body = _body(chat, "word " * 200_000, n)
            elif mode == "surrogate text":
                body = _body(chat, "a\ud800b", n)
            if mode == "close mid-answer":
                payload = json.dumps(body).encode()
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                             .encode() + payload[:20])
                await writer.drain()
                return False
            if mode == "stall mid-answer":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{")
                await writer.drain()
                await self._stall(writer, keep_alive=False)
                return False
            if mode == "a line over 4 MiB":
                body = _body(chat, "x" * (5 << 20), n)  # one body of 5 MiB: within the body bound, so fine
            if mode == "NaN":
                await self._respond(writer, 200, json.dumps(body).replace('"created": 0', '"created": NaN'))
            else:
                await self._respond(writer, 200, json.dumps(body))
        else:
            await self._answer_stream(writer, chat, mode, good)
            return mode not in ("close mid-answer", "stall mid-answer", "ends before finishing")
        return True

    async def _answer_stream(self, writer, chat: bool, mode: str, good: list[dict]) -> None:
        done = "data: [DONE]\n\n"
        if mode == "keep-alives and comments":
            pieces = _sse(": keep-alive\n\n", "data:\n\n", good[0], ":\n", "\n", "event: ping\ndata:\n\n",
                          *good[1:], done)
        elif mode == "no [DONE] after the finish":
            pieces = _sse(*good)
        elif mode == "error event mid-stream":
            pieces = _sse(good[0], {"error": {"message": "worker crashed", "type": "internal_error", "code": 500}}, done)
        elif mode == "close mid-answer":
            await self._stream(writer, _sse(*good[:2]), end=False)
            return
        elif mode == "stall mid-answer":
            await self._stream(writer, _sse(good[0]), end=False)
            await self._stall(writer, keep_alive=True)
            return
        elif mode in ("choices null", "choice a string", "content a number"):
            pieces = _sse(good[0], _wrong(chat, mode), done)
        elif mode == "a JSON list":
            pieces = _sse(good[0], "data: [1, 2]\n\n", done)
        elif mode == "NaN":
            nan = json.dumps(good[1]).replace('"created": 0', '"created": NaN')
            pieces = _sse(good[0], f"data: {nan}\n\n", done)
        elif mode == "surrogate text":
            pieces = _sse(good[0], _chunk(chat, "\ud800"), done)
        elif mode == "more choices than asked":
            pieces = _sse(good[0], _chunk(chat, "x", index=5), done)
        elif mode == "ends before finishing":
            pieces = _sse(*good[:2])
        elif mode == "1 MB answer":
            piece = "word " * 800  # 4,000 characters a chunk, 250 chunks
            pieces = _sse(*[_chunk(chat, piece) for _ in range(250)], good[-1], done)
        elif mode == "a line over 4 MiB":
            pieces = [b"data: " + b"x" * (5 << 20)]
        else:  # ok
            pieces = _sse(*good, done)
        await self._stream(writer, pieces)
