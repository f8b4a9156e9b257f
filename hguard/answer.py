"""One row's answer as its tokens are scored: the one place that decides where an answer ends.

A row's tokens are pushed as they are sampled and scored in order, each once its probe logit exists
(one step later; the last ones after the final-token forward). Scoring a token applies the end rules
in a fixed order: an end-of-sequence token ends the answer before it; a stop string ends it at the
token that completes it (the text is cut where the stop string starts); the row's length limit, or a
host-side stop (a cancelled row, the caller's own stopping criteria), ends it at that token; and an
abstain trigger ends it after the token, but only where the row went on generating after it (a
trigger on a row's last token came too late to act, or from a forward that only other rows needed).

Streamed and non-streamed generation both go through this class, token by token, so they cannot
disagree: `event` is what a stream sends for the token, `result` what `generate` returns. Text that
may be a partial character or the start of a stop string is held back until the answer ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from .logprobs import Entry
from .policy import Calibration, Policy, verdict
from .results import FinishReason, GuardResult, IncrementalText, TokenEvent, decode, mean, spans_of


class Answer:
    """Row `row` of a batch: its pushed tokens, the ones scored so far, and where it ended."""

    def __init__(self, tokenizer, row: int, eos_ids: set[int], stops: Sequence[str], limit: int | None,
                 prompt_tokens: int, *, abstains: bool, streaming: bool) -> None:
        self.tokenizer, self.row, self.eos_ids, self.stops = tokenizer, row, eos_ids, list(stops)
        self.limit, self.prompt_tokens, self.abstains = limit, prompt_tokens, abstains
        self.pushed: list[int] = []  # every token the row sampled, whatever its end
        self.kept: int | None = None  # tokens it keeps where a host-side decision stopped it
        self.ids: list[int] = []  # the answer's tokens, scored in order
        self.logits: list[float] = []
        self.logprobs: list[Entry] = []
        self.finish_reason: FinishReason | None = None  # None while the answer goes on
        self.acted = False  # the policy acted on one of the answer's tokens (a trigger that counted)
        # text: decoded as it goes where a stream shows it or a stop string may end it, else once
        self._text = IncrementalText(tokenizer) if streaming or self.stops else None
        self._holdback = max((len(s) for s in self.stops), default=1) - 1
        self._searched = 0
        self._cut: str | None = None  # the text up to a stop string, once one ended the answer
        self._final: tuple[list[int], str] | None = None  # (ids, their whole decode), computed once
        self.sent = 0  # characters of text already in events

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The answer's text: while it goes on, its complete characters; once it ended, the whole decode
        (a trailing partial character included, as a replacement character), or the text up to the stop
        string that ended it."""
        if self._cut is not None:
            return self._cut
        if self.ended or self._text is None:
            if self._final is None or len(self._final[0]) != len(self.ids):
                self._final = (list(self.ids), decode(self.tokenizer, self.ids))
            return self._final[1]
        return self._text.text

    def push(self, token: int) -> None:
        self.pushed.append(token)

    def score(self, logit: float | None, logprob: Entry | None, triggered: bool) -> bool:
        """Score the answer's next pushed token; False when the answer had already ended (or the token
        is the EOS that ends it, which the answer leaves out)."""
        if self.ended:
            return False
        token = self.pushed[len(self.ids)]
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return False
        self.ids.append(token)
        if logit is not None:
            self.logits.append(logit)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self._text is not None:
            self._extend(token)
        count = len(self.ids)
        if not self.ended and ((self.limit is not None and count >= self.limit) or count == self.kept):
            self.finish_reason = "length"  # the row's own limit, a cancelled row, or the caller's criteria
        if triggered and not self.ended and len(self.pushed) > count:  # the row went on after it: it counts
            self.acted = True
            if self.abstains:
                self.finish_reason = "abstain"
        return True

    @property
    def waiting(self) -> bool:
        """Whether the answer goes on with a pushed token that has no score yet (not an EOS)."""
        return self._next() is not None and self._next() not in self.eos_ids

    def _next(self) -> int | None:
        """The pushed token the answer would score next, if it goes on and has one."""
        return self.pushed[len(self.ids)] if not self.ended and len(self.pushed) > len(self.ids) else None

    def _extend(self, token: int) -> None:
        text = self._text.add(token)
        start = max(0, min(self._searched, self._text.unchanged) - self._holdback)
        self._searched = len(text)
        hits = [at for at in (text.find(s, start) for s in self.stops) if at >= 0]
        if hits:
            self._cut = text[: min(hits)]
            self.finish_reason = "stop"

    def close(self) -> None:
        """Generation is over: an answer whose next token is an EOS (which needs no score) ends on it;
        one that did not end otherwise ran to the batch's length limit."""
        if self._next() in self.eos_ids:
            self.score(None, None, False)
        if not self.ended:
            self.finish_reason = "length"

    def event(self, logprob: Entry | None = None, probability: float | None = None) -> TokenEvent:
        """The stream's event for the token just scored: its text, less what may still change."""
        text = self.text
        if not self.ended:  # hold back a partial character, and what may be the start of a stop string
            text = text[: max(self.sent, len(text.rstrip("\ufffd")) - self._holdback)]
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return TokenEvent(self.row, len(self.ids) - 1, self.ids[-1], piece, probability, logprob)

    def rest(self) -> TokenEvent | None:
        """Text held back until the answer ended, as a text-only event (None if nothing is left)."""
        text = self.text
        if len(text) <= self.sent:
            return None
        piece, self.sent = text[self.sent:], len(text)
        return TokenEvent(self.row, -1, -1, piece, None)

    def result(self, policy: Policy | None, calibration: Calibration, top: int | None) -> GuardResult:
        """The finished answer as `generate` returns it."""
        text, ids = self.text, list(self.ids)
        logprobs = list(self.logprobs) if top is not None else None
        if policy is None:
            return GuardResult(text, ids, [], None, "ok", self.finish_reason, "off", [], self.prompt_tokens,
                               self.row, logprobs)
        probs = calibration.probs(self.logits)
        probability = calibration.prob(mean(self.logits)) if ids else None
        return GuardResult(text, ids, probs, probability, verdict(policy, probability, self.acted),
                           self.finish_reason, policy.action, spans_of(self.tokenizer, ids, probs, policy.threshold, text),
                           self.prompt_tokens, self.row, logprobs)
