"""One vLLM request as a row of a guarded answer: its tokens and scores folded into an `Answer`.

vLLM gives each step's new tokens and, through the worker (worker.py), each generated token's probe
logit, filed by sequence position: generated token t sits at position prompt + t and is scored in the
forward that feeds it, the one that samples token t + 1 (as in the HF episode). The row scores its
tokens in order as their logits arrive, through the same `Answer` (answer.py) that decides where an HF
answer ends, and applies the policy as the HF Monitor does: the running mean of the logits, calibrated,
against the trigger; abstain ends the answer (and the engine aborts the request), dampen scales the
H-Neurons from the next position on. The request asks vLLM for one token more than the answer's limit,
so that the last kept token is fed back, and scored, like every other one.
"""

from __future__ import annotations

from ..answer import Answer
from ..logprobs import Entry
from ..policy import Calibration, Policy
from ..results import GuardResult, TokenEvent
from .worker import Scaling, Scores


class Row:
    def __init__(self, request_id: str, answer: Answer, policy: Policy | None, calibration: Calibration,
                 top: int | None) -> None:
        self.request_id, self.answer, self.policy, self.calibration, self.top = request_id, answer, policy, calibration, top
        self.running = 0.0
        self.fired = False  # the running probability reached the trigger once
        self.entries: list[Entry | None] = []  # per pushed token, with logprobs
        self.finished = False  # vLLM finished or aborted the request

    def push(self, tokens: list[int], logprobs: list | None) -> None:
        for i, token in enumerate(tokens):
            self.answer.push(token)
            if self.top is not None:
                self.entries.append(_entry(token, logprobs[i], self.top) if logprobs else None)

    def fold(self, scores: Scores) -> list[TokenEvent]:
        """Score every pushed token whose logit exists, in order; the stream's events for them."""
        answer, events = self.answer, []
        filed = scores.take(self.request_id)
        while not answer.ended and len(answer.pushed) > len(answer.ids):
            t = len(answer.ids)
            logit = filed.get(answer.prompt_tokens + t) if self.policy is not None else None
            if self.policy is not None and logit is None and answer.waiting:
                break  # its forward has not run yet
            entry = self.entries[t] if self.top is not None else None
            triggered = self._watch(logit, t, scores)
            if answer.score(logit, entry, triggered):
                probability = None if logit is None else self.calibration.prob(logit)
                events.append(answer.event(entry, probability))
        return events

    def _watch(self, logit: float | None, t: int, scores: Scores) -> bool:
        """The policy's running mean after token t; True where it first reaches the trigger."""
        if logit is None or self.policy is None or not self.policy.watches:
            return False
        self.running += logit
        if self.fired or self.calibration.prob(self.running / (t + 1)) < self.policy.trigger:
            return False
        self.fired = True
        if self.policy.action == "dampen" and self.policy.scales:  # positions fed from now on
            scores.scaling[self.request_id] = Scaling(self.policy.alpha, self.answer.prompt_tokens + t + 1)
        return True

    def result(self) -> tuple[TokenEvent | None, GuardResult]:
        self.answer.close()
        return self.answer.rest(), self.answer.result(self.policy, self.calibration, self.top)


def _entry(token: int, logprobs: dict, top: int) -> Entry:
    """vLLM's {token id: Logprob} of one step as hguard's (log-probability, [(id, log-probability)] top k)."""
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in logprobs.items() if lp.rank is not None and lp.rank <= top))
    return (float(logprobs[token].logprob), [(int(tid), float(value)) for _, tid, value in ranked[:top]])
