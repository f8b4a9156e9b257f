"""Hooks on down projections, as context managers that always clean up.

`hooked(...)` registers forward pre-hooks (which may rewrite the neuron vector z before the down
projection runs) and forward hooks (which read z and the projection's output h), and removes every
handle in `finally`, whatever happens inside. `StopForward` lets a hook end a forward pass early once
the last layer anyone needs has run (the rest of the model and the LM head are skipped), as baukit's
`Trace(stop=True)` does. With the guard off nothing here is called, so the model carries no hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple], tuple | None]
PostHook = Callable[[nn.Module, tuple, torch.Tensor], None]


class StopForward(Exception):
    """Raised by a hook to end the current forward pass early; caught by `stoppable`."""


@dataclass(frozen=True)
class HookSpec:
    module: nn.Module
    pre: PreHook | None = None
    post: PostHook | None = None


@contextmanager
def hooked(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Install the given hooks for the duration of the block; every handle is removed on exit."""
    handles = []
    try:
        for spec in specs:
            if spec.pre is not None:
                handles.append(spec.module.register_forward_pre_hook(spec.pre))
            if spec.post is not None:
                handles.append(spec.module.register_forward_hook(spec.post))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def stoppable() -> Iterator[None]:
    """Swallow a `StopForward` raised inside the block (the forward pass ended on purpose)."""
    try:
        yield
    except StopForward:
        pass


def hook_count(model: nn.Module) -> int:
    """Forward and pre-forward hooks currently registered anywhere in `model` (0 with the guard off)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
