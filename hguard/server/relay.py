"""A proxied stream: the upstream's chunks relayed to the client, each with the scores of its tokens.

The upstream's text is re-tokenised locally as it grows, and its last token can still change (a chunk
that ends inside a word), so the relay holds that token's text back until the next chunk or the end
of the choice settles it: every chunk carries exactly the text of the tokens whose scores it carries,
as a hosted stream's chunks do. Abstain stops a choice where hosted generation would, at the token
whose running mean reaches the trigger: that token's text is the last sent, the abstention message
follows (`abstain_tail`), then the finishing chunk with the summary; the rest of the upstream's answer
is never sent. A choice that the upstream ends gets the same finishing chunk (no text of its own).
Past the scoring window (scoring.py) the text goes out as it comes, unscored, and the summary says
where scoring stopped. Requested logprobs are the upstream's, relayed in the chunk that brought them.

Every upstream event is validated before it is used (upstream_schema.py). A stream that fails before
its first event is an HTTP error (`start`); after that, a broken, stalled or erroring upstream, or a
failed scoring, ends the stream with one error event and `[DONE]`, as does an upstream stream that
ends before all its choices did. A stream whose client left is counted with status 499.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import torch

from ..results import Scores, decode
from .chunks import abstain_tail, finishing_choice, finishing_chunk, text_choice
from .errors import CLIENT_CLOSED, APIError
from .upstream import broken, relayed_error
from .upstream_schema import ShapeError, chunk as checked_chunk, parse_json

if TYPE_CHECKING:
    from ..policy import Calibration, Policy
    from .proxy import Proxy, _Slot
    from .scoring import Window
    from .upstream import Events

log = logging.getLogger("hguard.server")


def trigger_index(logits: Sequence[float], calibration: "Calibration", trigger: float) -> int | None:
    """The first token at which the calibrated running mean of `logits` reaches `trigger` (None: none
    does), the token at which a hosted abstention stops."""
    if len(logits) == 0:
        return None
    values = torch.as_tensor(list(logits), dtype=torch.float64)
    means = values.cumsum(0) / torch.arange(1, values.numel() + 1, dtype=torch.float64)
    hits = (calibration(means) >= trigger).nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def watched(scores: Scores | None, finish: str | None) -> int:
    """How many tokens of a finished answer the policy may act on: all of them, except a last token at
    the length limit, which hosted generation never feeds back (so never scores in time to act on)."""
    count = len(scores.token_ids) if scores is not None else 0
    return count - 1 if finish == "length" else count


def spelled(tokenizer, ids: list[int], count: int, text: str, floor: int) -> int:
    """Characters of `text` that its first `count` tokens spell, a partial character at their end left
    out; `floor` (what was already sent) where they do not spell a prefix of `text`."""
    prefix = decode(tokenizer, ids[:count]).rstrip("\ufffd")
    return len(prefix) if len(prefix) > floor and text.startswith(prefix) else floor


class ScoringFailed(Exception):
    """Scoring a streamed choice failed (the stream ends with an error event)."""


@dataclass
class _Choice:
    """One choice of the stream: the upstream's text so far, and how much of it went out."""

    window: "Window | None"
    text: str = ""
    sent_chars: int = 0
    sent_tokens: int = 0  # local tokens whose text (and scores) went out
    tokens: int = 0  # local tokens of the answer so far (at its end: of the answer kept)
    done: bool = False
    abstained: bool = False


class Relay:
    """The events of one proxied stream: `start()` reads the upstream's first event, then `events()` is
    the iterator the route sends."""

    def __init__(self, proxy: "Proxy", response: httpx.Response, upstream: "Events", request,
                 policy: "Policy | None", prompt: list[int], chat: bool, slot: "_Slot") -> None:
        self.proxy, self.response, self.upstream, self.request = proxy, response, upstream, request
        self.policy, self.prompt, self.chat, self.slot = policy, prompt, chat, slot
        self.choices: dict[int, _Choice] = {}
        self.verdicts: list[str] = []
        self._first: dict | None = None

    async def start(self) -> None:
        """Read and check the upstream's first event; its failures are raised (an HTTP status)."""
        self._first = await self._next()
        if self._first is None:
            raise broken("the upstream's stream ended before its first chunk")

    async def _next(self) -> dict | None:
        """The upstream's next chunk, validated (None: its stream is over)."""
        data = await self.upstream.next()
        if data is None or data.strip() == "[DONE]":
            return None
        parsed = parse_json(data)
        if parsed is None:
            raise broken("the upstream sent a stream event that is not JSON", data[:200])
        if isinstance(parsed, dict) and "error" in parsed:
            raise relayed_error(502, parsed)
        try:
            return checked_chunk(parsed, self.chat, self.request.n)
        except ShapeError as error:
            raise broken(str(error), data[:200]) from None

    def _open(self) -> bool:
        """Some choice has not ended (or none has begun)."""
        done = [c for c in self.choices.values() if c.done]
        return len(done) < self.request.n

    async def events(self) -> AsyncIterator[str]:
        usage_sent, last, status = False, {}, CLIENT_CLOSED  # the status until the stream ends otherwise
        try:
            chunk = self._first
            while chunk is not None:
                chunk["model"] = self.proxy.model_name
                if not self.chat and "usage" in chunk and chunk["usage"] is None:
                    del chunk["usage"]  # the legacy completions schema has no null usage (vLLM sends one)
                last = chunk
                usage_sent = usage_sent or chunk.get("usage") is not None
                for event in await self._relay(chunk):
                    yield event
                done = [c for c in self.choices.values() if c.done]
                if len(done) >= self.request.n and any(c.abstained for c in done):
                    # an abstention ended the last open choice: stop reading (closing the response ends the
                    # upstream's work); the usage the client asked for is counted here, since the upstream's
                    # will not come
                    options = self.request.stream_options
                    if options is not None and options.include_usage and not usage_sent:
                        yield _event(self._usage_chunk(last))
                    break
                chunk = await self._next()
            else:
                if self._open():
                    raise broken("the upstream's stream ended before its answer did")
            status = 200
        except APIError as error:  # the stream has started: the upstream's failure goes in-band
            status = error.status
            if self.proxy.metrics is not None:
                self.proxy.metrics.labels(self.proxy.metrics.upstream_errors, kind=str(error.status)).inc()
            yield _event(error.body())
        except ScoringFailed:
            status = 500
            log.exception("scoring a proxied stream failed")
            yield _event(APIError(500, "scoring failed; the server's log has the cause", "server_error").body())
        finally:
            self.slot.release()
            self.proxy.count(self.chat, self.policy, self.verdicts, self.prompt, status)
            self.choices.clear()  # the KV caches go now, not when the response object does
            self.upstream.close()
            await self.response.aclose()
        yield "data: [DONE]\n\n"

    async def _relay(self, chunk: dict) -> list[str]:
        """One upstream chunk as this server's events, as a hosted stream sends them: its choices' settled
        text and scores; then, in events of their own, the abstention messages and the finishing choices
        of the choices it ended."""
        upstream = chunk.get("choices") or []
        parts, messages, finishing = [], [], []
        for choice in upstream:
            index = choice.get("index", 0)
            if index not in self.choices:
                window = self.proxy.scoring.window(self.prompt) if self.policy is not None else None
                self.choices[index] = _Choice(window)
            state = self.choices[index]
            if state.done:
                continue
            part, message, end = await self._advance(choice, state)
            parts += [part] if part is not None else []
            messages += [message] if message is not None else []
            finishing += [end] if end is not None else []
        bodies = [{**chunk, "choices": parts}] if parts or not upstream else []
        bodies += [{**chunk, "choices": messages}] if messages else []
        if finishing:
            bodies.append(finishing_chunk(chunk, finishing))
        for body in bodies[:-1]:
            if "usage" in body:
                body["usage"] = None  # the usage, if any, goes with the last event
        return [_event(body) for body in bodies]

    async def _advance(self, choice: dict, state: _Choice) -> tuple[dict | None, dict | None, dict | None]:
        """`choice` as this server sends it (None: nothing to send); if the choice ends here, the
        abstention message (None: it did not abstain) and the finishing choice."""
        chat, policy = self.chat, self.policy
        delta = choice.get("delta") or {}
        state.text += (delta.get("content") if chat else choice.get("text")) or ""
        finish = choice.get("finish_reason")
        if policy is not None and not finish and self.upstream.ready():
            # more of the answer has arrived already: score it all at once, with the next event (one
            # forward for several tokens, where scoring lags behind the upstream)
            return self._unscored(choice, delta), None, None
        scores = await self._score(state) if policy is not None else None
        count = len(scores.token_ids) if scores is not None else 0
        full = state.window is not None and state.window.full  # past the window: no token changes any more
        # until the upstream ends the choice, its last token may still change: act on the others only
        kept, abstained = self.proxy.cut(policy, scores, count if full else watched(scores, finish) if finish
                                         else count - 1)
        if scores is None or ((finish or full) and not abstained):
            end, chars = count, len(state.text)  # all of it (the guard off, or past the window: as it comes)
        else:
            end = len(kept.token_ids) if abstained else count - 1
            chars = spelled(self.proxy.guard.tokenizer, scores.token_ids, end, state.text, state.sent_chars)
        text = state.text[state.sent_chars:chars]
        new_scores = scores.token_probs[state.sent_tokens:end] if scores is not None else []
        state.sent_chars, state.sent_tokens = max(state.sent_chars, chars), max(state.sent_tokens, end)
        choice["finish_reason"] = None
        if chat:
            choice["delta"] = {**delta, "content": text}
        else:
            choice["text"] = text
        if policy is not None:
            choice["hallucination"] = {"token_scores": new_scores}
        if not (finish or abstained):
            return choice, None, None
        state.done, state.abstained, state.tokens = True, abstained, end
        answer = state.text[:chars]
        scored = state.window.scored_chars(answer) if state.window is not None and not abstained else None
        summary = self.proxy.report(policy, kept, answer, self.request.guard.token_scores, abstained, scored)
        self.verdicts.append(summary["verdict"])
        index = choice.get("index", 0)
        message = text_choice(index, chat, abstain_tail(answer, self.proxy.defaults.abstain_message), []) \
            if abstained else None
        ending = finishing_choice(index, chat, summary, "content_filter" if abstained else finish)
        has_content = text or new_scores or choice.get("logprobs") is not None
        return (choice if has_content else None), message, ending

    def _unscored(self, choice: dict, delta: dict) -> dict | None:
        """`choice` with no text and no scores (they go out with a later event); its logprobs, if any,
        are relayed as they come."""
        if choice.get("logprobs") is None:
            return None
        choice["finish_reason"] = None
        if self.chat:
            choice["delta"] = {**delta, "content": ""}
        else:
            choice["text"] = ""
        choice["hallucination"] = {"token_scores": []}
        return choice

    async def _score(self, state: _Choice) -> Scores | None:
        try:
            scores = await state.window.score(state.text)
        except Exception as error:  # the client gets an error event; the log, the cause
            raise ScoringFailed(f"{type(error).__name__}: {error}") from error
        state.tokens = len(scores.token_ids) if scores is not None else 0
        return scores

    def _usage_chunk(self, last: dict) -> dict:
        """The usage chunk the upstream would have sent last, counted in local tokens."""
        prompt, completion = len(self.prompt), sum(c.tokens for c in self.choices.values())
        return {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
                "created": last.get("created", 0), "model": self.proxy.model_name, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
