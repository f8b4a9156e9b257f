"""GraphMonitor: the guard's per-step arithmetic in a form that a compiled decoding step can hold.

With a static cache on a GPU, transformers compiles the decoding step (CUDA graphs). Python in a hook
would be traced once and baked in, so here the hooked layers do tensor work only: each writes its
share of the step's probe logit, (sum_j w_j |z_j| ||W_j||) / ||h||, into one persistent buffer
`parts` [hooked layers, rows], and (dampen, scale) multiplies its H-Neurons by a persistent per-row
`factor`, scoring the values from before the scaling as the eager Monitor does. The Python side of a
step (the logit, the policy's running mean and trigger, the next factor) runs after the forward, when
the stream or the stopping criterion first sees the step (`collect`). Buffers and wrappers belong to
one (probe binding, batch size) and are reused by every generation of that size, so a graph traced
through them stays valid: dynamo guards on the same function objects and the same buffers, and a
CUDA graph replays into the same addresses. Without compilation (a CPU, a dynamic cache) the same
code runs eagerly and gives the same scores.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .hooks import StopForward
from .monitor import Monitor
from .policy import Policy
from .probe import BoundProbe, LayerTerm

_TAPS: "weakref.WeakKeyDictionary[BoundProbe, dict[int, GraphTap]]" = weakref.WeakKeyDictionary()


class GraphTap:
    """The persistent buffers and forward wrappers of one probe binding at one batch size."""

    def __init__(self, bound: BoundProbe, rows: int) -> None:
        first = bound.sites.down(bound.terms[0].layer).weight
        self.parts = torch.zeros(len(bound.terms), rows, dtype=torch.float32, device=first.device)
        self.factor = torch.ones(rows, 1, dtype=first.dtype, device=first.device)  # [rows, 1 or positions]
        for buffer in (self.parts, self.factor):
            torch._dynamo.mark_static_address(buffer)  # written in place by a captured graph
        self.scaling = False  # whether H-Neurons are scaled this generation (dynamo guards on it)
        self.stop_early = False  # end the forward after the last hooked layer (the final token's scoring)
        last = len(bound.terms) - 1
        self.wrappers = [(bound.sites.down(term.layer), self._wrapper(bound, i, term, i == last))
                         for i, term in enumerate(bound.terms)]

    @classmethod
    def of(cls, bound: BoundProbe, rows: int) -> "GraphTap":
        taps = _TAPS.setdefault(bound, {})
        if rows not in taps:
            taps[rows] = cls(bound, rows)
        return taps[rows]

    def _wrapper(self, bound: BoundProbe, i: int, term: LayerTerm, last: bool):
        module = bound.sites.down(term.layer)
        forward_of = type(module).forward
        columns = bound.h_columns(term) if term.h_index.numel() else None
        tap = self

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            before = None
            if tap.scaling and columns is not None:
                before = x[:, -1].index_select(-1, term.h_index)  # what the probe reads: the unscaled values
                x = term.scale(x, tap.factor)
            out = forward_of(module, x, *args, **kwargs)
            z, h = x[:, -1:], out[:, -1:]
            if before is not None:
                after = z[:, 0].index_select(-1, term.h_index)
                z = z.index_copy(-1, term.h_index, before[:, None])
                h = h + ((before - after).to(h.dtype) @ columns.to(h.dtype))[:, None]
            tap.parts[i].copy_(term.logit(z, h)[:, 0])
            if last and tap.stop_early:
                raise StopForward
            return out

        return forward


class GraphMonitor(Monitor):
    """A Monitor whose hooks a compiled decoding step can hold (see the module docstring). Single-device
    probe bindings only; the results interface is the Monitor's."""

    def __init__(self, bound: BoundProbe, policy: Policy, rows: int) -> None:
        super().__init__(bound, policy)
        self.rows = rows
        self.tap: GraphTap | None = None  # taken when the hooks go on (under the model's lock)

    @staticmethod
    def usable(bound: BoundProbe) -> bool:
        """Whether this binding can be tapped so: its layers on one device, down projections the model calls
        as they are (not experts.py's or flat.py's views), no other forward wrapper, and no token inputs
        (token_inputs.py reads the logits in Python)."""
        downs = [bound.sites.down(term.layer) for term in bound.terms]
        plain = all(isinstance(d, torch.nn.Module) and "forward" not in d.__dict__ for d in downs)
        return bound.single_device and bound.token_weight is None and plain

    @contextmanager
    def attached(self) -> Iterator["GraphMonitor"]:
        """Set the tap of this batch size for this generation and put its wrappers on; the caller holds
        the model's lock, so no other generation shares the tap meanwhile."""
        self.tap = GraphTap.of(self.bound, self.rows)
        self.tap.scaling, self.tap.stop_early = self.policy.scales, False
        self.tap.factor.fill_(self.factor if isinstance(self.factor, float) else 1.0)
        installed = []
        try:
            for module, forward in self.tap.wrappers:
                module.forward = forward
                installed.append(module)
            yield self
        finally:
            for module in installed:
                del module.forward

    def collect(self, forward: int) -> None:
        """After forward `forward` (0: the prompt's): its scores and the policy's step, once."""
        if forward != self.forwards:
            return
        if forward > 0:
            logit = self.tap.parts.sum(0) + self.bound.bias
            self._logits.append(logit)
            if self.policy.watches:
                self._watch(logit, token=forward - 1)
                if isinstance(self.factor, torch.Tensor):
                    self.tap.factor.copy_(self.factor[:, None])
        self.forwards += 1

    @contextmanager
    def finishing(self, whole: bool, factor: torch.Tensor | float | None) -> Iterator[None]:
        """The final token's forward (eager): stop after the last hooked layer, scale by `factor` per
        row and position where given, then collect it."""
        kept = self.tap.factor
        self.tap.stop_early = True
        if isinstance(factor, torch.Tensor):
            self.tap.factor = factor.to(kept.dtype)
        try:
            yield
        finally:
            self.tap.stop_early, self.tap.factor = False, kept
        self.collect(self.forwards)
