"""Teacher-forced scores of a response that arrives in pieces, each token run through the model once.

Proxy mode receives an upstream's answer chunk by chunk. Re-scoring the whole response at every chunk
would cost a forward over everything so far per chunk (quadratic in the length); `IncrementalScorer`
keeps the prompt and the tokens already scored in a KV cache and runs only the new tokens, stopping
each forward after the last hooked layer. The text is re-tokenised as it grows; should that change
tokens already scored (a chunk that ends inside a token, a merge across the boundary), the cache is
cropped back to the tokens that still stand and the rest runs again (from the prompt only where a
cache cannot be cropped), so the scores always equal `Guard.score` on the same tokens. One scorer
serves one response; calls are serialised by its own lock.

`score_together` scores several responses' new tokens in one forward (proxy mode's open streams): the
pieces run end to end in one row, with no padding, each attending to its own scorer's cache, which grows
in place (packed.py). A model whose attention cannot be packed (packed.py says which), and scorers whose
caches are not plain dynamic layers (sliding windows), run one by one; a model with recurrent layers
(Mamba, linear attention), whose state cannot be cropped, runs prompt and response whole at each call.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from . import packed
from .compat import cache_kwargs, extends_cache_wrongly
from .hooks import stoppable
from .monitor import Monitor
from .results import Scores
from .token_inputs import log_probability_and_entropy, weighted

if TYPE_CHECKING:
    from .guard import Guard, Prompt


class IncrementalScorer:
    """Scores of one growing response after one prompt; `score(text)` takes the whole text so far."""

    def __init__(self, guard: "Guard", prompt: "Prompt") -> None:
        self.guard = guard
        self.prompt_ids = guard.encode(prompt)
        self.forwarded = 0  # positions run through the model so far (the cost; tests read it)
        self._lock = threading.Lock()
        self._reset()
        # a model with recurrent layers (Mamba, linear attention) keeps a state that cannot be cropped, and
        # not every one extends it by several tokens at once (nor do some releases some caches): each call
        # runs prompt and response whole
        self._whole = (not all(isinstance(layer, (DynamicLayer, DynamicSlidingWindowLayer)) for layer in self._cache.layers)
                       or extends_cache_wrongly(getattr(guard.model.config, "model_type", "")))

    def _reset(self) -> None:
        self._cache = packed.growing_cache(self.guard.model.config)
        self._fed: list[int] = []  # prompt and response ids whose activations are in the cache
        self._logits: list[float] = []  # probe logit of each response token in the cache
        # a probe with token inputs: the model's logits at the last few positions fed (the last: _fed[-1]'s),
        # where the next token's term comes from, and a crop of up to RECENT - 1 tokens finds it again
        self._recent: list[torch.Tensor] = []

    def score(self, text: str) -> Scores | None:
        """Scores of every token of `text` (None for an empty text); only tokens new since the last call
        cost a forward."""
        ids = list(self.guard.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        if not ids:
            return None
        return self.score_ids(ids)

    def score_ids(self, response_ids: list[int]) -> Scores:
        return score_together([self], [response_ids])[0]

    def _target(self, response_ids: list[int]) -> list[int]:
        """Prompt and response ids, with the cache cut back to the part of them it already holds."""
        target = self.prompt_ids + list(response_ids)
        self._keep(_common_prefix(self._fed, target))
        return target

    def _scores(self, response_ids: list[int]) -> Scores:
        return Scores.of(response_ids, torch.tensor(self._logits, dtype=torch.float64), self.guard.probe.calibration)

    def _plain(self) -> bool:
        """Whether the cache is plain dynamic layers (growing in place), which a packed forward can feed."""
        return all(type(layer) is packed.GrowingLayer for layer in getattr(self._cache, "layers", [None]))

    def _keep(self, count: int) -> None:
        """Drop everything after the first `count` positions of the cache (all of it if it cannot crop)."""
        drop = len(self._fed) - count
        if drop == 0:
            return
        if count < len(self.prompt_ids) or self._whole:
            self._reset()
            return
        if self.guard.bound.token_weight is not None and len(self._recent) <= drop:
            self._reset()  # the logits before the first token to run again are gone
            return
        try:
            self._cache.crop(-drop)
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
            self._reset()
            return
        self._recent = self._recent[: len(self._recent) - drop]
        self._fed = self._fed[:count]
        self._logits = self._logits[: count - len(self.prompt_ids)]

    def _run(self, new: list[int]) -> None:
        """The new tokens in a forward of their own, on the cache as it is (without a cache, from the prompt
        on, for a model with recurrent layers)."""
        if self._whole:
            new, self._fed, self._logits, self._recent = self._fed + new, [], [], []
        device = self.guard.model.get_input_embeddings().weight.device
        monitor = Monitor(self.guard.bound, stop_early=True)
        if monitor.tokens is not None and self._recent:  # the first new token's term: the last position's logits
            monitor.tokens.last = self._recent[-1][None].to(device)
        cache = {"use_cache": False} if self._whole else {"use_cache": True, **cache_kwargs(self.guard.model, self._cache)}
        try:
            with self.guard._lock, monitor.attached(), stoppable():
                self.guard.model(input_ids=torch.tensor([new], device=device), **cache)
        except BaseException:
            self._reset()  # some layers may hold the new positions already
            raise
        if monitor.tokens is not None:
            self._remember(monitor.tokens.logits[0])
        self.forwarded += len(new)
        first_response = max(0, len(self.prompt_ids) - len(self._fed))  # prompt positions are not scored
        self._logits += monitor.full_logits[0, first_response:].double().cpu().tolist()

    def _remember(self, logits: torch.Tensor) -> None:
        """After a forward with token inputs: keep the model's logits ([new positions, V]) of the last RECENT
        positions fed."""
        self._recent = (self._recent + list(logits[-RECENT:].float().cpu()))[-RECENT:]


RECENT = 4  # positions whose logits a scorer keeps for a probe's token inputs


@torch.inference_mode()
def score_together(scorers: list[IncrementalScorer], responses: list[list[int]]) -> list[Scores]:
    """`scorer.score_ids(response)` for every pair, the new tokens of all of them in one forward (each
    scorer at most once in `scorers`; all on one guard)."""
    if len(scorers) != len(set(map(id, scorers))):
        raise ValueError("each scorer at most once per call")
    locks = sorted((s._lock for s in scorers), key=id)
    for lock in locks:
        lock.acquire()
    try:
        work = []
        for scorer, response in zip(scorers, responses):
            target = scorer._target(response)
            if len(target) > len(scorer._fed):
                work.append((scorer, target))
        together = [w for w in work if w[0]._plain()]
        model = work[0][0].guard.model if work else None
        while len(together) > 1 and packed.packable(model):
            try:
                _run_packed(together)
                break
            except packed.Unpackable as why:  # packed another way from now on (then again), or one by one
                packed.learn(model, why)
        for scorer, target in work:
            if len(target) > len(scorer._fed):  # alone: its own forward
                scorer._run(target[len(scorer._fed):])
                scorer._fed = target
        return [scorer._scores(response) for scorer, response in zip(scorers, responses)]
    finally:
        for lock in locks:
            lock.release()


def _run_packed(work: list[tuple[IncrementalScorer, list[int]]]) -> None:
    """Every scorer's new tokens in one packed forward (packed.py); each scorer's cache gains them. With token
    inputs, the vocabulary's logits are computed only where they are read: before each response token, and
    at each piece's last RECENT positions (a prompt's other positions need none)."""
    guard = work[0][0].guard
    weight = guard.bound.token_weight
    scorers = [scorer for scorer, _ in work]
    past = [len(scorer._fed) for scorer in scorers]
    new = [target[p:] for (_, target), p in zip(work, past)]
    first = [max(0, len(scorer.prompt_ids) - p) for scorer, p in zip(scorers, past)]  # prompt positions: not scored
    kept = [max(0, min(f - 1, len(n) - RECENT)) for f, n in zip(first, new)]  # each piece's first position with logits
    keep = None
    if weight is not None:
        starts = [0]
        for n in new:
            starts.append(starts[-1] + len(n))
        keep = [s + j for s, k, n in zip(starts, kept, new) for j in range(k, len(n))]
    monitor = Monitor(guard.bound, stop_early=True, token_inputs=False)
    try:
        with guard._lock, monitor.attached():
            model_logits = packed.forward(guard.model, [scorer._cache for scorer in scorers], new, past, keep)
    except BaseException:
        for scorer in scorers:
            scorer._reset()  # some layers may hold the new positions already: start over
        raise
    logits = monitor.full_logits[0]
    if weight is not None:
        logits = logits + _token_terms(weight, scorers, new, kept, model_logits[0]).to(logits.device, logits.dtype)
    row = logits.double().cpu().tolist()
    start = 0
    for scorer, (_, target), n, f in zip(scorers, work, new, first):
        scorer._logits += row[start + f: start + len(n)]
        scorer.forwarded += len(n)
        scorer._fed = target
        start += len(n)


def _token_terms(weight: torch.Tensor, scorers: list[IncrementalScorer], new: list[list[int]], kept: list[int],
                 model_logits: torch.Tensor) -> torch.Tensor:
    """A packed row's token-input terms ([positions]; 0 where none), each token's from the logits of the
    position before it: its piece's own kept logits (`model_logits`, [kept positions, V], pieces in order,
    each from its position `kept`), or, for a piece's first token, its scorer's last position's; in one
    batch of tensor ops for the whole row. Each scorer keeps its piece's last logits (`_remember`)."""
    targets, sources, recent = [], [], []
    start = at = 0  # where each piece starts in the row, and its kept logits in model_logits
    for scorer, n, k in zip(scorers, new, kept):
        count = len(n) - k
        if k == 0 and scorer._recent:  # the first token's term: the scorer's last position's logits
            targets.append(start)
            sources.append(len(model_logits) + len(recent))
            recent.append(scorer._recent[-1])
        targets += range(start + k + 1, start + len(n))
        sources += range(at, at + count - 1)
        scorer._remember(model_logits[at: at + count])
        start, at = start + len(n), at + count
    terms = torch.zeros(start, dtype=torch.float32, device=model_logits.device)
    if targets:
        pool = model_logits.float()  # (as token_inputs.distribution reads them)
        pool = torch.cat([pool, torch.stack(recent).to(pool.device)]) if recent else pool
        ids = torch.tensor([t for n in new for t in n], device=pool.device)[targets]
        index = torch.tensor(sources, device=pool.device)
        terms[torch.tensor(targets, device=pool.device)] = weighted(weight.to(pool.device),
                                                                    *log_probability_and_entropy(pool[index], ids))
    return terms


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
