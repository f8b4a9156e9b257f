"""The official OpenAI schemas (tests/openai_spec/), and a recorder of what hguard servers send.

`LiveServer` (test_server.py) wraps every hguard app it runs in `Recorder`, which keeps each reply to
a /v1/ request (status, content type, body). `objects` turns a reply into the OpenAI objects it holds
(a body, or each event of a stream) named by their schema, and `check` validates them; conftest.py
checks what each test recorded when the test ends, so every server run of the suite is validated.

The spec is OpenAPI 3.1 (JSON Schema 2020-12), but a few of its schemas still use OpenAPI 3.0's
`nullable: true`; it is read as "null is also allowed", as its authors mean it (OpenAI's own stream
chunks send `"logprobs": null` and `"finish_reason": null` where those schemas say so). One more
reading: the legacy completions schema says that streamed and non-streamed completions share its
shape, yet OpenAI's chunks carry `"finish_reason": null` until the last; the stream chunks of
/v1/completions are checked with null allowed there.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC = Path(__file__).parent / "openai_spec" / "schemas.json"


def _read_nullable(node):
    """OpenAPI 3.0's `nullable: true` as JSON Schema: null is also allowed."""
    if isinstance(node, list):
        return [_read_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _read_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _document() -> dict:
    spec = json.loads(SPEC.read_text())
    schemas = _read_nullable(spec["components"]["schemas"])
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    reason = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [reason, {"type": "null"}]}
    schemas["CompletionStreamChunk"] = chunk
    return {"components": {"schemas": schemas}}


_DOCUMENT = _document()
_VALIDATORS: dict[str, Draft202012Validator] = {}


def validator(name: str) -> Draft202012Validator:
    if name not in _VALIDATORS:
        schema = {**_DOCUMENT, "$ref": f"#/components/schemas/{name}"}
        Draft202012Validator.check_schema(schema)
        _VALIDATORS[name] = Draft202012Validator(schema)
    return _VALIDATORS[name]


@dataclass
class Reply:
    method: str
    path: str
    port: int  # the server's
    status: int
    content_type: str
    body: bytes


RECORDED: list[Reply] = []
VALIDATED: list[int] = []  # objects validated, per checked test (conftest.py)
_LOCK = threading.Lock()


class Recorder:
    """ASGI middleware: keeps every reply to a /v1/ request in RECORDED (streams once they end)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        reply = Reply(scope["method"], scope["path"], (scope.get("server") or ("", 0))[1], 0, "", b"")

        async def recording(message):
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                reply.content_type = headers.get(b"content-type", b"").decode()
            elif message["type"] == "http.response.body":
                reply.body += message.get("body", b"")
                if not message.get("more_body", False):
                    with _LOCK:
                        RECORDED.append(reply)
            await send(message)

        await self.app(scope, receive, recording)


def _events(body: bytes) -> list[dict]:
    data = [line[len("data:"):].strip() for line in body.decode().splitlines() if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def objects(reply: Reply) -> list[tuple[str, dict]]:
    """(schema name, object) for each OpenAI object in a reply; none for a reply without a body (a 499)."""
    if not reply.body:
        return []
    if reply.content_type.startswith("text/event-stream"):
        chat = reply.path == "/v1/chat/completions"
        chunk = "CreateChatCompletionStreamResponse" if chat else "CompletionStreamChunk"
        return [("ErrorResponse" if "error" in event else chunk, event) for event in _events(reply.body)]
    body = json.loads(reply.body)
    if reply.status >= 400:
        return [("ErrorResponse", body)]
    if reply.path == "/v1/chat/completions":
        return [("CreateChatCompletionResponse", body)]
    if reply.path == "/v1/completions":
        return [("CreateCompletionResponse", body)]
    if reply.path == "/v1/models":
        return [("ListModelsResponse", body)]
    if reply.path.startswith("/v1/models/"):
        return [("Model", body)]
    raise AssertionError(f"no OpenAI schema known for {reply.method} {reply.path} ({reply.status})")


def problems(name: str, body: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator(name).iter_errors(body)]


def check(replies: list[Reply]) -> int:
    """Validate every object of `replies` against its official schema; the number validated."""
    count, failures = 0, []
    for reply in replies:
        for name, body in objects(reply):
            found = problems(name, body)
            if found:
                failures.append(f"{reply.method} {reply.path} {reply.status} as {name}: {found[:3]}\n  {body}")
            count += 1
    assert not failures, "not OpenAI's schema:\n" + "\n".join(failures)
    return count
