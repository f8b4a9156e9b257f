"""Views of a module that the model calls on flattened tokens, seen by the hooks as [batch, positions, ...].

OPT's decoder layers reshape their hidden states to [tokens, features] before the MLP and back after
it, so its down projection sees z as [tokens, intermediate]; a mixture-of-experts block hands its
experts [tokens, hidden] too (experts.py). Every hook reads [batch, positions, ...] (the last position
of each row, a teacher-forced pass's every position). A `TokenView` is never part of the model: while a
hook is on it (`hooks.hooked` enters `hguard_attached`), its parent's forward records the input's
[batch, positions] and the module's forward runs through the view, which hands the hooks z and h in
that shape (through the view's own `forward`, where they are installed) and gives the model back the
flattened output. `FlatDown` is the view of a plain down projection.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .hooks import unwrap


class TokenView:
    """One view per module (`of`); `routed` puts it between the model and the module for a block."""

    _views: "weakref.WeakKeyDictionary[nn.Module, TokenView]"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._views = weakref.WeakKeyDictionary()

    def __init__(self, module: nn.Module, parent: nn.Module) -> None:
        self.module, self.parent = module, parent
        self._shape: tuple[int, ...] | None = None  # the parent's [batch, positions] in the current forward

    @classmethod
    def of(cls, module: nn.Module, parent: nn.Module) -> "TokenView":
        view = cls._views.get(module)
        if view is None:
            view = cls._views[module] = cls(module, parent)
        return view

    def batch_shape(self, tokens: int) -> tuple[int, ...]:
        """[batch, positions] of `tokens` flattened tokens: the parent's, or one row if it did not say."""
        return self._shape if self._shape is not None and math.prod(self._shape) == tokens else (1, tokens)

    @contextmanager
    def routed(self, forward: Callable) -> Iterator[None]:
        """For the block, the module runs `forward(inner, *args, **kwargs)` (inner: its own forward as it
        was), and the parent records its input's [batch, positions] first."""
        module, parent, view = self.module, self.parent, self

        def parent_forward(hidden_states, *args, **kwargs):
            view._shape = tuple(hidden_states.shape[:-1])
            return parent_forward.hguard_inner(hidden_states, *args, **kwargs)

        def module_forward(*args, **kwargs):
            return forward(module_forward.hguard_inner, *args, **kwargs)

        parent_forward.hguard_inner, module_forward.hguard_inner = parent.forward, module.forward
        parent.forward, module.forward = parent_forward, module_forward
        try:
            yield
        finally:
            for wrapped, wrapper in ((module, module_forward), (parent, parent_forward)):
                unwrap(wrapped, wrapper)
            self._shape = None


class FlatDown(TokenView):
    """The view of a down projection called on [tokens, intermediate] inside decoder layer `parent`."""

    def __init__(self, module: nn.Module, parent: nn.Module) -> None:
        super().__init__(module, parent)
        self._inner = None  # the projection's forward as it was when attached (accelerate's wrapper, say)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """h = the projection of z, in z's shape (what the hooks on this view wrap)."""
        return self._inner(z) if self._inner is not None else type(self.module).forward(self.module, z)

    def _through(self, inner: Callable, z: torch.Tensor) -> torch.Tensor:
        self._inner = inner
        h = self.forward(z.view(*self.batch_shape(z.shape[0]), z.shape[-1]))  # through the hooks on `forward`
        return h.reshape(z.shape[0], h.shape[-1])

    @contextmanager
    def hguard_attached(self, live: torch.Tensor | None = None) -> Iterator[None]:
        """Route the projection through this view for the block (`live` is for experts.py's views)."""
        try:
            with self.routed(self._through):
                yield
        finally:
            self._inner = None
