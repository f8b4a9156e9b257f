"""Serving: OpenAI requests in, engine jobs out, and engine events back as OpenAI responses.

`Serving` owns the guard's defaults (action, threshold, alpha, abstention message) and the context
limit; it turns a validated request into a `Job`, and the job's events into one response body or a
sequence of Server-Sent Events. Routes stay thin and never see tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..guard import Guard
from ..logprobs import Entry
from ..results import GuardResult, TokenEvent, summary, token_bytes
from ..metrics import Metrics
from .engine import DONE, Engine, Job, Settings
from .protocol import ChatCompletionRequest, CompletionRequest, ContentPartError, new_id, now

log = logging.getLogger("hguard.server")
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first


class APIError(Exception):
    """An error the client caused or must handle; rendered as the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{served}`.",
                       param="model", code="model_not_found")


def messages_of(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The chat as the tokenizer's template wants it (text only; 'developer' is a system message). A
    content part that is not text is a 400 naming it, as the OpenAI API names a bad part."""
    chat = []
    for i, message in enumerate(request.messages):
        try:
            chat.append({"role": "system" if message.role == "developer" else message.role, "content": message.text()})
        except ContentPartError as error:
            param = f"messages.{i}.content.{error.part}"
            raise APIError(400, f"{param}: {error}", param=param, code="unsupported_content_part") from error
    return chat


def prompts_of(request: CompletionRequest) -> list:
    """The prompts of a text completion request (one string or token list each)."""
    try:
        return request.prompts()
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error


def context_exceeded(context: int, prompt: int, completion: int, param: str) -> APIError:
    """The OpenAI API's 400 for a request that does not fit the model's context."""
    return APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt + completion} tokens ({prompt} in the prompt, {completion} for the completion).",
                    param=param, code="context_length_exceeded")


def check_rows(prompts: int, n: int, limit: int) -> None:
    """A request's rows (prompts x n) fit in one batch of `limit` rows, or it is a 400 naming the limit:
    each request's work is bounded before it starts, and a request larger than a batch would make
    every other request wait for all of it."""
    if prompts * n > limit:
        what = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
        raise APIError(400, f"This request asks for {prompts * n} completions ({what}); this server generates at "
                       f"most {limit} per request (--max-batch-size). Send the prompts in smaller requests.",
                       param="prompt" if prompts > 1 else "n", code="too_many_completions")


def encode_prompt(guard: Guard, prompt) -> list[int]:
    try:
        return guard.encode(prompt)
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error


def chat_logprobs(content: list[dict] | None) -> dict:
    """A chat `logprobs` object; `refusal` is required by the OpenAI schema and always null here."""
    return {"content": content, "refusal": None}


def withheld_logprobs(chat: bool) -> dict:
    """The `logprobs` of an abstained choice: its replacement message has none (not the model's tokens)."""
    if chat:
        return chat_logprobs(None)
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


@dataclass
class GuardDefaults:
    action: str = "flag"  # policy.ACTIONS
    threshold: float | None = None
    alpha: float | None = None
    abstain_message: str = "I'm not confident enough to answer that."
    max_tokens: int = 256


_SEVERITY = {"ok": 0, "flagged": 1, "dampened": 2, "abstained": 3}


def abstain_tail(sent: str, message: str) -> str:
    """What a streamed abstention adds after the text already sent, which a stream cannot take back:
    the abstention message as a paragraph of its own (none before it when nothing visible was sent)."""
    if not sent.strip():
        return message
    newlines = len(sent) - len(sent.rstrip("\n"))
    return "\n" * max(0, 2 - newlines) + message


def text_choice(index: int, chat: bool, text: str, scores: list[float], logprobs: dict | None = None) -> dict:
    """A stream chunk choice that adds `text`, with the scores of its tokens (none: the abstention message)."""
    choice: dict = {"index": index, "finish_reason": None, "logprobs": logprobs,
                    "hallucination": {"token_scores": scores}}
    choice["delta" if chat else "text"] = {"content": text} if chat else text
    return choice


def finishing_choice(index: int, chat: bool, summary: dict, finish: str) -> dict:
    """The stream chunk choice that ends a choice: its finish reason and the summary, and no text (an
    abstention message comes in the chunk before: litellm splits a finishing chunk with text in two
    and keeps the summary on neither part). The summary also rides in the chat delta, where
    accumulating clients keep it (the openai SDK's stream helper builds `message` from the deltas)."""
    choice: dict = {"index": index, "finish_reason": finish, "logprobs": None, "hallucination": summary}
    choice["delta" if chat else "text"] = {"hallucination": summary} if chat else ""
    return choice


def finishing_chunk(chunk: dict, choices: list[dict]) -> dict:
    """`chunk` (id, object, created, model, ...) as the chunk that ends `choices` (`finishing_choice`s).
    It lists their summaries at its top too, as `hallucinations` (each with its choice's `index`), the
    one place litellm keeps when it rebuilds a finishing chunk that has no text."""
    summaries = [{"index": choice["index"], **choice["hallucination"]} for choice in choices]
    return {**chunk, "choices": choices, "hallucinations": summaries}


def endpoint_name(chat: bool) -> str:
    """The `endpoint` label of a completion request."""
    return "chat" if chat else "completions"


def worst(verdicts) -> str:
    """The most severe of a request's verdicts (its metrics label), "" for none."""
    return max(verdicts, key=_SEVERITY.get, default="")


class Serving:
    def __init__(self, guard: Guard, engine: Engine, model_name: str, defaults: GuardDefaults,
                 metrics: Metrics | None = None) -> None:
        self.guard, self.engine, self.model_name, self.defaults = guard, engine, model_name, defaults
        self.metrics = metrics
        config = guard.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None

    # ---- request -> job -----------------------------------------------------------------------
    def _job(self, request, prompts: list, max_new: int | None) -> Job:
        check_model(request.model, self.model_name)
        check_rows(len(prompts), request.n, self.engine.max_batch_size)
        rows = [encode_prompt(self.guard, prompt) for prompt in prompts]
        longest = max(len(r) for r in rows)
        if max_new is None:  # as vLLM does: the default length never overflows the context
            max_new = self.defaults.max_tokens
            if self.context is not None:
                max_new = min(max_new, self.context - longest)
        if self.context is not None and (max_new < 1 or longest + max_new > self.context):
            param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
            raise context_exceeded(self.context, longest, max(max_new, 1), param)
        options = request.guard
        settings = Settings(
            temperature=request.temperature, top_p=request.top_p, stop=tuple(request.stop or ()), seed=request.seed,
            action=options.action or self.defaults.action,
            threshold=options.threshold if options.threshold is not None else self.defaults.threshold,
            alpha=options.alpha if options.alpha is not None else self.defaults.alpha,
            logprobs=request.logprob_count(),
        )
        rows = [row for row in rows for _ in range(request.n)]
        return Job(rows=rows, max_new_tokens=max_new, settings=settings, loop=asyncio.get_running_loop())

    def chat_job(self, request: ChatCompletionRequest) -> Job:
        return self._job(request, [messages_of(request)], request.max_new_tokens())

    def completion_job(self, request: CompletionRequest) -> Job:
        return self._job(request, prompts_of(request), request.max_new_tokens())

    # ---- accounting ---------------------------------------------------------------------------
    @staticmethod
    def prompt_tokens(job: Job, n: int) -> int:
        return sum(len(job.rows[k]) for k in range(0, len(job.rows), n))

    def record(self, endpoint: str, status: int, job: Job | None = None, results: list[GuardResult] = (),
               n: int = 1) -> None:
        """One finished request (or a refused one, without a job) into the metrics."""
        if self.metrics is None:
            return
        if job is None:
            self.metrics.request(endpoint, status)
            return
        self.metrics.request(endpoint, status, job.settings.action, worst(r.verdict for r in results),
                             self.prompt_tokens(job, n), time.perf_counter() - job.enqueued)

    # ---- job -> response ----------------------------------------------------------------------
    def _hallucination(self, result: GuardResult, token_scores: bool) -> dict:
        return summary(result.probability, result.verdict, result.action, result.flagged_spans,
                       result.token_probs if token_scores else None)

    def _finish(self, result: GuardResult) -> tuple[str, str]:
        if result.finish_reason == "abstain":
            return self.defaults.abstain_message, "content_filter"
        return result.text, result.finish_reason

    async def results(self, job: Job) -> list[GuardResult]:
        results: list[GuardResult] = []
        while (item := await job.events.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GuardResult):
                results.append(item)
        return sorted(results, key=lambda r: r.row)

    def response(self, request, job: Job, results: list[GuardResult], chat: bool) -> dict:
        choices = []
        for i, result in enumerate(results):
            text, finish = self._finish(result)
            choice = {"index": i, "finish_reason": finish,
                      "hallucination": self._hallucination(result, request.guard.token_scores)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
                choice["logprobs"] = self._chat_logprobs(result) if result.logprobs is not None else None
            else:
                choice["text"] = text
                choice["logprobs"] = self._text_logprobs(result) if result.logprobs is not None else None
            choices.append(choice)
        completion = sum(len(r.token_ids) for r in results)
        prompt = self.prompt_tokens(job, request.n)
        return {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _token(self, token_id: int) -> str:
        return self.guard.tokenizer.decode([token_id])

    def _chat_entry(self, token_id: int, entry: Entry) -> dict:
        """One token of the OpenAI chat `logprobs.content` list: its text, bytes, log-probability and
        the alternatives, each with the same fields."""

        def item(t: int, logprob: float) -> dict:
            return {"token": self._token(t), "logprob": logprob, "bytes": token_bytes(self.guard.tokenizer, t)}

        logprob, alternatives = entry
        return {**item(token_id, logprob), "top_logprobs": [item(a, alp) for a, alp in alternatives]}

    def _text_entries(self, token_ids: list[int], entries: list[Entry], offset: int = 0) -> dict:
        """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset);
        `offset`: characters of token text before the first of these tokens."""
        tokens = [self._token(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [{self._token(a): alp for a, alp in alternatives} for _, alternatives in entries],
                "text_offset": offsets}

    def _chat_logprobs(self, result: GuardResult) -> dict:
        """The chat `logprobs` object of a whole choice."""
        if result.verdict == "abstained":
            return withheld_logprobs(chat=True)
        return chat_logprobs([self._chat_entry(t, e) for t, e in zip(result.token_ids, result.logprobs)])

    def _text_logprobs(self, result: GuardResult) -> dict:
        if result.verdict == "abstained":
            return withheld_logprobs(chat=False)
        return self._text_entries(result.token_ids, result.logprobs)

    async def stream(self, request, job: Job, chat: bool) -> AsyncIterator[str]:
        """Server-Sent Events in the OpenAI chunk format; an error mid-stream is an error event (its cause
        is logged, not sent). A stream whose client left is counted with status 499."""
        cid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None, finishing: bool = False) -> str:
            body = {"id": cid, "object": kind, "created": created, "model": self.model_name, "choices": choices}
            # chat chunks carry `usage: null` until the last when usage is asked for, as OpenAI's do; the
            # legacy completions schema has no null usage, so its chunks leave it out until then
            if usage is not None or (chat and request.stream_options and request.stream_options.include_usage):
                body["usage"] = usage
            return f"data: {json.dumps(finishing_chunk(body, choices) if finishing else body)}\n\n"

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(len(job.rows))])
        completion = 0
        results: list[GuardResult] = []
        endpoint = endpoint_name(chat)
        token_chars: dict[int, int] = {}  # per choice: characters of token text so far (text_offset)

        def logprobs(event: TokenEvent) -> dict | None:
            if event.logprob is None:
                return None
            if chat:
                return chat_logprobs([self._chat_entry(event.token_id, event.logprob)])
            entries = self._text_entries([event.token_id], [event.logprob], token_chars.get(event.row, 0))
            token_chars[event.row] = token_chars.get(event.row, 0) + len(entries["tokens"][0])
            return entries

        finished = False
        try:
            while (item := await job.events.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TokenEvent):
                    scores = [item.probability] if item.probability is not None else []
                    yield chunk([text_choice(item.row, chat, item.text, scores, logprobs(item))])
                else:
                    results.append(item)
                    completion += len(item.token_ids)
                    text, finish = self._finish(item)
                    if finish == "content_filter":  # item.text: what was sent
                        yield chunk([text_choice(item.row, chat, abstain_tail(item.text, text), [])])
                    summary = self._hallucination(item, request.guard.token_scores)
                    yield chunk([finishing_choice(item.row, chat, summary, finish)], finishing=True)
        except Exception:  # the stream has started: report in-band, then end it
            finished = True
            log.exception("generation failed mid-stream")
            self.record(endpoint, 500, job)
            body = APIError(500, "generation failed; the server's log has the cause", "server_error").body()
            yield f"data: {json.dumps(body)}\n\n"
        else:
            finished = True
            self.record(endpoint, 200, job, results, request.n)
            if request.stream_options and request.stream_options.include_usage:
                prompt = self.prompt_tokens(job, request.n)
                yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion})
        finally:
            if not finished:  # the client left (the generator was closed or cancelled mid-stream)
                self.record(endpoint, CLIENT_CLOSED, job)
        yield "data: [DONE]\n\n"
