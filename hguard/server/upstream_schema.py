"""The shapes proxy mode accepts from an upstream, as pydantic models: what it reads and relays.

An upstream's completion body and stream chunk are validated here before the proxy reads or relays
any of it: the fields it uses must have their OpenAI types (choices a list of objects, text a string,
finish reasons OpenAI's, logprobs their OpenAI shape), every string must be valid Unicode, no number
may be NaN or infinite, and there are no more choices than the client asked for (each choice costs a
scorer). Other fields pass through as the upstream sent them. A body or chunk that fails is a
`ShapeError`, which the caller turns into a 502 (or an in-band error event mid-stream).
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .protocol import unencodable

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
# vLLM's token ids (`return_token_ids`): the prompt's, and each choice's (in a stream, each chunk's new ones)
TokenIds = list[Annotated[int, Field(ge=0, strict=True)]] | None


class ShapeError(ValueError):
    """An upstream body or chunk that is not the shape this server relays; the message says how."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Open):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class TextLogprobs(_Open):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class Message(_Open):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(_Open):
    index: int = Field(default=0, ge=0)
    message: Message
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None
    token_ids: TokenIds = None


class TextChoice(_Open):
    index: int = Field(default=0, ge=0)
    text: str
    finish_reason: FinishReason
    logprobs: TextLogprobs | None = None
    prompt_token_ids: TokenIds = None
    token_ids: TokenIds = None


class Usage(_Open):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class _Body(_Open):
    id: str = ""
    created: int = 0
    model: str = ""
    usage: Usage | None = None


class ChatCompletion(_Body):
    choices: list[ChatChoice]
    prompt_token_ids: TokenIds = None


class TextCompletion(_Body):
    choices: list[TextChoice]


class Delta(_Open):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None


class ChatChunkChoice(_Open):
    index: int = Field(default=0, ge=0)
    delta: Delta = Field(default_factory=Delta)
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: TokenIds = None


class TextChunkChoice(_Open):
    index: int = Field(default=0, ge=0)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: TextLogprobs | None = None
    prompt_token_ids: TokenIds = None
    token_ids: TokenIds = None


class ChatChunk(_Body):
    choices: list[ChatChunkChoice] = []
    prompt_token_ids: TokenIds = None


class TextChunk(_Body):
    choices: list[TextChunkChoice] = []


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)  # one for all (json.loads builds one per call)


def parse_json(payload: bytes | str) -> object | None:
    """The JSON value of `payload` (None: not JSON, or too deeply nested to read; NaN and Infinity,
    which Python's reader would accept, are not JSON)."""
    try:
        if isinstance(payload, (bytes, bytearray)):  # as json.loads reads bytes (a UTF-8 BOM, UTF-16 and -32 too)
            payload = payload.decode(json.detect_encoding(payload), "surrogatepass")
        return _DECODER.decode(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _checked(model: type[_Body], data: object, n: int, what: str) -> dict:
    if not isinstance(data, dict):
        raise ShapeError(f"the upstream's {what} is a JSON {type(data).__name__}, not an object")
    problem = unencodable(data)
    if problem:
        raise ShapeError(f"the upstream's {what} holds text that is {problem}")
    try:
        parsed = model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise ShapeError(f"the upstream's {what} is malformed at {where}: {first['msg']}") from None
    indexes = [choice.index for choice in parsed.choices]
    if len(indexes) > n or any(i >= n for i in indexes):
        raise ShapeError(f"the upstream's {what} has choices beyond the {n} asked for")
    body = parsed.model_dump(mode="json", exclude_unset=True)
    for choice, validated in zip(body["choices"], parsed.choices):
        choice["index"] = validated.index
    return body


# fields OpenAI's schemas type as an object, an array or a string, never null, which vLLM (0.32) sends as
# null when it has nothing for them: left out instead, as OpenAI leaves them out
_NEVER_NULL = {"body": ("service_tier", "system_fingerprint", "metadata", "obfuscation"),
               "message": ("tool_calls", "annotations", "function_call", "role"),
               "usage": ("completion_tokens_details", "prompt_tokens_details")}


def _drop_nulls(item: object, keys: tuple[str, ...]) -> None:
    if isinstance(item, dict):
        for key in keys:
            if key in item and item[key] is None:
                del item[key]


def _without_nulls(body: dict, message: str) -> dict:
    """`body` without the nulls OpenAI's schemas do not allow (`_NEVER_NULL`; `message`: the choices' key
    that holds the message, "message" or "delta")."""
    _drop_nulls(body, _NEVER_NULL["body"])
    _drop_nulls(body.get("usage"), _NEVER_NULL["usage"])
    for choice in body["choices"]:
        _drop_nulls(choice.get(message), _NEVER_NULL["message"])
    return body


def _answer(model: type[_Body], data: object, kind: str, n: int) -> dict:
    """A non-streamed answer, validated, with the fields OpenAI's schema requires filled in (`kind`: its
    `object`)."""
    body = _checked(model, data, n, "answer")
    if len({choice["index"] for choice in body["choices"]}) != len(body["choices"]):
        raise ShapeError("the upstream's answer repeats a choice index")
    body.update(object=kind, id=body.get("id", ""), created=body.get("created", 0))
    _drop_nulls(body, ("usage",))  # an answer's usage is never null (a stream chunk's may be)
    for choice in body["choices"]:
        choice.setdefault("logprobs", None)
    return body


def _chunk(model: type[_Body], data: object, kind: str, n: int) -> dict:
    """A stream chunk, validated (an `error` event is the caller's to handle first)."""
    body = _checked(model, data, n, "stream chunk")
    body.update(object=kind, id=body.get("id", ""), created=body.get("created", 0))
    body.setdefault("choices", [])
    return body


def _chat_logprobs(choice: dict) -> None:
    if isinstance(choice.get("logprobs"), dict):
        choice["logprobs"].setdefault("refusal", None)


def chat_answer(data: object, kind: str, n: int) -> dict:
    """A chat answer (`_answer`), each message with its role, content and refusal."""
    body = _without_nulls(_answer(ChatCompletion, data, kind, n), "message")
    for choice in body["choices"]:
        choice["message"].setdefault("role", "assistant")
        choice["message"].setdefault("content", None)
        choice["message"].setdefault("refusal", None)
        _chat_logprobs(choice)
    return body


def text_answer(data: object, kind: str, n: int) -> dict:
    return _without_nulls(_answer(TextCompletion, data, kind, n), "message")


def chat_chunk(data: object, kind: str, n: int) -> dict:
    body = _without_nulls(_chunk(ChatChunk, data, kind, n), "delta")
    for choice in body["choices"]:
        _chat_logprobs(choice)
    return body


def text_chunk(data: object, kind: str, n: int) -> dict:
    return _without_nulls(_chunk(TextChunk, data, kind, n), "message")
