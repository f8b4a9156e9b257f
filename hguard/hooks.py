"""Hooks on down projections, as context managers that always clean up.

`hooked(...)` gives a module a pre-hook (which may rewrite the neuron vector z before the down
projection runs) and a post-hook (which reads z and the projection's output h), with the semantics of
torch's forward pre-hooks and forward hooks: a pre-hook may return new positional arguments, a
post-hook a replacement output. They are installed as one wrapper around the module's `forward` (an
instance attribute that shadows the class's method, and wraps whatever was there, accelerate's
device hooks included) rather than through torch's hook registry: any registered hook sends every
call of its module down `nn.Module`'s slow path, about 5 us of host time, and a decoding step of an
8B model calls 32 hooked modules, where the wrapper costs one Python call. Every wrapper is removed in
`finally`, whatever happens inside. `StopForward` lets a hook end a forward pass early once the last
layer anyone needs has run (the rest of the model and the LM head are skipped), as baukit's
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


_ABSENT = object()  # the module had no instance `forward` of its own before


@contextmanager
def hooked(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Install the given hooks for the duration of the block; every wrapper is removed on exit, last
    installed first. A second spec on the same module wraps the first (its post-hook sees the first's
    output, and its arguments before the first's pre-hook), so one spec carries a module's pre and post."""
    installed: list[tuple[nn.Module, object]] = []  # (module, what its instance `forward` was, or _ABSENT)
    try:
        for spec in specs:
            if spec.pre is None and spec.post is None:
                continue
            installed.append((spec.module, spec.module.__dict__.get("forward", _ABSENT)))
            spec.module.forward = _wrapper(spec)
        yield
    finally:
        for module, previous in reversed(installed):
            if previous is _ABSENT:
                del module.forward
            else:
                module.forward = previous


def _wrapper(spec: HookSpec) -> Callable:
    module, pre, post = spec.module, spec.pre, spec.post
    inner = module.forward  # the class's bound method, or a wrapper already installed (accelerate's, ours)

    def forward(*args, **kwargs):
        if pre is not None:
            replaced = pre(module, args)
            if replaced is not None:
                args = replaced if isinstance(replaced, tuple) else (replaced,)
        output = inner(*args, **kwargs)
        if post is not None:
            replaced = post(module, args, output)
            if replaced is not None:
                output = replaced
        return output

    forward.hguard_inner = inner  # marks the wrapper as hguard's (see hook_count)
    return forward


@contextmanager
def stoppable() -> Iterator[None]:
    """Swallow a `StopForward` raised inside the block (the forward pass ended on purpose)."""
    try:
        yield
    except StopForward:
        pass


def hook_count(model: nn.Module) -> int:
    """Hooks on `model` now: torch's registered forward and pre-forward hooks anywhere in it, plus
    hguard's forward wrappers (0 with the guard off)."""
    count = 0
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks)
        forward = module.__dict__.get("forward")
        while hasattr(forward, "hguard_inner"):
            count, forward = count + 1, forward.hguard_inner
    return count
