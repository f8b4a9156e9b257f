"""Proxy mode: forward OpenAI requests to an upstream server (vLLM, or any compatible one) and score
what it returns with a local copy of the same weights, in a teacher-forced pass.

The upstream's text is re-tokenised with the local tokenizer; the scores describe those tokens (for
greedy text from the same tokenizer they are the upstream's tokens). Abstain cuts an answer where
hosted generation would (`Proxy.cut`), so a client sees the same text, finish reason and scores in
both modes; streams are relayed by relay.py, each new piece scored incrementally (incremental.py).
Requested logprobs are the upstream's, relayed as they come. Dampen needs the upstream's activations,
so it is refused (400). An unreachable upstream is 502, a slow one 504.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator

import httpx
import torch

from ..guard import Guard
from ..metrics import Metrics
from ..policy import Policy, flagged_spans, verdict
from ..results import Scores, char_offset
from .relay import Relay, conform, trigger_index, watched
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

    def policy(self, request) -> Policy | None:
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

    def report(self, policy: Policy | None, scores: Scores | None, text: str, token_scores: bool,
               abstained: bool) -> dict:
        """A finished choice's `hallucination` object (`scores` and `text`: the answer kept); the answer
        goes into the metrics too."""
        if policy is None:  # the guard is off: nothing was scored
            return {"probability": None, "verdict": "ok", "action": None, "flagged_spans": []}
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
        self.count(chat, policy, [choice["hallucination"]["verdict"] for choice in body.get("choices", [])], prompt)
        return body

    def count(self, chat: bool, policy: Policy | None, verdicts: list[str], prompt: list[int]) -> None:
        if self.metrics is not None:
            action = policy.action if policy is not None else "off"
            self.metrics.request(endpoint_name(chat), 200, action, worst(verdicts), len(prompt))

    def cut(self, policy: Policy | None, scores: Scores | None, watched: int) -> tuple[Scores | None, bool]:
        """Where abstain stops an answer, as hosted generation does: `scores` up to and including the
        token at which the running mean reached the trigger, and True; else `scores` and False.
        `watched`: how many leading tokens the policy may act on."""
        if policy is None or policy.action != "abstain" or scores is None:
            return scores, False
        calibration = self.guard.probe.calibration
        at = trigger_index(scores.token_logits[:watched], calibration, policy.trigger)
        if at is None:
            return scores, False
        kept = at + 1
        logits = torch.tensor(scores.token_logits[:kept], dtype=torch.float64)
        return Scores.of(scores.token_ids[:kept], logits, calibration), True

    async def _complete(self, request, chat: bool, policy: Policy, prompt: list[int], path: str) -> dict:
        response = await self._post(path, self._forward_body(request), stream=False)
        try:
            body = response.json()
        except ValueError as error:
            raise APIError(502, "the upstream answered with something that is not JSON", "upstream_error") from error
        for choice in body.get("choices", []):
            conform(choice, chat)
            text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
            text = text or ""
            scores = await self._score(prompt, text) if policy is not None else None
            scores, abstained = self.cut(policy, scores, watched(scores, choice.get("finish_reason")))
            kept = text[:char_offset(self.guard.tokenizer, scores.token_ids, len(scores.token_ids), text)] \
                if abstained else text
            choice["hallucination"] = self.report(policy, scores, kept, request.guard.token_scores, abstained)
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
        """The upstream's stream, relayed with scores (see relay.py)."""
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
        relay = Relay(self, response, request, policy, prompt, chat, slot).events()
        weakref.finalize(relay, slot.release)  # a response never iterated (the client left at once)
        return relay


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
