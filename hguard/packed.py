"""One forward over the new tokens of several sequences laid end to end, each attending to its own KV cache.

Proxy mode scores the pieces of many open answers at once. Batching them as rows pads every row's cache
to the longest and every row's piece to the longest piece (in a replay of proxy-like pieces,
benchmarks/proxy_pieces.py, about half the positions of a forward were padding). Here the pieces
run as one row with no padding: the model's linear layers (almost all of a forward) see only real tokens,
each token has its own position, each layer's new keys and values go straight into their sequence's
own cache (`GrowingLayer`, which writes into spare room instead of concatenating), and attention runs
sequence by sequence against that sequence's cache, causal within its piece. A model that caches
something other than the keys it attends with (MLA's latent, which it expands into keys itself) is
found out at its first packed forward and packs another way from then on (WHOLE): every sequence's whole
cache is handed back to it at each layer, end to end (a copy per forward), and attention takes each
sequence's keys out of what the model made of them.

This takes over transformers' attention for the forward (an attention function of its own, under the
model's lock, which every hguard forward holds), so it serves models whose every layer attends through
that interface with plain causal attention: no sliding window, soft-capping, sinks or positional bias in
the mask (ALiBi). `forward` checks that each layer that ran did exactly that, and raises `Unpackable`
otherwise, and for any error inside the model's forward (a model that checks the mask's shape); `packable`
remembers the answer per model, and the caller runs such a model's sequences one at a time. Every
model type of the conformance matrix checks proxy scoring against Guard.score
(tests/test_conformance_matrix.py), so one that ignored position_ids would fail there.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

from .compat import cache_kwargs
from .hooks import stoppable

NAME = "hguard_packed"
_now = threading.local()  # the forward under way: its _Pieces (set and read in the same thread)
DIRECT, WHOLE, NONE = "direct", "whole", ""  # how a model's packed forward reads the caches (NONE: it cannot)
_modes: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


class Unpackable(RuntimeError):
    """The model attends in a way the packed forward does not reproduce."""


class _Latent(Unpackable):
    """The model caches something other than the keys it attends with (MLA's latent)."""


def packable(model: nn.Module) -> bool:
    """False once a packed forward of `model` has failed in both ways (True until then)."""
    return _modes.get(model, DIRECT) != NONE


def learn(model: nn.Module, why: Unpackable) -> None:
    """After a packed forward of `model` raised `why`: a model that caches latents packs with each
    sequence's cache handed back whole from now on; any other cannot be packed (logged once)."""
    if isinstance(why, _Latent) and _modes.get(model, DIRECT) == DIRECT:
        _modes[model] = WHOLE
        return
    if packable(model):
        logging.getLogger("hguard.packed").warning("scoring %s's sequences one at a time: %s", type(model).__name__, why)
    _modes[model] = NONE


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer that writes new positions into spare room (doubling when full) instead of
    concatenating, so that a sequence growing by a few positions per forward copies only those. `keys` and
    `values` are views of the room, as long as the positions held; `crop` shortens the views, and the next
    update overwrites what was cropped."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._room = (key_states[..., :0, :], value_states[..., :0, :])
            self.keys, self.values = self._room
        held, new = self.keys.shape[-2], key_states.shape[-2]
        if held + new > self._room[0].shape[-2]:
            capacity = max(2 * (held + new), 16)
            rooms = []
            for old, fresh in ((self.keys, key_states), (self.values, value_states)):
                room = fresh.new_empty(*fresh.shape[:-2], capacity, fresh.shape[-1])
                room[..., :held, :] = old
                rooms.append(room)
            self._room = tuple(rooms)
        self._room[0][..., held: held + new, :] = key_states
        self._room[1][..., held: held + new, :] = value_states
        self.keys, self.values = self._room[0][..., : held + new, :], self._room[1][..., : held + new, :]
        return self.keys, self.values


def growing_cache(config) -> DynamicCache:
    """An empty cache for `config`'s model whose plain dynamic layers grow in place (sliding-window and
    other special layers stay as transformers makes them)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class _Pieces(DynamicCache):
    """The cache a packed forward passes: each layer's new keys and values, split by piece, go into the
    pieces' own caches; attention reads them there (DIRECT), or, for a model that turns what it cached
    into keys itself (MLA), every piece's whole cache is handed back, end to end (WHOLE: `lengths`). It also
    carries what attention checks: the mask the forward passed, and the layers that attended."""

    def __init__(self, caches: list[DynamicCache], spans: list[tuple[int, int]], mode: str, mask: torch.Tensor) -> None:
        super().__init__()
        self.caches, self.spans, self.mode, self.mask = caches, spans, mode, mask
        self.updated: list[int] = []
        self.attended: list[int] = []
        self.lengths: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layers = [cache.layers[layer_idx] for cache in self.caches]
        for layer, (start, end) in zip(layers, self.spans):
            layer.update(key_states[:, :, start:end], value_states[:, :, start:end])
        self.updated.append(layer_idx)
        if self.mode == DIRECT:
            return key_states, value_states
        self.lengths = [layer.keys.shape[-2] for layer in layers]
        return torch.cat([layer.keys for layer in layers], 2), torch.cat([layer.values for layer in layers], 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come from position_ids; nothing here is read as past


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Each piece's queries against its own cache, causal within the piece: [1, heads, N, d] -> [1, N, heads, d]."""
    pieces = _now.forward
    if (attention_mask is not pieces.mask or dropout or not getattr(module, "is_causal", True)
            or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux"))):
        raise Unpackable(f"{type(module).__name__} attends in a way a packed forward does not reproduce")
    layer = module.layer_idx
    if pieces.mode == DIRECT:
        cached = pieces.caches[0].layers[layer].keys
        if cached.shape[1] != key.shape[1] or cached.shape[-1] != key.shape[-1]:  # e.g. MLA caches a latent
            raise _Latent(f"{type(module).__name__} caches something other than the keys it attends with")
    elif key.shape[-2] != sum(pieces.lengths):
        raise Unpackable(f"{type(module).__name__} attends to other keys than its cache's")
    pieces.attended.append(layer)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    group = heads // kv_heads
    out, at = [], 0
    for i, (cache, (start, end)) in enumerate(zip(pieces.caches, pieces.spans)):
        if pieces.mode == DIRECT:
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
        else:  # this piece's whole cache, as the model made keys and values of it
            keys, values = key[:, :, at: at + pieces.lengths[i]], value[:, :, at: at + pieces.lengths[i]]
            at += pieces.lengths[i]
        n, length = end - start, keys.shape[-2]
        # the query heads that share a key head ride as extra rows of it (no copy of the keys)
        q = query[:, :, start:end].reshape(1, kv_heads, group * n, dim)
        mask = None
        if n > 1:  # row j of the piece sees the cache up to its own position, length - n + j
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
            mask = mask.repeat(group, 1) if group > 1 else mask
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        out.append(attended.view(1, heads, n, values.shape[-1]))  # (values may be narrower or wider: MLA)
    return torch.cat(out, 2).transpose(1, 2), None


@functools.cache
def _register() -> None:
    """Register the packed attention with transformers, once, at the first packed forward (not at import)."""
    AttentionInterface.register(NAME, _attention)


def forward(model: nn.Module, caches: list[DynamicCache], pieces: list[list[int]], past: list[int],
            keep: list[int] | None = None) -> torch.Tensor | None:
    """One forward of `pieces` (new token ids of each sequence, whose caches hold `past` positions) in one
    row; each cache gains its piece's keys and values. Returns the model's logits [1, len(keep), V] at the
    row's positions `keep` (None: no logits wanted, or a hook ended the forward early). The caller holds
    the model's lock. Raises Unpackable where the model's attention cannot be packed (the caches may then
    hold part of the pieces: start them over)."""
    _register()
    device = model.get_input_embeddings().weight.device
    ids, positions, spans = [], [], []
    for piece, p in zip(pieces, past):
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
        positions += range(p, p + len(piece))
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # a prepared mask, passed through as it is
    _now.forward = cache = _Pieces(caches, spans, _modes.get(model, DIRECT), mask)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    wanted = {} if keep is None else {"logits_to_keep": torch.tensor(keep, device=device)}
    computes_all = bool(wanted) and not _keeps_logits(type(model))
    output = None
    try:
        with stoppable():
            output = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                           attention_mask=mask, use_cache=True, **cache_kwargs(model, cache), **({} if computes_all else wanted))
    except Unpackable:
        raise
    except Exception as error:  # e.g. a model that checks the mask's size, or builds ALiBi from it
        raise Unpackable(f"{type(model).__name__} failed a packed forward: {error}") from error
    finally:
        config._attn_implementation = before
        _now.forward = None
    if not cache.updated or cache.attended != cache.updated:
        raise Unpackable(f"{type(model).__name__}'s layers do not all attend through transformers' attention interface")
    if keep is None or output is None or getattr(output, "logits", None) is None:
        return None
    return output.logits[:, wanted["logits_to_keep"]] if computes_all else output.logits


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    """Whether the model's forward computes the logits of chosen positions only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
