"""The OpenAI wire format, with hguard's extensions, as pydantic models.

Requests accept the OpenAI fields hguard implements and refuse every other field by name (400), so a
client never believes an option took effect when it did not. The `guard` object is the extension
(the OpenAI SDK sends it with `extra_body`). Responses add `hallucination` to each choice.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# transformers' stop-string matcher builds tables of vocabulary x stop length: a 1 MB stop string took
# the organism's server past 8 GB; 256 characters cost nothing measurable, 1,024 four times a short answer
MAX_STOP_CHARS = 256


def unencodable(value: Any) -> str | None:
    """Why `value` (a string, or lists and dicts holding strings, keys included) is not valid Unicode
    text, or None when it is. JSON's \\u escapes can carry a lone UTF-16 surrogate (\\ud800), which
    Python keeps in a str but no tokenizer, log or response can encode. Iterative: nesting depth
    costs no stack; JSON's own types are checked in one pass first, and walked only to say where."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    except (TypeError, ValueError, RecursionError):  # not JSON's types, or nested past the encoder: walk it
        pass
    stack = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as error:
                bad = item[error.start].encode("unicode_escape").decode("ascii")
                at = f" of {where.lstrip('.')}" if where else ""
                return f"not valid Unicode text: a lone surrogate {bad} at character {error.start}{at}"
        elif isinstance(item, dict):
            for i, (key, inner) in enumerate(item.items()):
                stack.append((key, f"{where}.<key {i}>"))
                stack.append((inner, f"{where}.{key}" if isinstance(key, str) and key.isascii() else f"{where}.{i}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((inner, f"{where}.{i}") for i, inner in enumerate(item))
    return None


class _Strict(BaseModel):
    """A request object: unknown fields are refused by name, and every text in it must be valid Unicode
    (400 naming the field, before anything tokenizes, logs or echoes it)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value):
        problem = unencodable(value)
        if problem:
            raise ValueError(problem)
        return value


class GuardOptions(_Strict):
    action: Literal["off", "flag", "abstain", "dampen", "scale"] | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    alpha: float | None = Field(default=None, ge=0.0, le=10.0)
    token_scores: bool = False


class StreamOptions(_Strict):
    include_usage: bool = False


def _refuse_if_set(value, info):
    """Fields of the OpenAI API this server parses but does not implement yet: only their off value passes."""
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server yet")
    return value


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="only 0 is supported")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="only 0 is supported")
    guard: GuardOptions = Field(default_factory=GuardOptions)
    # vLLM's sampling fields, as production clients send them: forwarded as sent in proxy mode; the
    # hosted engine honours all but ignore_eos and skip_special_tokens=false, which it refuses by name
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    # vLLM's token-id fields: forwarded in proxy mode (a vLLM upstream is asked for token ids anyway, and
    # they reach the client only when it asked); the hosted engine refuses them by name
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data):
        """A field sent as null is a field not sent (the OpenAI API's and vLLM's reading): its default
        applies, and proxy mode does not forward it."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop must be up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ContentPartError(ValueError):
    """A content part this server cannot read; `part` is its index in the message's content list."""

    def __init__(self, part: int, message: str) -> None:
        super().__init__(message)
        self.part = part


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text":
                raise ContentPartError(i, f"content parts of type {kind!r} are not supported by this server; "
                                          "send 'text' parts")
            if not isinstance(part.get("text"), str):
                raise ContentPartError(i, "a 'text' content part needs a string `text`")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def logprob_count(self) -> int | None:
        """How many alternatives per token the guard must return (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    _not_yet = field_validator("echo")(lambda value, info: _refuse_if_set(value, info))

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [prompt]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return list(prompt)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


# ---- responses (built as dicts by serving.py and chunks.py, checked against the OpenAI schemas in the tests) --
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
