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

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple], tuple | None]
PostHook = Callable[[nn.Module, tuple, torch.Tensor], None]


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.Lock:
    """The one lock of `model`: whatever hooks a model (every Guard on it, every scorer) holds it for the
    whole forward or generation, since hooks on a module see every forward that runs through it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


class StopForward(Exception):
    """Raised by a hook to end the current forward pass early; caught by `stoppable`."""


@dataclass(frozen=True)
class HookSpec:
    module: nn.Module
    pre: PreHook | None = None
    post: PostHook | None = None
    neurons: torch.Tensor | None = None  # the neurons the hooks read (None: all); a virtual module computes only those


@contextmanager
def hooked(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Install the given hooks for the duration of the block; every wrapper is removed on exit. A
    second spec on the same module wraps the first (its post-hook sees the first's output, and its
    arguments before the first's pre-hook), so one spec carries a module's pre and post. Blocks on one
    module may end in any order: each takes out only its own wrapper."""
    installed: list[tuple[nn.Module, Callable]] = []
    with ExitStack() as attachments:
        try:
            for spec in specs:
                if spec.pre is not None or spec.post is not None:
                    attach = getattr(spec.module, "hguard_attached", None)  # experts.ExpertsDown
                    if attach is not None:
                        attachments.enter_context(attach(spec.neurons))
                    wrapper = _wrapper(spec)
                    spec.module.forward = wrapper
                    installed.append((spec.module, wrapper))
            yield
        finally:
            for module, wrapper in reversed(installed):
                unwrap(module, wrapper)


def _wrapper(spec: HookSpec) -> Callable:
    module, pre, post = spec.module, spec.pre, spec.post

    def forward(*args, **kwargs):
        if pre is not None:
            replaced = pre(module, args)
            if replaced is not None:
                args = replaced if isinstance(replaced, tuple) else (replaced,)
        output = forward.hguard_inner(*args, **kwargs)
        if post is not None:
            replaced = post(module, args, output)
            if replaced is not None:
                output = replaced
        return output

    # what it wraps: the class's bound method, or a wrapper already there (accelerate's, another of ours)
    forward.hguard_inner = module.forward
    # inspect.signature follows __wrapped__: transformers reads a model's forward signature to decide what
    # to pass (position_ids, logits_to_keep, ...), and a wrapped model must keep getting the same
    forward.__wrapped__ = module.forward
    return forward


def unwrap(module: nn.Module, wrapper: Callable) -> None:
    """Take `wrapper` out of the module's chain of forward wrappers, wherever it is in the chain."""
    outer, current = None, module.__dict__.get("forward")
    while current is not None and current is not wrapper:
        outer, current = current, getattr(current, "hguard_inner", None)
    if current is None:  # not in the chain (already taken out)
        return
    inner = wrapper.hguard_inner
    if outer is not None:
        outer.hguard_inner = inner
    elif getattr(inner, "__self__", None) is module and getattr(inner, "__func__", None) is type(module).forward:
        del module.forward  # back to the class's own method
    else:
        module.forward = inner


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
