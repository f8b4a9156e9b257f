"""Monitor: the live state of one guarded generation (or one teacher-forced scoring pass).

It owns the hooks on the layers a probe selects. A prompt or teacher-forced pass adds every hooked
layer's share of the fused logit into one [batch, positions] accumulator. A decoding step's hooks only
keep references to each layer's z and h; after the last hooked layer one concatenation, one gather,
one stack and one norm reduce them to the step's selected z and per-layer ||h||. Where a decision
depends on the score during decoding (abstain, dampen), the step's logit is formed at once and the
policy is updated with tensor ops only (running mean -> calibrated probability -> triggered rows ->
per-row scale factor); otherwise (flag) the remaining arithmetic waits and runs once for all pending
steps when a score is read. No tensor op runs per layer, and nothing waits on the device per layer or
per step (on a GPU each kernel launch is host time a step pays for). A generated token's activations
exist only when it is fed back, one forward after it was sampled: forward 0 is the prompt (prefill),
and forward s >= 1 scores generated token s - 1. `score_last_tokens` runs the one extra forward that the
final token needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from .compat import cache_kwargs
from .hooks import HookSpec, StopForward, hooked, stoppable
from .policy import Policy
from .probe import EPS, BoundProbe, LayerTerm
from .token_inputs import TokenTerm


class Monitor:
    """Per-token probe logits for one batch; `policy=None` records the score only (teacher forcing)."""

    def __init__(self, bound: BoundProbe, policy: Policy | None = None, *, stop_early: bool = False,
                 step_timer: Callable[[float], None] | None = None, token_inputs: bool = True) -> None:
        self.bound = bound
        self.policy = policy
        self.calibration = bound.probe.calibration
        # the probe's token inputs (token_inputs.py): a teacher-forced pass adds them once its logits exist;
        # token_inputs=False leaves them to the caller (a packed forward, whose one row holds several answers)
        self.tokens = None if bound.token_weight is None or not token_inputs else TokenTerm(
            bound.token_weight, bound.model, self._add_tokens if policy is None else None)
        # end each forward after the last hooked layer (no logits needed; but for token inputs when teacher forcing)
        self.stop_early = stop_early and (bound.token_weight is None or policy is not None)
        self.whole = False  # the next forward feeds whole sequences to score their last position only
        self.forwards = 0  # completed forward passes; 0 until the prefill has run
        self._logits: list[torch.Tensor] = []  # forward s >= 1: [batch] logit of generated token s - 1
        # flag's unfinished steps: ([batch, k] selected z, [hooked layers, batch] ||h||, token term) each
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.full_logits: torch.Tensor | None = None  # teacher forcing: [batch, positions]
        self._acc: torch.Tensor | None = None
        self._z: list[torch.Tensor] = []  # decoding fast path: per hooked layer, its z [batch, 1, I]
        self._h: list[torch.Tensor] = []  # ... and its output h [batch, 1, H] (references, no copy)
        self._h_versions: list[int] = []  # ... and h's in-place version counter when kept
        self._index: torch.Tensor | None = None  # the selected neurons in those z laid end to end (first step)
        self._fast = policy is not None and bound.single_device
        self._running: torch.Tensor | None = None  # [batch] sum of logits so far
        self.triggered: torch.Tensor | None = None  # [batch] bool: the policy has acted on this row
        self.trigger_token: torch.Tensor | None = None  # [batch] generated index that triggered, or -1
        self.factor: torch.Tensor | float = 1.0  # what H-Neurons are multiplied by (per row for dampen)
        self.step_timer = step_timer  # receives the host seconds spent in hooks per forward, if set
        self._hook_seconds = 0.0
        self._alpha: torch.Tensor | None = None
        self._unscaled: dict[int, torch.Tensor] = {}  # layer -> its H-Neurons' z before this forward scaled them
        self._ones: torch.Tensor | None = None
        if policy is not None and policy.action == "scale":
            self.factor = float(policy.alpha)

    # ---- hooks --------------------------------------------------------------------------------
    @contextmanager
    def attached(self) -> Iterator["Monitor"]:
        terms = self.bound.terms
        specs = [
            HookSpec(
                module=self.bound.sites.down(term.layer),
                pre=self._pre_hook(term) if self.policy is not None and self.policy.scales else None,
                post=self._post_hook(term, first=i == 0, last=i == len(terms) - 1),
                neurons=term.neurons,
            )
            for i, term in enumerate(terms)
        ]
        with hooked(specs + (self.tokens.specs() if self.tokens is not None else [])):
            yield self

    def _pre_hook(self, term: LayerTerm):
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            if isinstance(self.factor, float) and self.factor == 1.0:
                return None
            self._unscaled[term.layer] = args[0].index_select(-1, term.h_index)  # what the probe reads
            return (term.scale(args[0], self.factor), *args[1:])

        return pre

    def _as_read(self, term: LayerTerm, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """After a scaled forward of `term`'s layer: put the H-Neurons' values from before the scaling back
        into z (the model is done with it) and return h as the unscaled z would have made it, so that the
        score says what the probe read before the guard acted, not the damped activations."""
        before = self._unscaled.pop(term.layer, None)
        if before is None:
            return h
        removed = before - z.index_select(-1, term.h_index)  # [..., m] what the scaling took away
        z.index_copy_(-1, term.h_index, before)
        return h + removed.to(h.dtype) @ self.bound.h_columns(term).to(h.dtype)

    def _post_hook(self, term: LayerTerm, first: bool, last: bool):
        keep_z, keep_h, keep_version = self._z.append, self._h.append, self._h_versions.append
        reads_unscaled = self.policy is not None and self.policy.scales

        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            """Decoding: no tensor op here, all of them once per step (`_end_forward`)."""
            if self.forwards > 0:  # never the prompt's: its whole z would stay alive to the last layer
                z = args[0]
                if reads_unscaled:
                    output = self._as_read(term, z, output)
                if self.whole:  # the final token's forward without a cache: hold its last position only
                    z, output = z[:, -1:].clone(), output[:, -1:].clone()
                keep_z(z)
                keep_h(output)
                keep_version(output._version)

        if self._fast and not last and self.step_timer is None:  # most hooks of a generation
            return keep

        def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            started = time.perf_counter() if self.step_timer is not None else 0.0
            if self._fast:
                keep(module, args, output)
            elif self.policy is None or self.forwards > 0:  # the prompt's positions are never scored
                if reads_unscaled:
                    output = self._as_read(term, args[0], output)
                z = args[0] if self.policy is None else args[0][:, -1:]
                h = output if self.policy is None else output[:, -1:]
                part = term.logit(z, h)
                self._acc = part if first else self._acc + part.to(self._acc.device)  # layers on several devices
            if last:
                self._end_forward()
            if self.step_timer is not None:
                self._hook_seconds += time.perf_counter() - started
                if last:
                    self.step_timer(self._hook_seconds)
                    self._hook_seconds = 0.0
            if last and self.stop_early:
                raise StopForward

        return post

    # ---- per-forward bookkeeping ----------------------------------------------------------------
    def _add_tokens(self, terms: torch.Tensor) -> None:
        """Teacher forcing: the token inputs' terms of every position, once the forward's logits exist."""
        if self.full_logits is not None:
            self.full_logits = self.full_logits + terms.to(self.full_logits.device)

    def _step_tokens(self) -> torch.Tensor | None:
        """Decoding: this step's token's token-input term ([batch]; None for a probe without them)."""
        return None if self.tokens is None else self.tokens.step()

    @staticmethod
    def _plus(logit: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        return logit if tokens is None else logit + tokens.to(logit.device)

    def _end_forward(self) -> None:
        if self.policy is None:
            self.full_logits = self._acc + self.bound.bias
        elif self.forwards > 0:  # the prompt's positions are never scored
            if not self._fast:
                self._logits.append(self._plus(self._acc[:, -1] + self.bound.bias, self._step_tokens()))
            elif self.policy.watches:
                self._logits.append(self._plus(self._combine(*self._reduce()), self._step_tokens()))
            else:  # nothing acts on the score during decoding: finish it when it is read
                self._pending.append((*self._reduce(), self._step_tokens()))
            if self.policy.watches:
                self._watch(self._logits[-1], token=self.forwards - 1)
        self._acc = None
        self.forwards += 1

    def _reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's selected z [batch, k] and ||h|| [hooked layers, batch] (fp32), from the references
        the hooks kept, in four kernels whatever the number of hooked layers."""
        if self._index is None:  # the layers' widths are the same at every step
            self._index = self.bound.flat_index(tuple(z.shape[-1] for z in self._z))
        for i, (h, version) in enumerate(zip(self._h, self._h_versions)):
            if h._version != version:  # the layer added to h in place (falcon's parallel attention):
                module = self.bound.sites.down(self.bound.terms[i].layer)  # h again, as the layer made it
                self._h[i] = type(module).forward(module, self._z[i])
        self._h_versions.clear()
        z = torch.cat(self._z, dim=-1)[:, -1].index_select(1, self._index)
        norms = torch.linalg.vector_norm(torch.stack(self._h)[:, :, -1], dim=-1, dtype=torch.float32)
        self._z.clear()
        self._h.clear()
        return z, norms

    def _combine(self, z: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """sum_l (sum_{j in l} w_j |z_j|) / ||h_l|| + b from `_reduce`'s output, for one step ([batch, k],
        [layers, batch]) or several stacked ([steps, batch, k], [steps, layers, batch]) -> [(steps,) batch]."""
        per_layer = z.float().abs() @ self.bound.layer_weight  # [..., batch, hooked layers]
        return (per_layer / (norms.transpose(-1, -2) + EPS)).sum(-1) + self.bound.bias

    def _settle(self) -> None:
        """Finish the pending steps' logits, all in one batch of kernels."""
        if len(self._pending) == 1:  # a streamed generation reads every step as it comes
            z, norms, tokens = self._pending[0]
            self._logits.append(self._plus(self._combine(z, norms), tokens))
        elif self._pending:
            z, norms, tokens = zip(*self._pending)
            logits = self._combine(torch.stack(z), torch.stack(norms))
            self._logits.extend(self._plus(logits, None if self.tokens is None else torch.stack(tokens)).unbind(0))
        self._pending.clear()

    def _watch(self, logit: torch.Tensor, token: int) -> None:
        if self._running is None:
            self._running = torch.zeros_like(logit)
            self.triggered = torch.zeros_like(logit, dtype=torch.bool)
            self.trigger_token = torch.full_like(logit, -1, dtype=torch.long)
        self._running += logit
        probability = self.calibration(self._running / (token + 1))
        fired = (probability >= self.policy.trigger) & ~self.triggered
        self.trigger_token = torch.where(fired, token, self.trigger_token)
        self.triggered |= fired
        if self.policy.action == "dampen":
            if self._alpha is None:  # built once per generation, reused every step
                self._alpha = torch.full_like(logit, self.policy.alpha)
                self._ones = torch.ones_like(logit)
            self.factor = torch.where(self.triggered, self._alpha, self._ones)

    def collect(self, forward: int) -> None:
        """After forward `forward`: nothing to do here (the hooks ended it); a GraphMonitor's step."""

    @contextmanager
    def finishing(self, whole: bool, factor: torch.Tensor | None) -> Iterator[None]:
        """The final token's forward: stop after the last hooked layer, keep the last position only where
        `whole` sequences run, and scale by `factor` per row and position where given."""
        kept = self.factor
        self.stop_early, self.whole = True, whole
        if factor is not None:
            self.factor = factor.to(kept.dtype)
        try:
            yield
        finally:
            self.stop_early, self.whole, self.factor = False, False, kept

    # ---- results ------------------------------------------------------------------------------
    @property
    def scored(self) -> int:
        """How many generated tokens have a score so far."""
        return len(self._logits) + len(self._pending)

    def step_logit(self, step: int) -> torch.Tensor:
        """[batch] probe logit of generated token `step`, on the model's device."""
        self._settle()
        return self._logits[step]

    def token_logits(self) -> torch.Tensor:
        """[batch, scored] probe logits of the generated tokens, on the model's device."""
        self._settle()
        return torch.stack(self._logits, dim=1)

    def stopped(self) -> torch.Tensor | None:
        """[batch] rows the policy stopped (abstain), for a stopping criterion; None if none can be."""
        if self.policy is None or self.policy.action != "abstain":
            return None
        return self.triggered


def score_last_tokens(
    model: nn.Module,
    monitor: Monitor,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache | None,
    prompt_width: int,
) -> None:
    """Feed the final generated token of every row back once, so it gets a score like the others.

    `attention_mask` covers `sequences` (prompt padding and all generated positions); the prompt is
    `sequences`' first `prompt_width` columns. The forward stops after the last hooked layer: no later
    layer and no LM head run. With generation's cache it is one position; without one (`use_cache=False`)
    or with a fixed-size one that is full (a sliding window's; the episode sizes a static cache one
    longer), the whole sequences run again and only their last position is kept. Dampen's factors apply
    as generation applied them: after a cached generation, to each row's positions after its trigger;
    without a cache, every step ran the whole sequences with the row's current factor, and so does this
    one.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    whole, factor = not _extendable(cache, sequences.shape[1]), None
    if whole and cache is not None and isinstance(monitor.factor, torch.Tensor):  # alpha after each row's trigger
        width = sequences.shape[1]
        trigger = monitor.trigger_token
        first = torch.where(trigger >= 0, prompt_width + trigger + 1, width)
        columns = torch.arange(width, device=first.device)
        factor = torch.where(columns >= first[:, None], monitor.policy.alpha, 1.0)
    with torch.no_grad(), monitor.finishing(whole, factor), stoppable():
        if whole:
            model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        else:
            model(input_ids=sequences[:, -1:], attention_mask=attention_mask, position_ids=positions[:, -1:],
                  use_cache=True, **cache_kwargs(model, cache))


def _extendable(cache: Cache | None, positions: int) -> bool:
    """Whether generation's cache can take one more position, for `positions` in all: not where there is
    none, nor where a fixed-size static layer has no room left (a static cache is sized to the generation's
    length less one unless the episode asked for one more, `max_cache_len`; a sliding window's is smaller)."""
    return cache is not None and all(layer.max_cache_len >= positions for layer in getattr(cache, "layers", ())
                                     if isinstance(layer, StaticLayer))
