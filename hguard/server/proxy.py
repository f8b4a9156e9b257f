"""Proxy mode: forward OpenAI requests to an upstream server (vLLM, or any compatible one) and score
what it returns with a local copy of the same weights, in a teacher-forced pass.

The upstream's text is re-tokenised with the local tokenizer; the scores describe those tokens (for
greedy text from the same tokenizer they are the upstream's tokens). While streaming, each new piece
is scored incrementally (a KV cache holds the prompt and the tokens scored so far, see
incremental.py) and each chunk carries the scores of the tokens that became final;
abstain cuts the stream once the running probability reaches the watch threshold. Requested logprobs
are the upstream's, relayed as they come. Dampen needs the upstream's activations, so it is refused
(400). An unreachable upstream is 502, a slow one 504.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator

import httpx

from ..guard import Guard
from ..incremental import IncrementalScorer
from ..metrics import Metrics
from ..policy import Policy, flagged_spans, running_peak, verdict
from ..results import char_offset
from .serving import (APIError, GuardDefaults, check_model, encode_prompt, messages_of, prompts_of,
                      endpoint_name, withheld_logprobs, worst)


class Proxy:
    def __init__(self, guard: Guard, upstream: str, model_name: str, defaults: GuardDefaults,
                 timeout: float = 60.0, api_key: str | None = None, max_streams: int = 288,
                 metrics: Metrics | None = None) -> None:
        self.guard, self.model_name, self.defaults = guard, model_name, defaults
        self.max_streams = max_streams  # each open stream keeps a KV cache of the local weights
        self.streams = 0  # open streams, counted from admission (before the upstream answers) to their end
        self.metrics = metrics  # proxied answers count like hosted ones (errors: where they are rendered)
        # the paths below start with /v1; an OpenAI-style base URL (".../v1") means the same server
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no pool limit of its own: the streams are bounded above, and a pool smaller than that bound
        # would turn healthy but busy upstream connections into timeouts
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def close(self) -> None:
        await self.client.aclose()

    def policy(self, request) -> Policy:
        options = request.guard
        action = options.action or self.defaults.action
        if action in ("dampen", "scale"):
            raise APIError(400, f"guard.action '{action}' needs the model's activations, which a proxied upstream "
                           "does not expose; use 'flag' or 'abstain', or host the model", param="guard.action")
        threshold = options.threshold if options.threshold is not None else self.defaults.threshold
        return self.guard.policy(action, threshold)

    def _forward_body(self, request) -> dict:
        """What the client sent, as it sent it: a field it left out stays out, so the upstream's own
        defaults (vLLM's from the model's generation config) apply."""
        body = request.model_dump(exclude_unset=True, exclude={"guard"})
        body.pop("user", None)
        return body

    def _prompt(self, request, chat: bool) -> list[int]:
        """The prompt's token ids, encoded once per request (client errors become 400/422 here)."""
        if chat:
            return encode_prompt(self.guard, messages_of(request))
        prompts = prompts_of(request)
        if len(prompts) != 1:
            raise APIError(400, "proxy mode scores one prompt per request", param="prompt")
        return encode_prompt(self.guard, prompts[0])

    async def _post(self, path: str, body: dict, stream: bool):
        try:
            request = self.client.build_request("POST", f"{self.upstream}{path}", json=body)
            response = await self.client.send(request, stream=stream)
        except httpx.TimeoutException as error:
            raise APIError(504, f"the upstream at {self.upstream} timed out", "upstream_timeout") from error
        except httpx.HTTPError as error:
            raise APIError(502, f"the upstream at {self.upstream} is unreachable: {error}", "upstream_error") from error
        if response.status_code >= 400:
            payload = (await response.aread()) if stream else response.content
            await response.aclose()
            raise _upstream_error(response.status_code, payload, response.headers)
        return response

    async def _score(self, prompt, text: str):
        if not text:
            return None
        return await asyncio.to_thread(self.guard.score, prompt, text)

    def _report(self, policy: Policy, scores, text: str, token_scores: bool, abstained: bool) -> dict:
        """A finished choice's `hallucination` object; the answer goes into the metrics too."""
        report = self._summary(policy, scores, text, token_scores, abstained)
        if self.metrics is not None:
            self.metrics.answer(scores.token_probs if scores is not None else [], report["probability"],
                                report["verdict"], policy.threshold)
        return report

    def _summary(self, policy: Policy, scores, text: str, token_scores: bool, abstained: bool) -> dict:
        if scores is None:
            return {"probability": None, "verdict": "ok", "action": policy.action, "flagged_spans": []}
        probability = scores.probability
        ids, tokenizer = scores.token_ids, self.guard.tokenizer
        spans = [
            {"start": char_offset(tokenizer, ids, a, text), "end": char_offset(tokenizer, ids, b, text),
             "probability": p}
            for a, b, p in flagged_spans(scores.token_probs, policy.threshold)
        ]
        report = {"probability": probability, "verdict": verdict(policy, probability, abstained),
                  "action": policy.action, "flagged_spans": spans}
        if token_scores:
            report["token_scores"] = scores.token_probs
        return report

    async def complete(self, request, chat: bool) -> dict:
        check_model(request.model, self.model_name)
        policy = self.policy(request)
        prompt = self._prompt(request, chat)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = await self._complete(request, chat, policy, prompt, path)
        self._count(chat, policy, [choice["hallucination"]["verdict"] for choice in body.get("choices", [])], prompt)
        return body

    def _count(self, chat: bool, policy: Policy, verdicts: list[str], prompt: list[int]) -> None:
        if self.metrics is not None:
            self.metrics.request(endpoint_name(chat), 200, policy.action, worst(verdicts), len(prompt))

    async def _complete(self, request, chat: bool, policy: Policy, prompt: list[int], path: str) -> dict:
        response = await self._post(path, self._forward_body(request), stream=False)
        try:
            body = response.json()
        except ValueError as error:
            raise APIError(502, "the upstream answered with something that is not JSON", "upstream_error") from error
        for choice in body.get("choices", []):
            text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            text = text or ""
            scores = await self._score(prompt, text)
            abstained = policy.action == "abstain" and scores is not None and \
                running_peak(scores.token_logits, self.guard.probe.calibration) >= policy.trigger
            choice["hallucination"] = self._report(policy, scores, text, request.guard.token_scores, abstained)
            if abstained:
                choice["finish_reason"] = "content_filter"
                if chat:
                    choice["message"]["content"] = self.defaults.abstain_message
                else:
                    choice["text"] = self.defaults.abstain_message
                if choice.get("logprobs") is not None:
                    choice["logprobs"] = withheld_logprobs(chat)
        body["model"] = self.model_name
        return body

    async def stream(self, request, chat: bool) -> AsyncIterator[str]:
        check_model(request.model, self.model_name)
        policy = self.policy(request)
        prompt = self._prompt(request, chat)
        if self.streams >= self.max_streams:
            raise APIError(429, f"{self.max_streams} proxied streams are open; retry later", "rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        path = "/v1/chat/completions" if chat else "/v1/completions"
        slot = _Slot(self)  # taken before waiting on the upstream, so that requests arriving together count
        try:
            response = await self._post(path, self._forward_body(request), stream=True)
        except APIError:
            slot.release()
            raise
        relay = self._relay(response, request, policy, prompt, chat, slot)
        weakref.finalize(relay, slot.release)  # a response never iterated (the client left at once)
        return relay

    async def _relay(self, response, request, policy: Policy, prompt, chat: bool, slot: "_Slot") -> AsyncIterator[str]:
        texts: dict[int, str] = {}
        scorers: dict[int, IncrementalScorer] = {}  # per choice: each token runs through the model once
        sent: dict[int, int] = {}  # tokens whose scores were already sent, per choice
        stopped: set[int] = set()
        verdicts: list[str] = []
        tokens: dict[int, int] = {}  # local tokens of each choice's text so far
        usage_sent, last = False, {}
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].removeprefix(" ")  # SSE: one space after the colon is optional
                if data.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    body = APIError(502, "the upstream sent a malformed stream event", "upstream_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                if "error" in chunk:
                    yield f"data: {json.dumps(chunk)}\n\n"
                    continue
                chunk["model"] = self.model_name
                last = chunk
                usage_sent = usage_sent or chunk.get("usage") is not None
                keep = []
                for choice in chunk.get("choices", []):
                    index = choice.get("index", 0)
                    if index in stopped:
                        continue
                    piece = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                    texts[index] = texts.get(index, "") + piece
                    if index not in scorers:
                        scorers[index] = IncrementalScorer(self.guard, prompt)
                    try:
                        scores = await asyncio.to_thread(scorers[index].score, texts[index])
                    except Exception as error:  # the client gets it as the stream's last event
                        raise _ScoringFailed(f"{type(error).__name__}: {error}") from error
                    final = choice.get("finish_reason") is not None
                    if scores is not None:
                        tokens[index] = len(scores.token_ids)
                        # all but the last token are stable under re-tokenisation until the choice ends
                        ready = len(scores.token_ids) if final else max(0, len(scores.token_ids) - 1)
                        new = scores.token_probs[sent.get(index, 0): ready]
                        sent[index] = max(sent.get(index, 0), ready)
                        choice["hallucination"] = {"token_scores": new}
                        peak = running_peak(scores.token_logits[:ready], self.guard.probe.calibration)
                        if policy.action == "abstain" and peak >= policy.trigger and not final:
                            choice["finish_reason"] = "content_filter"
                            final = True
                            stopped.add(index)
                    if final:
                        choice["hallucination"] = {
                            **self._report(policy, scores, texts[index], request.guard.token_scores,
                                           choice["finish_reason"] == "content_filter"),
                            "token_scores": choice.get("hallucination", {}).get("token_scores", []),
                        }
                        verdicts.append(choice["hallucination"]["verdict"])
                    keep.append(choice)
                if keep or not chunk.get("choices"):
                    chunk["choices"] = keep
                    yield f"data: {json.dumps(chunk)}\n\n"
                if len(stopped) >= request.n:
                    # every choice abstained: stop reading (closing the response ends the upstream's work);
                    # the usage the client asked for is counted here, since the upstream's will not come
                    include = request.stream_options is not None and request.stream_options.include_usage
                    if include and not usage_sent:
                        yield f"data: {json.dumps(self._usage_chunk(last, len(prompt), sum(tokens.values())))}\n\n"
                    break
        except httpx.HTTPError as error:
            body = APIError(502, f"the upstream stream failed: {error}", "upstream_error").body()
            yield f"data: {json.dumps(body)}\n\n"
        except _ScoringFailed as error:
            yield f"data: {json.dumps(APIError(500, f'scoring failed: {error}', 'server_error').body())}\n\n"
        finally:
            slot.release()
            self._count(chat, policy, verdicts, prompt)
            scorers.clear()  # the KV caches go now, not when the response object does
            await response.aclose()
        yield "data: [DONE]\n\n"

    def _usage_chunk(self, last: dict, prompt: int, completion: int) -> dict:
        """The usage chunk the upstream would have sent last, counted in local tokens."""
        return {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
                "created": last.get("created", 0), "model": self.model_name, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


class _ScoringFailed(Exception):
    """Scoring a streamed choice failed (the stream ends with an error event)."""


class _Slot:
    """One admitted stream's place in `Proxy.streams`, given back exactly once."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy, self.held = proxy, True
        proxy.streams += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.proxy.streams -= 1


def _upstream_error(status: int, payload: bytes, headers) -> APIError:
    """The upstream's error as this server's: its message, param and code where its body is OpenAI's
    shape (or TGI's, an `error` string); 5xx, and an upstream that refuses this server's own key
    (401, 403: a misconfigured server, not the client's fault), become 502; a 429 keeps Retry-After."""
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message, param, code = error.get("message") or "upstream error", error.get("param"), error.get("code")
    elif isinstance(error, str):
        message, param, code = error, None, None
    else:
        message, param, code = payload.decode(errors="replace")[:500] or "upstream error", None, None
    retry = {"Retry-After": headers["retry-after"]} if status == 429 and "retry-after" in headers else None
    if status >= 500 or status in (401, 403):
        status = 502
    return APIError(status, f"upstream: {message}", "upstream_error", param=param if isinstance(param, str) else None,
                    code=str(code) if code is not None else None, headers=retry)
