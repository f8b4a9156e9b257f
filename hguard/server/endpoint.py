"""An endpoint of the OpenAI API as this server serves it, chat or legacy completions: what tells one
from the other on the wire (`Endpoint`: `CHAT` and `COMPLETION`), and the interface that every mode's
serving of an endpoint implements (`Serving`: hosted in serving.py, proxied in proxy.py).

The app holds one `Serving` per endpoint, as vLLM's entrypoints hold `OpenAIServingChat` and
`OpenAIServingCompletion`; the routes call its `complete(request)` or `stream(request)`. Past the
routes no code asks which endpoint it serves: it asks the endpoint where a choice carries its text (a
chat `message` or `delta`, a completion's `text`), what the `object`s are called, which request field
holds the prompt, what a withheld answer's logprobs are, and what shapes its upstream sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from ..guard import Guard
from ..metrics import Metrics
from .chunks import chat_logprobs, worst
from .requests import GuardDefaults, messages_of, prompts_of
from .upstream_schema import chat_answer, chat_chunk, text_answer, text_chunk


@dataclass(frozen=True)
class Endpoint:
    """One endpoint's facts; its subclass says where a choice carries text."""

    name: str  # the `endpoint` label of the metrics
    path: str  # the route, on this server and on an upstream
    id_prefix: str  # of a response's `id`
    object: str  # a whole response's `object`
    chunk_object: str  # a stream chunk's
    param: str  # the request field that holds the prompt (errors name it)
    usage_null: bool  # stream chunks carry `usage: null` until the last, where usage is asked for
    answer_schema: Callable[[object, str, int], dict]  # validates an upstream's answer (upstream_schema.py)
    chunk_schema: Callable[[object, str, int], dict]  # and its stream chunk

    def prompts(self, request) -> list:
        """The request's prompts, each as the tokenizer takes it (client errors are 400s naming the field)."""
        raise NotImplementedError

    def answer_text(self, choice: dict) -> str | None:
        """A whole answer's choice's text."""
        raise NotImplementedError

    def set_answer_text(self, choice: dict, text: str) -> None:
        """Put `text` in a whole answer's choice, in place of any it had."""
        raise NotImplementedError

    def chunk_text(self, choice: dict) -> str | None:
        """A stream chunk's choice's text."""
        raise NotImplementedError

    def set_chunk_text(self, choice: dict, text: str) -> None:
        """Put `text` in a stream chunk's choice, in place of any it had."""
        raise NotImplementedError

    def withheld_logprobs(self) -> dict:
        """The `logprobs` of an abstained choice: its replacement message has none (not the model's tokens)."""
        raise NotImplementedError

    def upstream_prompt(self, body_ids: list[int] | None, choice_ids: list[int] | None) -> list[int] | None:
        """Of the prompt ids an upstream sent at a body's top and in a choice, the ones of that choice."""
        raise NotImplementedError

    def upstream_answer(self, data: object, n: int) -> dict:
        """An upstream's answer, validated and made this endpoint's (a `ShapeError` if it is not one)."""
        return self.answer_schema(data, self.object, n)

    def upstream_chunk(self, data: object, n: int) -> dict:
        """An upstream's stream chunk, validated and made this endpoint's."""
        return self.chunk_schema(data, self.chunk_object, n)

    def opening(self, rows: int) -> list[dict]:
        """The choices of a stream's first chunk, sent before any text (none: no such chunk)."""
        return []

    def text_choice(self, index: int, text: str, scores: list[float], logprobs: dict | None = None) -> dict:
        """A stream chunk choice that adds `text`, with the scores of its tokens (none: the abstention message)."""
        choice: dict = {"index": index, "finish_reason": None, "logprobs": logprobs,
                        "hallucination": {"token_scores": scores}}
        self.set_chunk_text(choice, text)
        return choice

    def finishing_choice(self, index: int, summary: dict, finish: str) -> dict:
        """The stream chunk choice that ends a choice: its finish reason and the summary, and no text (an
        abstention message comes in the chunk before: litellm splits a finishing chunk with text in two
        and keeps the summary on neither part)."""
        choice: dict = {"index": index, "finish_reason": finish, "logprobs": None, "hallucination": summary}
        self._end(choice, summary)
        return choice

    def _end(self, choice: dict, summary: dict) -> None:
        raise NotImplementedError


_MESSAGE = {"role": "assistant", "content": None, "refusal": None}  # a hosted answer's message, before its text


class ChatEndpoint(Endpoint):
    """/v1/chat/completions: one chat per request; text in `message.content`, in a stream `delta.content`."""

    def prompts(self, request) -> list:
        return [messages_of(request)]

    def answer_text(self, choice: dict) -> str | None:
        return choice["message"]["content"]

    def set_answer_text(self, choice: dict, text: str) -> None:
        choice["message"] = {**choice.get("message", _MESSAGE), "content": text}

    def chunk_text(self, choice: dict) -> str | None:
        return (choice.get("delta") or {}).get("content")

    def set_chunk_text(self, choice: dict, text: str) -> None:
        choice["delta"] = {**(choice.get("delta") or {}), "content": text}

    def withheld_logprobs(self) -> dict:
        return chat_logprobs(None)

    def upstream_prompt(self, body_ids: list[int] | None, choice_ids: list[int] | None) -> list[int] | None:
        return body_ids  # one chat, its ids at the top

    def opening(self, rows: int) -> list[dict]:
        """Each choice's role, as OpenAI's streams begin."""
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
                for i in range(rows)]

    def _end(self, choice: dict, summary: dict) -> None:
        # the summary rides in the delta too, where accumulating clients keep it (the openai SDK's stream
        # helper builds `message` from the deltas)
        choice["delta"] = {"hallucination": summary}


class CompletionEndpoint(Endpoint):
    """/v1/completions: one prompt or several; text in each choice's `text`."""

    def prompts(self, request) -> list:
        return prompts_of(request)

    def answer_text(self, choice: dict) -> str | None:
        return choice["text"]

    def set_answer_text(self, choice: dict, text: str) -> None:
        choice["text"] = text

    def chunk_text(self, choice: dict) -> str | None:
        return choice.get("text")

    def set_chunk_text(self, choice: dict, text: str) -> None:
        choice["text"] = text

    def withheld_logprobs(self) -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def upstream_prompt(self, body_ids: list[int] | None, choice_ids: list[int] | None) -> list[int] | None:
        return choice_ids  # each choice has its prompt

    def _end(self, choice: dict, summary: dict) -> None:
        choice["text"] = ""


# chat chunks carry `usage: null` until the last when usage is asked for, as OpenAI's do; the legacy
# completions schema has no null usage, so its chunks leave it out until then
CHAT = ChatEndpoint("chat", "/v1/chat/completions", "chatcmpl", "chat.completion", "chat.completion.chunk",
                    "messages", usage_null=True, answer_schema=chat_answer, chunk_schema=chat_chunk)
COMPLETION = CompletionEndpoint("completions", "/v1/completions", "cmpl", "text_completion", "text_completion",
                                "prompt", usage_null=False, answer_schema=text_answer, chunk_schema=text_chunk)


class Serving:
    """One endpoint served by one mode (subclasses: a mode's base, then one class per endpoint that sets
    `endpoint`): `complete` and `stream` answer a validated request, and record its metrics once."""

    endpoint: Endpoint

    def __init__(self, guard: Guard, model_name: str, defaults: GuardDefaults, metrics: Metrics | None = None) -> None:
        self.guard, self.model_name, self.defaults, self.metrics = guard, model_name, defaults, metrics

    async def complete(self, request) -> dict:
        """The response body of a non-streamed request; bad requests raise before anything runs."""
        raise NotImplementedError

    async def stream(self, request) -> AsyncIterator[str]:
        """The Server-Sent Events of a streamed request; bad requests raise before the first."""
        raise NotImplementedError

    def record(self, status: int, action: str | None = "", verdicts: Iterable[str] = (),
               prompt_tokens: int | None = None, latency: float | None = None) -> None:
        """One request into the metrics: a finished one, or a refused one with its status alone."""
        if self.metrics is not None:
            self.metrics.request(self.endpoint.name, status, action, worst(verdicts), prompt_tokens, latency)
