"""Hosted mode: OpenAI requests in, engine jobs out, and engine events back as OpenAI responses.

`Hosted` serves one endpoint (`HostedChat`, `HostedCompletion`; see endpoint.py) with the model in this
process: it owns the guard's defaults (action, threshold, alpha, abstention message) and the context
limit; it turns a validated request into a `Job` for the engine, which every endpoint's serving shares,
and the job's events into one response body or a sequence of Server-Sent Events. Routes stay thin and
never see tokens.
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
from .chunks import abstain_tail, chat_logprobs, finishing_chunk
from .endpoint import CHAT, COMPLETION, Serving
from .engine import DONE, Engine, Job, QueueFull, Settings
from .errors import CLIENT_CLOSED, APIError, context_exceeded
from .protocol import new_id, now
from .requests import GuardDefaults, check_model, check_rows, encode_prompt

log = logging.getLogger("hguard.server")


class Hosted(Serving):
    """An endpoint served by the model in this process (subclasses: one per endpoint, with its logprobs)."""

    def __init__(self, guard: Guard, engine: Engine, model_name: str, defaults: GuardDefaults,
                 metrics: Metrics | None = None) -> None:
        super().__init__(guard, model_name, defaults, metrics)
        self.engine = engine
        config = guard.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        reserved = getattr(engine, "max_model_len", None)  # an engine that holds less context (vLLM's)
        if reserved:
            self.context = min(self.context or reserved, reserved)

    # ---- request -> job -----------------------------------------------------------------------
    def job(self, request) -> Job:
        prompts, max_new = self.endpoint.prompts(request), request.max_new_tokens()
        check_model(request.model, self.model_name)
        check_rows(len(prompts), request.n, self.engine.max_batch_size)
        param = self.endpoint.param
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

    # ---- accounting ---------------------------------------------------------------------------
    @staticmethod
    def prompt_tokens(job: Job, n: int) -> int:
        return sum(len(job.rows[k]) for k in range(0, len(job.rows), n))

    def _record_job(self, status: int, job: Job, results: list[GuardResult] = (), n: int = 1) -> None:
        """One finished request into the metrics."""
        self.record(status, job.settings.action, (r.verdict for r in results), self.prompt_tokens(job, n),
                    time.perf_counter() - job.enqueued)

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

    def response(self, request, job: Job, results: list[GuardResult]) -> dict:
        endpoint = self.endpoint
        choices = []
        for i, result in enumerate(results):
            text, finish = self._finish(result)
            choice = {"index": i, "finish_reason": finish,
                      "hallucination": self._hallucination(result, request.guard.token_scores)}
            endpoint.set_answer_text(choice, text)
            choice["logprobs"] = self._logprobs(result) if result.logprobs is not None else None
            choices.append(choice)
        completion = sum(len(r.token_ids) for r in results)
        prompt = self.prompt_tokens(job, request.n)
        return {
            "id": new_id(endpoint.id_prefix),
            "object": endpoint.object,
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _token(self, token_id: int) -> str:
        return self.guard.tokenizer.decode([token_id])

    def _logprobs(self, result: GuardResult) -> dict:
        """The `logprobs` object of a whole choice."""
        if result.verdict == "abstained":
            return self.endpoint.withheld_logprobs()
        return self._answer_logprobs(result)

    def _answer_logprobs(self, result: GuardResult) -> dict:
        """The endpoint's `logprobs` object of a whole answer's tokens."""
        raise NotImplementedError

    def token_logprobs(self, event: TokenEvent, offsets: dict[int, int]) -> dict:
        """The endpoint's `logprobs` object of one streamed token; `offsets`: per choice, the characters of
        token text streamed before it (updated)."""
        raise NotImplementedError

    # ---- the mode interface (the proxy's servings have the same two methods) -------------------
    def _submitted(self, request) -> Job:
        job = self.job(request)
        try:
            self.engine.submit(job)
        except QueueFull as error:
            raise APIError(429, str(error), "rate_limit_exceeded", headers={"Retry-After": "1"}) from error
        return job

    async def complete(self, request) -> dict:
        """The response body of a non-streamed request, its metrics recorded: 200, 500 if generation
        failed, 499 if the caller cancelled it (its client left); bad requests raise before anything runs."""
        job = self._submitted(request)
        try:
            results = await self.results(job)
        except asyncio.CancelledError:
            self._record_job(CLIENT_CLOSED, job)
            raise
        except Exception:
            self._record_job(500, job)
            raise
        finally:
            job.cancelled.set()  # done, failed, or the client left: free the rows
        self._record_job(200, job, results, request.n)
        return self.response(request, job, results)

    async def stream(self, request) -> AsyncIterator[str]:
        """The events of a streamed request (bad requests, and a full queue, raise here, before any
        event); closing them frees the request's rows."""
        job = self._submitted(request)

        async def events():
            try:
                async for event in self._events(request, job):
                    yield event
            finally:
                job.cancelled.set()  # the client left (or the stream ended): free the rows

        return events()

    async def _events(self, request, job: Job) -> AsyncIterator[str]:
        """Server-Sent Events in the OpenAI chunk format; an error mid-stream is an error event (its cause
        is logged, not sent). A stream whose client left is counted with status 499."""
        out, endpoint = _Chunks(self, request), self.endpoint
        chunk, logprobs = out.chunk, out.logprobs
        if opening := endpoint.opening(len(job.rows)):
            yield chunk(opening)
        completion = 0
        results: list[GuardResult] = []
        finished = False
        try:
            while (item := await job.events.get()) is not DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, TokenEvent):
                    scores = [item.probability] if item.probability is not None else []
                    yield chunk([endpoint.text_choice(item.row, item.text, scores, logprobs(item))])
                else:
                    results.append(item)
                    completion += len(item.token_ids)
                    text, finish = self._finish(item)
                    if finish == "content_filter":  # item.text: what was sent
                        yield chunk([endpoint.text_choice(item.row, abstain_tail(item.text, text), [])])
                    summary = self._hallucination(item, request.guard.token_scores)
                    yield chunk([endpoint.finishing_choice(item.row, summary, finish)], finishing=True)
        except Exception:  # the stream has started: report in-band, then end it
            finished = True
            log.exception("generation failed mid-stream")
            self._record_job(500, job)
            body = APIError(500, "generation failed; the server's log has the cause", "server_error").body()
            yield f"data: {json.dumps(body)}\n\n"
        else:
            finished = True
            self._record_job(200, job, results, request.n)
            if request.stream_options and request.stream_options.include_usage:
                prompt = self.prompt_tokens(job, request.n)
                yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion})
        finally:
            if not finished:  # the client left (the generator was closed or cancelled mid-stream)
                self._record_job(CLIENT_CLOSED, job)
        yield "data: [DONE]\n\n"


class HostedChat(Hosted):
    """/v1/chat/completions, hosted: logprobs as OpenAI's chat `logprobs.content` lists."""

    endpoint = CHAT

    def _entry(self, token_id: int, entry: Entry) -> dict:
        """One token of the OpenAI chat `logprobs.content` list: its text, bytes, log-probability and
        the alternatives, each with the same fields."""

        def item(t: int, logprob: float) -> dict:
            return {"token": self._token(t), "logprob": logprob, "bytes": token_bytes(self.guard.tokenizer, t)}

        logprob, alternatives = entry
        return {**item(token_id, logprob), "top_logprobs": [item(a, alp) for a, alp in alternatives]}

    def _answer_logprobs(self, result: GuardResult) -> dict:
        return chat_logprobs([self._entry(t, e) for t, e in zip(result.token_ids, result.logprobs)])

    def token_logprobs(self, event: TokenEvent, offsets: dict[int, int]) -> dict:
        return chat_logprobs([self._entry(event.token_id, event.logprob)])


class HostedCompletion(Hosted):
    """/v1/completions, hosted: logprobs as the legacy completions object."""

    endpoint = COMPLETION

    def _entries(self, token_ids: list[int], entries: list[Entry], offset: int = 0) -> dict:
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

    def _answer_logprobs(self, result: GuardResult) -> dict:
        return self._entries(result.token_ids, result.logprobs)

    def token_logprobs(self, event: TokenEvent, offsets: dict[int, int]) -> dict:
        offset = offsets.get(event.row, 0)
        entries = self._entries([event.token_id], [event.logprob], offset)
        offsets[event.row] = offset + len(entries["tokens"][0])
        return entries


class _Chunks:
    """One stream's SSE chunks in its endpoint's format, and each streamed token's logprobs entry."""

    def __init__(self, serving: Hosted, request) -> None:
        self.serving, self.request, endpoint = serving, request, serving.endpoint
        self.id, self.created = new_id(endpoint.id_prefix), now()
        self.kind = endpoint.chunk_object
        options = request.stream_options
        self.usage_null = endpoint.usage_null and bool(options and options.include_usage)
        self.token_chars: dict[int, int] = {}  # per choice: characters of token text so far (text_offset)

    def chunk(self, choices: list[dict], usage: dict | None = None, finishing: bool = False) -> str:
        body = {"id": self.id, "object": self.kind, "created": self.created, "model": self.serving.model_name,
                "choices": choices}
        if usage is not None or self.usage_null:
            body["usage"] = usage
        return f"data: {json.dumps(finishing_chunk(body, choices) if finishing else body)}\n\n"

    def logprobs(self, event: TokenEvent) -> dict | None:
        if event.logprob is None:
            return None
        return self.serving.token_logprobs(event, self.token_chars)
