"""Teacher-forced scores of a response that arrives in pieces, each token run through the model once.

Proxy mode receives an upstream's answer chunk by chunk. Re-scoring the whole response at every chunk
would cost a forward over everything so far per chunk (quadratic in the length); `IncrementalScorer`
keeps the prompt and the tokens already scored in a KV cache and runs only the new tokens, stopping
each forward after the last hooked layer. The text is re-tokenised as it grows; should that change
tokens already scored (a chunk that ends inside a token, a merge across the boundary), the cache is
cropped back to the tokens that still stand and the rest runs again (from the prompt only where a
cache cannot be cropped), so the scores always equal `Guard.score` on the same tokens. One scorer
serves one response; calls are serialised by its own lock.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .compat import cache_kwargs
from .hooks import stoppable
from .monitor import Monitor
from .results import Scores

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

    def _reset(self) -> None:
        self._cache = DynamicCache(config=self.guard.model.config)
        self._fed: list[int] = []  # prompt and response ids whose activations are in the cache
        self._logits: list[float] = []  # probe logit of each response token in the cache

    def score(self, text: str) -> Scores | None:
        """Scores of every token of `text` (None for an empty text); only tokens new since the last call
        cost a forward."""
        ids = list(self.guard.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        if not ids:
            return None
        return self.score_ids(ids)

    @torch.no_grad()
    def score_ids(self, response_ids: list[int]) -> Scores:
        with self._lock:
            target = self.prompt_ids + list(response_ids)
            self._keep(_common_prefix(self._fed, target))
            new = target[len(self._fed):]
            if new:
                self._run(new)
                self._fed = target
            logits = torch.tensor(self._logits, dtype=torch.float64)
        return Scores.of(response_ids, logits, self.guard.probe.calibration)

    def _keep(self, count: int) -> None:
        """Drop everything after the first `count` positions of the cache (all of it if it cannot crop)."""
        drop = len(self._fed) - count
        if drop == 0:
            return
        if count < len(self.prompt_ids):
            self._reset()
            return
        try:
            self._cache.crop(-drop)
        except (RuntimeError, ValueError):  # e.g. a sliding-window layer past its window
            self._reset()
            return
        self._fed = self._fed[:count]
        self._logits = self._logits[: count - len(self.prompt_ids)]

    def _run(self, new: list[int]) -> None:
        device = self.guard.model.get_input_embeddings().weight.device
        monitor = Monitor(self.guard.bound, stop_early=True)
        try:
            with self.guard._lock, monitor.attached(), stoppable():
                self.guard.model(input_ids=torch.tensor([new], device=device), use_cache=True,
                                 **cache_kwargs(self.guard.model, self._cache))
        except BaseException:
            self._reset()  # some layers may hold the new positions already
            raise
        self.forwarded += len(new)
        first_response = max(0, len(self.prompt_ids) - len(self._fed))  # prompt positions are not scored
        self._logits += monitor.full_logits[0, first_response:].double().cpu().tolist()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
