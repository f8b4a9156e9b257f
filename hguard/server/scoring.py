"""Proxy mode's scoring: bounded by the scoring model's context, cut in turns, stopped when nobody waits.

An upstream's answer can be any length, and the local model that scores it has a context. `Window`
scores one answer's tokens while the prompt's and the answer's tokens fit that context; past it the
window is full, the rest of the answer is relayed unscored, and the answer's report says where
scoring stopped (`scored_chars`). The answer's new tokens go through the model `piece` at a time, and
the pieces of every answer waiting to be scored go through together: one batched forward (in a worker
thread) takes one piece of each waiting answer (incremental.score_together: each answer keeps its own KV
cache), so scoring 32 open streams costs about one batched step, not 32 forwards; no answer holds the
model longer than one bounded forward, a long answer cannot starve short ones, and an answer whose
client left stops after the batch under way (its wait is cancelled and its piece skipped). The first
piece also runs the prompt, which fits the context too (a longer prompt is refused before it reaches
the upstream).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..guard import Guard
from ..incremental import IncrementalScorer, score_together
from ..results import Scores, char_offset
from .requests import token_chars

PIECE = 64  # answer tokens per forward
ROWS = 64  # answers per batched forward


@dataclass(eq=False)
class _Ask:
    scorer: IncrementalScorer
    ids: list[int]
    future: asyncio.Future


class Scoring:
    """What the windows of one server share: the guard, the context, and the batches."""

    def __init__(self, guard: Guard, context: int, piece: int = PIECE, rows: int = ROWS) -> None:
        self.guard, self.context, self.piece, self.rows = guard, context, piece, rows
        # the longest text a token spells, so that tokenising a bounded prefix finds a full window
        self.token_chars = token_chars(guard.tokenizer)
        self._waiting: list[_Ask] = []
        self._draining: asyncio.Task | None = None
        self.batches = 0  # forwards run so far, and the answers they held (tests and benchmarks read them)
        self.batched_rows = 0

    def window(self, prompt_ids: list[int]) -> "Window":
        return Window(self, prompt_ids)

    async def run(self, scorer: IncrementalScorer, ids: list[int]) -> Scores:
        """`scorer.score_ids(ids)`, in the next batch (FIFO: a piece that waits runs before any that
        queues after it)."""
        ask = _Ask(scorer, ids, asyncio.get_running_loop().create_future())
        self._waiting.append(ask)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await ask.future

    async def _drain(self) -> None:
        while self._waiting:
            batch, later, seen = [], [], set()
            for ask in self._waiting:
                if ask.future.done():  # its answer's client left
                    continue
                if id(ask.scorer) in seen or len(batch) >= self.rows:
                    later.append(ask)
                else:
                    batch.append(ask)
                    seen.add(id(ask.scorer))
            self._waiting = later
            if not batch:
                continue
            self.batches += 1
            self.batched_rows += len(batch)
            try:
                results = await asyncio.to_thread(score_together, [a.scorer for a in batch], [a.ids for a in batch])
            except Exception as error:  # every answer of the batch learns it (the stream ends with an error)
                for ask in batch:
                    if not ask.future.done():
                        ask.future.set_exception(error)
                continue
            for ask, result in zip(batch, results):
                if not ask.future.done():
                    ask.future.set_result(result)


class Window:
    """Scores of one growing answer, up to the context; `score(text)` takes the whole answer so far."""

    def __init__(self, scoring: Scoring, prompt_ids: list[int]) -> None:
        self.scoring = scoring
        self.room = max(0, scoring.context - len(prompt_ids))  # answer tokens that fit
        self.scorer = IncrementalScorer(scoring.guard, list(prompt_ids))
        self.full = False  # the answer ran past the context: later text is not scored
        self._ids: list[int] = []
        self._scores: Scores | None = None

    def _tokens(self, text: str) -> list[int]:
        """The answer's token ids, at most `room` (+1, which tells that the window is full), from a
        prefix of the text bounded by what `room` tokens can spell."""
        prefix = text[: (self.room + 2) * self.scoring.token_chars]
        return list(self.scoring.guard.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []

    async def score(self, text: str) -> Scores | None:
        """Scores of the answer's tokens in the window (None: no tokens); once the window is full, the
        same scores whatever follows."""
        if self.full:
            return self._scores
        ids = self._tokens(text)
        if len(ids) > self.room:
            ids, self.full = ids[: self.room], True
        if not ids:
            return None
        if ids == self._ids:
            return self._scores
        done = next((i for i, (a, b) in enumerate(zip(self._ids, ids)) if a != b), min(len(self._ids), len(ids)))
        scoring = self.scoring
        end = done
        while True:
            end = min(len(ids), end + scoring.piece)
            self._scores = await scoring.run(self.scorer, ids[:end])
            self._ids = ids[:end]
            if end == len(ids):
                return self._scores

    def scored_chars(self, text: str) -> int | None:
        """Characters of `text` that the window's tokens spell, when the window is full (None: the
        whole answer was scored)."""
        if not self.full or self._scores is None:
            return None
        return char_offset(self.scoring.guard.tokenizer, self._scores.token_ids, len(self._scores.token_ids), text)
