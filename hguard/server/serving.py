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

from ..guard import Guard
from ..logprobs import Entry
from ..metrics import Metrics
from ..results import GuardResult, TokenEvent, summary, token_bytes
from .chunks import (abstain_tail, chat_logprobs, endpoint_name, finishing_choice, finishing_chunk, text_choice,
                     withheld_logprobs, worst)
from .engine import DONE, Engine, Job, QueueFull, Settings
from .errors import CLIENT_CLOSED, APIError, context_exceeded
from .protocol import ChatCompletionRequest, CompletionRequest, new_id, now
from .requests import GuardDefaults, check_model, check_rows, encode_prompt, messages_of, prompts_of

log = logging.getLogger("hguard.server")
class Serving:
    def __init__(self, guard: Guard, engine: Engine, model_name: str, defaults: GuardDefaults,
                 metrics: Metrics | None = None) -> None:
        self.guard, self.engine, self.model_name, self.defaults = guard, engine, model_name, defaults
        self.metrics = metrics
        config = guard.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        reserved = getattr(engine, "max_model_len", None)  # an engine that holds less context (vLLM's)
        if reserved:
            self.context = min(self.context or reserved, reserved)

    # ---- request -> job -----------------------------------------------------------------------
    def _job(self, request, prompts: list, max_new: int | None) -> Job:
        check_model(request.model, self.model_name)
        check_rows(len(prompts), request.n, self.engine.max_batch_size)
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        rows = [encode_prompt(self.guard, prompt, self.context, param) for prompt in prompts]
        longest = max(len(r) for r in rows)
        if max_new is None:  # as vLLM does: the default length never overflows the context
            max_new = self.defaults.max_tokens
            if self.context is not None:
                max_new = min(max_new, self.context - longest)
        if self.context is not None and (max_new < 1 or longest + max_new > self.context):
            raise context_exceeded(self.context, longest, max(max_new, 1), param)
        settings = self._settings(request, max_new)
        rows = [row for row in rows for _ in range(request.n)]
        return Job(rows=rows, max_new_tokens=max_new, settings=settings, loop=asyncio.get_running_loop())

    def _settings(self, request, max_new: int) -> Settings:
        refused = [("ignore_eos", "true", request.ignore_eos),
                   ("skip_special_tokens", "false", request.skip_special_tokens is False),
                   ("return_token_ids", "true", request.return_token_ids),
                   ("return_tokens_as_token_ids", "true", request.return_tokens_as_token_ids)]
        for name, value, sent in refused:
            if sent:
                raise APIError(400, f"{name}={value} is not supported by the hosted engine (a proxy forwards it to "
                               "its upstream)", param=name)
        if request.min_tokens is not None and request.min_tokens > max_new:
            raise APIError(400, f"min_tokens ({request.min_tokens}) is more than the completion's length ({max_new})",
                           param="min_tokens")
        options = request.guard
        return Settings(
            temperature=request.temperature, top_p=request.top_p, stop=tuple(request.stop or ()), seed=request.seed,
            action=options.action or self.defaults.action,
            threshold=options.threshold if options.threshold is not None else self.defaults.threshold,
            alpha=options.alpha if options.alpha is not None else self.defaults.alpha,
            logprobs=request.logprob_count(), top_k=request.top_k, min_p=request.min_p,
            repetition_penalty=request.repetition_penalty, min_tokens=request.min_tokens,
        )

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

    # ---- the mode interface (the proxy has the same two methods) ------------------------------
    def _submitted(self, request, chat: bool) -> Job:
        job = self.chat_job(request) if chat else self.completion_job(request)
        try:
            self.engine.submit(job)
        except QueueFull as error:
            raise APIError(429, str(error), "rate_limit_exceeded", headers={"Retry-After": "1"}) from error
        return job

    async def complete(self, request, chat: bool) -> dict:
        """The response body of a non-streamed request, its metrics recorded: 200, 500 if generation
        failed, 499 if the caller cancelled it (its client left); bad requests raise before anything runs."""
        job = self._submitted(request, chat)
        endpoint = endpoint_name(chat)
        try:
            results = await self.results(job)
        except asyncio.CancelledError:
            self.record(endpoint, CLIENT_CLOSED, job)
            raise
        except Exception:
            self.record(endpoint, 500, job)
            raise
        finally:
            job.cancelled.set()  # done, failed, or the client left: free the rows
        self.record(endpoint, 200, job, results, request.n)
        return self.response(request, job, results, chat)

    async def stream(self, request, chat: bool) -> AsyncIterator[str]:
        """The events of a streamed request (bad requests, and a full queue, raise here, before any
        event); closing them frees the request's rows."""
        job = self._submitted(request, chat)

        async def events():
            try:
                async for event in self._events(request, job, chat):
                    yield event
            finally:
                job.cancelled.set()  # the client left (or the stream ended): free the rows

        return events()

    async def _events(self, request, job: Job, chat: bool) -> AsyncIterator[str]:
        """Server-Sent Events in the OpenAI chunk format; an error mid-stream is an error event (its cause
        is logged, not sent). A stream whose client left is counted with status 499."""
        out = _Chunks(self, request, chat)
        chunk, logprobs = out.chunk, out.logprobs
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(len(job.rows))])
        completion = 0
        results: list[GuardResult] = []
        endpoint = endpoint_name(chat)
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


class _Chunks:
    """One stream's SSE chunks in the OpenAI format, and each streamed token's logprobs entry."""

    def __init__(self, serving: Serving, request, chat: bool) -> None:
        self.serving, self.request, self.chat = serving, request, chat
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.token_chars: dict[int, int] = {}  # per choice: characters of token text so far (text_offset)

    def chunk(self, choices: list[dict], usage: dict | None = None, finishing: bool = False) -> str:
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.serving.model_name,
                "choices": choices}
        # chat chunks carry `usage: null` until the last when usage is asked for, as OpenAI's do; the
        # legacy completions schema has no null usage, so its chunks leave it out until then
        if usage is not None or (self.chat and self.request.stream_options and self.request.stream_options.include_usage):
            body["usage"] = usage
        return f"data: {json.dumps(finishing_chunk(body, choices) if finishing else body)}\n\n"

    def logprobs(self, event: TokenEvent) -> dict | None:
        if event.logprob is None:
            return None
        if self.chat:
            return chat_logprobs([self.serving._chat_entry(event.token_id, event.logprob)])
        offset = self.token_chars.get(event.row, 0)
        entries = self.serving._text_entries([event.token_id], [event.logprob], offset)
        self.token_chars[event.row] = offset + len(entries["tokens"][0])
        return entries
