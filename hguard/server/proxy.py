"""Proxy mode: forward OpenAI requests to an upstream server (vLLM, or any compatible one) and score
what it returns with a local copy of the same weights, in a teacher-forced pass.

A vLLM upstream is asked for its token ids, and where its prompt ids are the local ones the scores
describe exactly the tokens it sampled (token_ids.py); any other upstream's text is re-tokenised with
the local tokenizer, and the scores describe those tokens (for greedy text from the same tokenizer,
the upstream's). `Proxy` holds what every proxied endpoint shares (the upstream, the scoring batches,
the open streams); `Proxied` serves one endpoint (`ProxiedChat`, `ProxiedCompletion`; see endpoint.py)
over it. Abstain cuts an answer where
hosted generation would (`Proxied.cut`), so a client sees the same text, finish reason and scores in
both modes; streams are relayed by relay.py. Scoring is bounded by the scoring model's context and
runs in turns (scoring.py); the upstream is untrusted (upstream.py: what it sends is validated, its
failures are clean 502s and 504s). Requested logprobs are the upstream's, relayed as they come.
Dampen needs the upstream's activations, so it is refused (400).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator

import torch

from ..guard import Guard
from ..metrics import Metrics
from ..policy import Policy, verdict
from ..results import Scores, char_offset, spans_of, summary
from .relay import Relay, trigger_index, watched
from .scoring import Scoring, Window
from .endpoint import CHAT, COMPLETION, Serving
from .errors import CLIENT_CLOSED, APIError, context_exceeded
from .requests import GuardDefaults, check_model, encode_prompt
from .upstream import Upstream, broken, relayed_error
from .token_ids import ANSWER_IDS, PROMPT_IDS, answer_ids, scorable, strip
from .upstream_schema import ShapeError


class Proxy:
    """What a proxy's endpoints share: the upstream, the scoring model's context and batches, and the
    open streams."""

    def __init__(self, guard: Guard, upstream: str, timeout: float = 60.0, api_key: str | None = None,
                 max_streams: int = 288) -> None:
        self.guard = guard
        self.max_streams = max_streams  # each open stream keeps a KV cache of the local weights
        self.streams = 0  # open streams, counted from admission (before the upstream answers) to their end
        self.upstream = Upstream(upstream, timeout, api_key)
        config = guard.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 20
        self.scoring = Scoring(guard, self.context)
        self.vocab = guard.model.get_input_embeddings().weight.shape[0]
        self.eos = guard._eos_ids()

    async def close(self) -> None:
        await self.upstream.close()

    def admit(self) -> "_Slot":
        """A place for one more stream, taken before waiting on the upstream, so that requests arriving
        together count (429 when all are taken)."""
        if self.streams >= self.max_streams:
            raise APIError(429, f"{self.max_streams} proxied streams are open; retry later", "rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        return _Slot(self)

    def own_ids(self, upstream_prompt: object, ids: list[int] | None, choice: dict, prompt: list[int]) -> list[int] | None:
        """The answer's ids to score as they are: the upstream's, where it returned them along with the
        local prompt's very ids (None: the text is re-tokenised)."""
        if ids is None or upstream_prompt != prompt:
            return None
        return answer_ids(scorable(ids, self.vocab), choice, self.eos)


class Proxied(Serving):
    """An endpoint served by forwarding to the upstream and scoring its answers (subclasses: one per
    endpoint)."""

    def __init__(self, proxy: Proxy, model_name: str, defaults: GuardDefaults, metrics: Metrics | None = None) -> None:
        super().__init__(proxy.guard, model_name, defaults, metrics)  # proxied answers count like hosted ones
        self.proxy = proxy

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

    async def _forward(self, request, policy: Policy | None) -> dict:
        """`_forward_body`, asking a vLLM upstream for its token ids where the answer is scored (the
        client sees them only if it asked: `strip`)."""
        body = self._forward_body(request)
        if policy is not None and await self.proxy.upstream.is_vllm():
            body["return_token_ids"] = True
        return body

    def _prompt(self, request) -> list[int]:
        """The prompt's token ids, encoded once per request (client errors become 400/422 here). A prompt
        that leaves no room in the scoring model's context is refused, as hosting it would be."""
        prompts, param, context = self.endpoint.prompts(request), self.endpoint.param, self.proxy.context
        if len(prompts) != 1:
            raise APIError(400, "proxy mode scores one prompt per request", param="prompt")
        ids = encode_prompt(self.guard, prompts[0], context, param)
        if len(ids) >= context:
            raise context_exceeded(context, len(ids), 1, param)
        return ids

    def report(self, policy: Policy | None, scores: Scores | None, text: str, token_scores: bool,
               abstained: bool, scored_chars: int | None = None) -> dict:
        """A finished choice's `hallucination` object (`scores` and `text`: the answer kept); the answer
        goes into the metrics too. `scored_chars`: where scoring stopped, for an answer that ran past the
        scoring model's context (None: all of it was scored)."""
        if policy is None:  # the guard is off: nothing was scored
            return summary(None, "ok", "off", [])
        report = self._summary(policy, scores, text, token_scores, abstained)
        if scored_chars is not None:
            report["scored_chars"] = scored_chars
        if self.metrics is not None:
            self.metrics.answer(scores.token_probs if scores is not None else [], report["probability"],
                                report["verdict"], policy.threshold)
        return report

    def _summary(self, policy: Policy, scores, text: str, token_scores: bool, abstained: bool) -> dict:
        if scores is None:
            return summary(None, "ok", policy.action, [])
        spans = spans_of(self.guard.tokenizer, scores.token_ids, scores.token_probs, policy.threshold, text)
        return summary(scores.probability, verdict(policy, scores.probability, abstained), policy.action, spans,
                       scores.token_probs if token_scores else None)

    async def complete(self, request) -> dict:
        check_model(request.model, self.model_name)
        policy = self.policy(request)
        prompt = self._prompt(request)
        try:
            body = await self._complete(request, policy, prompt)
        except asyncio.CancelledError:  # the client left: its scoring stopped after the forward under way
            self.count(policy, [], prompt, CLIENT_CLOSED)
            raise
        self.count(policy, [choice["hallucination"]["verdict"] for choice in body.get("choices", [])], prompt)
        return body

    def count(self, policy: Policy | None, verdicts: list[str], prompt: list[int], status: int = 200) -> None:
        self.record(status, policy.action if policy is not None else "off", verdicts, len(prompt))

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

    async def _complete(self, request, policy: Policy, prompt: list[int]) -> dict:
        endpoint = self.endpoint
        data = await self.proxy.upstream.body(endpoint.path, await self._forward(request, policy))
        if isinstance(data, dict) and "error" in data:  # an error sent with a 2xx
            raise relayed_error(502, data)
        try:
            body = endpoint.upstream_answer(data, request.n)
        except ShapeError as error:
            raise broken(str(error)) from None
        choices = body["choices"]
        windows = [self.proxy.scoring.window(prompt) if policy is not None else None for _ in choices]
        # every choice's answer in the same batches
        all_scores = await asyncio.gather(*(self._score(w, body, c, prompt) for w, c in zip(windows, choices)))
        shown = request.return_token_ids is True  # the client asked for the ids too
        for choice, window, scores in zip(choices, windows, all_scores):
            text = endpoint.answer_text(choice) or ""
            finish = choice["finish_reason"] if window is None or not window.full else "stop"
            scores, abstained = self.cut(policy, scores, watched(scores, finish))
            kept = text[:char_offset(self.guard.tokenizer, scores.token_ids, len(scores.token_ids), text)] \
                if abstained else text
            scored = window.scored_chars(text) if window is not None and not abstained else None
            choice["hallucination"] = self.report(policy, scores, kept, request.guard.token_scores, abstained, scored)
            if abstained:
                choice["finish_reason"] = "content_filter"
                endpoint.set_answer_text(choice, self.defaults.abstain_message)
                if choice.get("logprobs") is not None:
                    choice["logprobs"] = endpoint.withheld_logprobs()
                if choice.get(ANSWER_IDS) is not None:
                    choice[ANSWER_IDS] = []  # like its logprobs: the message is not the model's tokens
        if not shown:
            strip(body)
        body["model"] = self.model_name
        return body

    async def _score(self, window: Window | None, body: dict, choice: dict, prompt: list[int]) -> Scores | None:
        """The scores of one choice of a whole answer (None: not scored)."""
        if window is None:
            return None
        endpoint = self.endpoint
        ids = self.proxy.own_ids(endpoint.upstream_prompt(body.get(PROMPT_IDS), choice.get(PROMPT_IDS)),
                                 choice.get(ANSWER_IDS), choice, prompt)
        return await window.score(endpoint.answer_text(choice) or "", ids)

    async def stream(self, request) -> AsyncIterator[str]:
        """The upstream's stream, relayed with scores (see relay.py)."""
        check_model(request.model, self.model_name)
        policy = self.policy(request)
        prompt = self._prompt(request)
        slot = self.proxy.admit()
        try:
            body = await self._forward(request, policy)
            response, events = await self.proxy.upstream.events(self.endpoint.path, body)
        except APIError:
            slot.release()
            raise
        relay = Relay(self, response, events, request, policy, prompt, slot)
        try:
            await relay.start()  # the first event: an upstream that fails before it is a 502 or 504 status
        except BaseException:
            slot.release()
            events.close()
            await response.aclose()
            raise
        relay = relay.events()
        weakref.finalize(relay, slot.release)  # a response never iterated (the client left at once)
        return relay


class ProxiedChat(Proxied):
    """/v1/chat/completions, proxied."""

    endpoint = CHAT


class ProxiedCompletion(Proxied):
    """/v1/completions, proxied (one prompt per request: each choice is scored against it)."""

    endpoint = COMPLETION


class _Slot:
    """One admitted stream's place in `Proxy.streams`, given back exactly once."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy, self.held = proxy, True
        proxy.streams += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.proxy.streams -= 1
