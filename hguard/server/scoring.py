"""Proxy mode's scoring: bounded by the scoring model's context, cut in turns, stopped when nobody waits.

An upstream's answer can be any length, and the local model that scores it has a context. `Window`
scores one answer's tokens while the prompt's and the answer's tokens fit that context; past it the
window is full, the rest of the answer is relayed unscored, and the answer's report says where
scoring stopped (`scored_chars`). The answer's new tokens go through the model `piece` at a time, and
the pieces of every answer waiting to be scored go through together: one batched forward (in a worker
thread) takes one piece of each waiting answer (incremental.score_together: each answer keeps its own KV
cache), so scoring 32 open streams costs about one batched step, not 32 forwards; no answer holds the
model longer than one bounded forward, a long answer cannot starve short ones, and an answer whose
client left stops after the batch under way (its wait is cancelled and its piece skipped). Between two
batches the answers just scored get a few event-loop turns to ask again (`_gather`), so that every open
stream rides the same forward, where score_together runs their pieces end to end, unpadded. The
first piece also runs the prompt, which fits the context too (a longer prompt is refused before it
reaches the upstream).

An answer's text is re-tokenised as it grows, but not from its start each time: where the tokenizer
splits text into pre-tokens that later text cannot change (byte-level BPE with no normaliser, as GPT-2,
Llama 3 and Qwen split), the tokens before the last few pre-tokens are settled and only the text after
them is tokenised again (`Window._tokens`). An answer whose upstream returned its token ids is not
re-tokenised at all (token_ids.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from ..guard import Guard
from ..incremental import IncrementalScorer, score_together
from ..results import Scores, char_offset
from .requests import token_chars

PIECE = 64  # answer tokens per forward
ROWS = 64  # answers per batched forward
GATHER_TURNS = 4  # event-loop turns at least between batches, for the answers just scored to ask again
UNSETTLED = 3  # pre-tokens at the end of a growing text whose tokens may still change
ADDED_CHARS = 64  # the longest added token (special tokens' texts) a tokenizer may have to settle text


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
        self.pre_tokens, self.added = _local_splits(guard.tokenizer)
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
            await self._gather()

    async def _gather(self) -> None:
        """Let the answers just scored ask again before the next batch starts: event-loop turns (their relays
        send the chunk and read the next upstream event, a few turns), at least GATHER_TURNS and then until
        a turn adds nothing (at most 4 x GATHER_TURNS). Without this the open streams split into two cohorts
        that take turns (one scored while the other waits), each forward holding half of them and each piece
        waiting two forwards (32 streams: 14 answers per forward; with it, 24 to 26)."""
        for turn in range(4 * GATHER_TURNS):
            before = len(self._waiting)
            await asyncio.sleep(0)
            if turn >= GATHER_TURNS and len(self._waiting) == before:
                return


def _local_splits(tokenizer) -> tuple[object | None, re.Pattern | None]:
    """The pre-tokenizer of a tokenizer whose tokens of a text, after any of its pre-token boundaries, are
    the tokens of the text from that boundary on (BPE over regex or byte-level pre-tokens, no normaliser,
    no added token that takes in the space around it), and a pattern of its added tokens' texts, which a
    boundary must not cut; (None, None) for any other tokenizer, whose text is tokenised whole."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    local = bool(parts) and all(part.get("type") in ("Split", "Digits") or
                                (part.get("type") == "ByteLevel" and not part.get("add_prefix_space")) for part in parts)
    added = [t for t in spec.get("added_tokens") or [] if t.get("content")]
    if (spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE" or not local
            or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") or len(t["content"]) > ADDED_CHARS
                   for t in added)):
        return None, None
    contents = sorted({t["content"] for t in added}, key=len, reverse=True)
    return backend.pre_tokenizer, re.compile("|".join(map(re.escape, contents))) if contents else None


class Window:
    """Scores of one growing answer, up to the context; `score(text)` takes the whole answer so far (each
    call's text extends the last one's)."""

    def __init__(self, scoring: Scoring, prompt_ids: list[int]) -> None:
        self.scoring = scoring
        self.room = max(0, scoring.context - len(prompt_ids))  # answer tokens that fit
        self.scorer = IncrementalScorer(scoring.guard, list(prompt_ids))
        self.full = False  # the answer ran past the context: later text is not scored
        self._ids: list[int] = []
        self._scores: Scores | None = None
        self._settled: list[int] = []  # the tokens of the text's first `_settled_chars` characters: final
        self._settled_chars = 0
        self._seam = ""  # the characters just before `_settled_chars` (a text without them starts over)

    def _tokens(self, text: str) -> list[int]:
        """The answer's token ids, at most `room` (+1, which tells that the window is full): the settled
        ones, then those of the text after them, up to what the rest of the window can spell."""
        start = self._settled_chars
        if text[start - len(self._seam): start] != self._seam:
            self._settled, self._settled_chars, self._seam, start = [], 0, "", 0
        tail = text[start: start + (self.room - len(self._settled) + 2) * self.scoring.token_chars]
        ids = self._settled + self._encode(tail)
        if self.scoring.pre_tokens is not None:
            self._settle(text, tail, ids[len(self._settled):])
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.scoring.guard.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _settle(self, text: str, tail: str, ids: list[int]) -> None:
        """Settle the tokens of `tail` (the text from `_settled_chars`, whose tokens are `ids`) before its
        last UNSETTLED pre-tokens, which no later text changes, where an added token's text does not lie
        across that boundary and the tokens of the text before it are indeed the first of `ids`."""
        pieces = self.scoring.pre_tokens.pre_tokenize_str(tail)
        added = self.scoring.added
        # the boundary: the start of a pre-token before the last UNSETTLED ones, and where the tokenizer
        # has added tokens, ADDED_CHARS before the text's end (no added token arriving can reach back to it)
        last = len(text) - (ADDED_CHARS if added is not None else 0) - self._settled_chars
        cut = next((start for _, (start, _) in reversed(pieces[:len(pieces) - UNSETTLED + 1]) if start <= last), 0)
        at = self._settled_chars + cut
        if cut == 0 or (added is not None and added.search(text, max(0, at - ADDED_CHARS), at + ADDED_CHARS)):
            return
        settled = self._encode(tail[:cut])
        if ids[: len(settled)] != settled:
            return
        self._settled += settled
        self._settled_chars = at
        self._seam = text[max(0, at - 32): at]

    async def score(self, text: str, ids: list[int] | None = None) -> Scores | None:
        """Scores of the answer's tokens in the window (None: no tokens): of `ids` where the upstream
        gave them, else of the text re-tokenised; once the window is full, the same scores whatever
        follows."""
        if self.full:
            return self._scores
        ids = list(ids) if ids is not None else self._tokens(text)
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
