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
A choice whose upstream sends its token ids (token_ids.py) is scored on them: no token of it changes
later, so none is held back; where the client asked for the ids too, each chunk carries those of the
tokens whose text it carries (the prompt's ids come with the first chunk that goes out).

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
from .chunks import abstain_tail, finishing_chunk
from .errors import CLIENT_CLOSED, APIError
from .token_ids import ANSWER_IDS, PROMPT_IDS, answer_ids, scorable
from .upstream import broken, relayed_error
from .upstream_schema import ShapeError, parse_json

if TYPE_CHECKING:
    from ..policy import Calibration, Policy
    from .proxy import Proxied, _Slot
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
    own: bool | None = None  # scored on the upstream's token ids (None: not known before its first text)
    ids: list[int] | None = None  # the upstream's token ids of the answer so far (None: it sent none)
    relayed_ids: int = 0  # of those, the ones relayed to the client (where it asked for them)
    prompt_ids: list[int] | None = None  # a text choice's prompt ids, as the upstream sent them
    prompt_pending: bool = False  # they go out with the choice's next chunk


class Relay:
    """The events of one proxied stream: `start()` reads the upstream's first event, then `events()` is
    the iterator the route sends."""

    def __init__(self, serving: "Proxied", response: httpx.Response, upstream: "Events", request,
                 policy: "Policy | None", prompt: list[int], slot: "_Slot") -> None:
        self.serving, self.proxy, self.endpoint = serving, serving.proxy, serving.endpoint
        self.response, self.upstream, self.request = response, upstream, request
        self.policy, self.prompt, self.slot = policy, prompt, slot
        self.choices: dict[int, _Choice] = {}
        self.verdicts: list[str] = []
        self._first: dict | None = None
        self.shown = request.return_token_ids is True  # the client asked for the token ids too
        self._prompt_ids: list[int] | None = None  # a chat's prompt ids, as the upstream sent them
        self._prompt_pending = False  # they go out with the next event

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
            return self.endpoint.upstream_chunk(parsed, self.request.n)
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
                chunk["model"] = self.serving.model_name
                if not self.endpoint.usage_null and "usage" in chunk and chunk["usage"] is None:
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
            metrics = self.serving.metrics
            if metrics is not None:
                metrics.labels(metrics.upstream_errors, kind=str(error.status)).inc()
            yield _event(error.body())
        except ScoringFailed:
            status = 500
            log.exception("scoring a proxied stream failed")
            yield _event(APIError(500, "scoring failed; the server's log has the cause", "server_error").body())
        finally:
            self.slot.release()
            self.serving.count(self.policy, self.verdicts, self.prompt, status)
            self.choices.clear()  # the KV caches go now, not when the response object does
            self.upstream.close()
            await self.response.aclose()
        yield "data: [DONE]\n\n"

    async def _relay(self, chunk: dict) -> list[str]:
        """One upstream chunk as this server's events, as a hosted stream sends them: its choices' settled
        text and scores; then, in events of their own, the abstention messages and the finishing choices
        of the choices it ended."""
        upstream = chunk.get("choices") or []
        if (prompt_ids := chunk.pop(PROMPT_IDS, None)) is not None:
            self._prompt_ids, self._prompt_pending = prompt_ids, self.shown
        parts, messages, finishing = [], [], []
        for choice in upstream:
            index = choice.get("index", 0)
            if index not in self.choices:
                window = self.proxy.scoring.window(self.prompt) if self.policy is not None else None
                self.choices[index] = _Choice(window)
            state = self.choices[index]
            if (prompt_ids := choice.pop(PROMPT_IDS, None)) is not None:
                state.prompt_ids, state.prompt_pending = prompt_ids, self.shown
            new_ids = choice.pop(ANSWER_IDS, None)
            if state.done:
                continue
            part, message, end = await self._advance(choice, state, new_ids)
            parts += [part] if part is not None else []
            messages += [message] if message is not None else []
            finishing += [end] if end is not None else []
        bodies = [{**chunk, "choices": parts}] if parts or not upstream else []
        bodies += [{**chunk, "choices": messages}] if messages else []
        if finishing:
            bodies.append(finishing_chunk(chunk, finishing))
        if self._prompt_pending and bodies:
            bodies[0][PROMPT_IDS], self._prompt_pending = self._prompt_ids, False
        for body in bodies[:-1]:
            if "usage" in body:
                body["usage"] = None  # the usage, if any, goes with the last event
        return [_event(body) for body in bodies]

    async def _advance(self, choice: dict, state: _Choice, new_ids: list[int] | None) \
            -> tuple[dict | None, dict | None, dict | None]:
        """`choice` as this server sends it (None: nothing to send); if the choice ends here, the
        abstention message (None: it did not abstain) and the finishing choice. `new_ids`: the token
        ids the upstream sent with it."""
        endpoint, policy = self.endpoint, self.policy
        added = endpoint.chunk_text(choice) or ""
        state.text += added
        self._take_ids(state, new_ids, added)
        finish = choice.get("finish_reason")
        if policy is not None and not finish and self.upstream.ready():
            # more of the answer has arrived already: score it all at once, with the next event (one
            # forward for several tokens, where scoring lags behind the upstream)
            return self._unscored(choice, state), None, None
        scores = await self._score(state, choice) if policy is not None else None
        count = len(scores.token_ids) if scores is not None else 0
        full = state.window is not None and state.window.full  # past the window: no token changes any more
        # until the upstream ends the choice, the last token of re-tokenised text may still change: act on
        # the others only (the upstream's own ids, and a full window, are final)
        settled = count if full or state.own else count - 1
        kept, abstained = self.serving.cut(policy, scores, watched(scores, finish) if finish and not full else settled)
        whole = scores is None or ((finish or full) and not abstained)
        if whole:
            end, chars = count, len(state.text)  # all of it (the guard off, or past the window: as it comes)
        elif state.own and not abstained:  # the upstream's text may lag its ids (a partial character, a
            # possible stop string): its tokens go out once their text has come
            prefix = decode(self.serving.guard.tokenizer, scores.token_ids[:settled])
            end, chars = (settled, len(prefix)) if state.text.startswith(prefix) else (state.sent_tokens,
                                                                                       state.sent_chars)
        else:
            end = len(kept.token_ids) if abstained else settled
            chars = spelled(self.serving.guard.tokenizer, scores.token_ids, end, state.text, state.sent_chars)
        text = state.text[state.sent_chars:chars]
        new_scores = scores.token_probs[state.sent_tokens:end] if scores is not None else []
        state.sent_chars, state.sent_tokens = max(state.sent_chars, chars), max(state.sent_tokens, end)
        choice["finish_reason"] = None
        endpoint.set_chunk_text(choice, text)
        if policy is not None:
            choice["hallucination"] = {"token_scores": new_scores}
        self._give_ids(choice, state, len(state.ids or []) if whole else end if state.own else
                       state.relayed_ids if abstained else len(state.ids or []))
        if not (finish or abstained):
            return choice, None, None
        state.done, state.abstained, state.tokens = True, abstained, end
        answer = state.text[:chars]
        scored = state.window.scored_chars(answer) if state.window is not None and not abstained else None
        summary = self.serving.report(policy, kept, answer, self.request.guard.token_scores, abstained, scored)
        self.verdicts.append(summary["verdict"])
        index = choice.get("index", 0)
        message = endpoint.text_choice(index, abstain_tail(answer, self.serving.defaults.abstain_message), []) \
            if abstained else None
        ending = endpoint.finishing_choice(index, summary, "content_filter" if abstained else finish)
        has_content = text or new_scores or choice.get("logprobs") is not None or choice.get(ANSWER_IDS) \
            or PROMPT_IDS in choice
        return (choice if has_content else None), message, ending

    def _take_ids(self, state: _Choice, new_ids: list[int] | None, added: str) -> None:
        """Keep the token ids the upstream sent with a chunk of the choice; the choice's first text, or
        ids, tell whether it is scored on them: where the upstream sent them with the local prompt's."""
        if self.policy is not None and state.own is None and (new_ids is not None or added):
            upstream_prompt = self.endpoint.upstream_prompt(self._prompt_ids, state.prompt_ids)
            state.own = new_ids is not None and upstream_prompt == self.prompt
        if state.own:
            if new_ids is None and added:
                raise broken("the upstream's stream stopped sending token ids")
            scorable(new_ids or [], self.proxy.vocab)
        if new_ids is not None:
            state.ids = (state.ids or []) + new_ids

    def _give_ids(self, choice: dict, state: _Choice, upto: int) -> None:
        """Where the client asked for token ids, the upstream's ids up to `upto` not relayed yet go with
        `choice` (as do a text choice's prompt ids, once)."""
        if not self.shown:
            return
        if state.prompt_pending:
            choice[PROMPT_IDS], state.prompt_pending = state.prompt_ids, False
        if state.ids is not None:
            choice[ANSWER_IDS] = state.ids[state.relayed_ids:upto]
            state.relayed_ids = max(state.relayed_ids, upto)

    def _unscored(self, choice: dict, state: _Choice) -> dict | None:
        """`choice` with no text and no scores (they go out with a later event); its logprobs, if any,
        are relayed as they come."""
        if choice.get("logprobs") is None:
            return None
        choice["finish_reason"] = None
        self.endpoint.set_chunk_text(choice, "")
        choice["hallucination"] = {"token_scores": []}
        self._give_ids(choice, state, state.relayed_ids)
        return choice

    async def _score(self, state: _Choice, choice: dict) -> Scores | None:
        ids = answer_ids(state.ids or [], choice, self.proxy.eos) if state.own else None
        try:
            scores = await state.window.score(state.text, ids)
        except Exception as error:  # the client gets an error event; the log, the cause
            raise ScoringFailed(f"{type(error).__name__}: {error}") from error
        state.tokens = len(scores.token_ids) if scores is not None else 0
        return scores

    def _usage_chunk(self, last: dict) -> dict:
        """The usage chunk the upstream would have sent last, counted in local tokens."""
        prompt, completion = len(self.prompt), sum(c.tokens for c in self.choices.values())
        return {"id": last.get("id", ""), "object": last.get("object", "chat.completion.chunk"),
                "created": last.get("created", 0), "model": self.serving.model_name, "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
