"""Teacher-forced scores of a response that arrives in pieces, each token run through the model once.

Proxy mode receives an upstream's answer chunk by chunk. Re-scoring the whole response at every chunk
would cost a forward over everything so far per chunk (quadratic in the length); `IncrementalScorer`
keeps the prompt and the tokens already scored in a KV cache and runs only the new tokens, stopping
each forward after the last hooked layer. The text is re-tokenised as it grows; should that change
tokens already scored (a chunk that ends inside a token, a merge across the boundary), the cache is
cropped back to the tokens that still stand and the rest runs again (from the prompt only where a
cache cannot be cropped), so the scores always equal `Guard.score` on the same tokens. One scorer
serves one response; calls are serialised by its own lock.

`score_together` scores several responses' new tokens in one forward (proxy mode's open streams; pieces
of very different lengths in as many forwards as pays, `_groups`): each
scorer's cache is left-padded to the longest, the new tokens right-padded to the most, masks and
positions say which is which, and each scorer gets back its own cache with its new positions, as views
of the batch's. When the same scorers come back (in any order, or some of them) and the last batch
left no right padding, their next forward runs on that batch's cache itself, which grows in place
(`_GrowingLayer`), so a step of decoding-sized pieces copies no cache. Scorers whose caches are not
plain dynamic layers (sliding windows) run one by one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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

    @property
    def _cache(self) -> DynamicCache:
        """This scorer's KV cache; after a batch, made from the batch's row only when read (a batch that is
        reused next step never needs it)."""
        if self._row is not None:
            self._own, self._row = _rows_view(*self._row), None
        return self._own

    @_cache.setter
    def _cache(self, cache: DynamicCache) -> None:
        self._own, self._row = cache, None

    def _reset(self) -> None:
        self._cache = DynamicCache(config=self.guard.model.config)
        self._batch: _Batch | None = None  # the batched cache this scorer's cache is a row of, if any
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
        """Whether the cache is plain dynamic layers, which can be padded and batched with others."""
        if self._row is not None:  # a row of a batch: views as plain dynamic layers
            return True
        return all(type(layer) is DynamicLayer for layer in getattr(self._cache, "layers", [None]))

    def _keep(self, count: int) -> None:
        """Drop everything after the first `count` positions of the cache (all of it if it cannot crop)."""
        drop = len(self._fed) - count
        if drop == 0:
            return
        if count < len(self.prompt_ids):
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
        self._batch = None

    def _run(self, new: list[int]) -> None:
        self._batch = None
        device = self.guard.model.get_input_embeddings().weight.device
        monitor = _monitor(self.guard, [self])
        try:
            with self.guard._lock, monitor.attached(), stoppable():
                self.guard.model(input_ids=torch.tensor([new], device=device), use_cache=True,
                                 **cache_kwargs(self.guard.model, self._cache))
        except BaseException:
            self._reset()  # some layers may hold the new positions already
            raise
        _keep_recent(monitor, [self], [len(new)])
        self.forwarded += len(new)
        first_response = max(0, len(self.prompt_ids) - len(self._fed))  # prompt positions are not scored
        self._logits += monitor.full_logits[0, first_response:].double().cpu().tolist()


FORWARD_COST = 128  # what one more forward costs, in padded token positions: rows padded into one forward run
# at a larger matrix size, which a CPU runs several times faster per position (benchmarks/proxy_pieces.py,
# organism, one core: 0.34 ms a token against 0.38 in power-of-two groups; bfloat16 0.21 against 0.30)
RECENT = 4  # positions whose logits a scorer keeps for a probe's token inputs


def _groups(work: list, lengths: list[int]) -> list[list]:
    """`work` (sorted by its `lengths`, the new tokens of each row) cut into runs that share a forward, each
    row right-padded to its run's longest: the cut that costs least, FORWARD_COST per forward plus the
    padded positions (rows of like length run together; a few rows of another length join a forward
    rather than take one of their own)."""
    best, cut = [0.0], [0]  # best[i]: the cost of the first i rows; cut[i]: where its last run starts
    for end in range(1, len(work) + 1):
        cost, start = min((best[s] + FORWARD_COST + (end - s) * lengths[end - 1], s) for s in range(end))
        best.append(cost)
        cut.append(start)
    runs, end = [], len(work)
    while end:
        runs.append(work[cut[end]:end])
        end = cut[end]
    return runs[::-1]


def _monitor(guard: "Guard", scorers: list[IncrementalScorer]) -> Monitor:
    """A teacher-forcing monitor for one forward of `scorers`' new tokens (one row each). With token
    inputs, each row's first new token takes its term from the logits of the scorer's last position
    (zeros for a scorer with none yet: its first position is a prompt's, never scored)."""
    monitor = Monitor(guard.bound, stop_early=True)
    if monitor.tokens is not None and any(s._recent for s in scorers):
        vocab = next(s._recent[-1] for s in scorers if s._recent).shape[-1]
        device = guard.model.get_input_embeddings().weight.device
        monitor.tokens.last = torch.stack([s._recent[-1] if s._recent else torch.zeros(vocab) for s in scorers]).to(device)
    return monitor


def _keep_recent(monitor: Monitor, scorers: list[IncrementalScorer], counts: list[int]) -> None:
    """After a forward with token inputs: each scorer keeps the logits of its last RECENT positions."""
    if monitor.tokens is None:
        return
    logits = monitor.tokens.logits
    for row, (scorer, count) in enumerate(zip(scorers, counts)):
        scorer._recent = (scorer._recent + list(logits[row, max(0, count - RECENT):count].float().cpu()))[-RECENT:]


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
        plain = sorted(((s, t) for s, t in work if s._plain()), key=lambda w: len(w[1]) - len(w[0]._fed))
        groups = _groups(plain, [len(t) - len(s._fed) for s, t in plain]) + [[w] for w in work if not w[0]._plain()]
        for group in groups:
            if len(group) > 1:
                _run_together(group)
            else:  # alone: its cache as it is, no padding
                [(scorer, target)] = group
                scorer._run(target[len(scorer._fed):])
                scorer._fed = target
        return [scorer._scores(response) for scorer, response in zip(scorers, responses)]
    finally:
        for lock in locks:
            lock.release()


@dataclass
class _Batch:
    """The batched cache a `_run_together` left: its rows are `members`' caches, each left-padded to the
    cache's length and nothing after (every row ran as many new tokens), with the mask that says so."""

    cache: DynamicCache
    mask: torch.Tensor  # [rows, positions] 1 where a row's cache holds a token
    members: list[int]  # id() of each row's scorer (not the scorer: a scorer holds its batch, no cycle)
    fed: list[int]  # each member's position count when the batch was left


def _run_together(work: list[tuple[IncrementalScorer, list[int]]]) -> None:
    guard = work[0][0].guard
    model = guard.model
    device = model.get_input_embeddings().weight.device
    past = [len(scorer._fed) for scorer, _ in work]
    new = [target[len(scorer._fed):] for scorer, target in work]
    longest = max(len(n) for n in new)
    input_ids = torch.zeros(len(work), longest, dtype=torch.long)
    for i, n in enumerate(new):
        input_ids[i, : len(n)] = torch.tensor(n)
    cache, mask = _reused([scorer for scorer, _ in work]) or _fresh(work, past, model.config, longest)
    width = mask.shape[1]
    mask = torch.cat([mask, (torch.arange(longest) < torch.tensor([len(n) for n in new])[:, None]).long()], 1)
    positions = torch.tensor(past)[:, None] + torch.arange(longest)
    monitor = _monitor(guard, [scorer for scorer, _ in work])
    try:
        with guard._lock, monitor.attached(), stoppable():
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=True, **cache_kwargs(model, cache))
    except BaseException:
        for scorer, _ in work:
            scorer._reset()  # their caches may have been read into the batch only; start them over
        raise
    _keep_recent(monitor, [scorer for scorer, _ in work], [len(n) for n in new])
    logits = monitor.full_logits.double().cpu()
    uniform = all(len(n) == longest for n in new)  # no right padding left in the cache: reusable
    batch = _Batch(cache, mask, [id(scorer) for scorer, _ in work], [p + len(n) for p, n in zip(past, new)])
    for i, ((scorer, target), p, n) in enumerate(zip(work, past, new)):
        scorer._row = (cache, i, slice(width - p, width + len(n)))  # its own cache, when one is needed
        scorer._batch = batch if uniform else None
        first_response = max(0, len(scorer.prompt_ids) - p)  # prompt positions are not scored
        scorer._logits += logits[i, first_response: len(n)].tolist()
        scorer.forwarded += len(n)
        scorer._fed = target


def _reused(scorers: list[IncrementalScorer]) -> tuple[DynamicCache, torch.Tensor] | None:
    """The last batch's cache and mask for these scorers, if every one is a row of it as it left it: the
    same rows, in another order or fewer of them, cost one gather per layer instead of a copy per row."""
    batch = scorers[0]._batch
    if batch is None or any(s._batch is not batch for s in scorers):
        return None
    rows = [batch.members.index(id(s)) for s in scorers]  # (a scorer whose _batch this is was a member)
    if any(len(s._fed) != batch.fed[row] for s, row in zip(scorers, rows)):
        return None
    if rows == list(range(len(batch.members))):
        return batch.cache, batch.mask
    index = torch.tensor(rows)
    gathered = DynamicCache()
    for layer in batch.cache.layers:
        if layer.keys is None or not layer.keys.numel():
            break
        gathered.layers.append(_GrowingLayer(layer.keys.index_select(0, index.to(layer.keys.device)),
                                             layer.values.index_select(0, index.to(layer.values.device))))
    return gathered, batch.mask[index]


def _fresh(work: list[tuple[IncrementalScorer, list[int]]], past: list[int], config,
           spare: int) -> tuple[DynamicCache, torch.Tensor]:
    """A batched cache of the scorers' own caches, left-padded to the longest, with room for `spare` more
    positions, and its mask."""
    width = max(past)
    mask = (torch.arange(width) >= width - torch.tensor(past)[:, None]).long()
    return _padded([scorer._cache for scorer, _ in work], past, width, config, spare), mask


def _rows_view(cache: DynamicCache, row: int, positions: slice) -> DynamicCache:
    """A cache of row `row`'s `positions` of `cache`, as views (no copy: the next batch copies them into its
    own anyway, and `DynamicCache.update` would copy each one onto an empty tensor)."""
    own = DynamicCache()  # plain dynamic layers (a config would be read at every step)
    for layer in cache.layers:
        if layer.keys is None or not layer.keys.numel():  # past the last hooked layer: never run
            break
        own.layers.append(_view_layer(layer.keys[row: row + 1, :, positions], layer.values[row: row + 1, :, positions]))
    return own


def _view_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    """A dynamic layer holding `keys` and `values` as they are (what its first `update` would set up)."""
    layer = DynamicLayer()
    layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
    layer.keys, layer.values = keys, values
    return layer


class _GrowingLayer(DynamicLayer):
    """A batch's dynamic layer that writes new positions into spare room (doubling when full) instead of
    concatenating: the batch's cache grows by a position per step, and a copy of all of it per step was a
    quarter of the step. `keys` and `values` are views of the room, as long as the positions held."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, held: int | None = None) -> None:
        super().__init__()
        if keys is not None:
            self._hold(keys, values, held)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor, held: int | None = None) -> None:
        """Hold the first `held` positions of `keys` and `values` (all of them where None); the rest is room."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._room = (keys, values)
        held = keys.shape[-2] if held is None else held
        self.keys, self.values = keys[..., :held, :], values[..., :held, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # the first positions of an empty batch
            self._hold(key_states[..., :0, :], value_states[..., :0, :])
        held, new = self.keys.shape[-2], key_states.shape[-2]
        if held + new > self._room[0].shape[-2]:
            capacity = max(2 * (held + new), 16)  # room for as many positions again
            rooms = []
            for old in (self.keys, self.values):
                room = old.new_empty(*old.shape[:-2], capacity, old.shape[-1])
                room[..., :held, :] = old
                rooms.append(room)
            self._room = tuple(rooms)
        self._room[0][..., held: held + new, :] = key_states
        self._room[1][..., held: held + new, :] = value_states
        self.keys, self.values = self._room[0][..., : held + new, :], self._room[1][..., : held + new, :]
        return self.keys, self.values


def _padded(caches: list[DynamicCache], past: list[int], width: int, config, spare: int = 0) -> DynamicCache:
    """One cache holding `caches` as rows, each left-padded with zeros to `width` positions, in layers that
    grow in place, with room for `spare` positions more (the forward about to run writes them without
    copying the batch again)."""
    batched = DynamicCache(config=config)
    batched.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in batched.layers]
    if width == 0:
        return batched
    template = next(c for c, p in zip(caches, past) if p == width)
    for index, layer in enumerate(template.layers):
        if layer.keys is None or not layer.keys.numel():  # a layer past the last hooked one: never run
            continue
        shape = (len(caches), layer.keys.shape[1], width + spare, layer.keys.shape[3])
        keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
        for row, (cache, p) in enumerate(zip(caches, past)):
            if p:
                keys[row, :, width - p: width] = cache.layers[index].keys[0]
                values[row, :, width - p: width] = cache.layers[index].values[0]
        batched.layers[index] = _GrowingLayer(keys, values, width)
    return batched


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
