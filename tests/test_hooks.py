"""hooked(): torch's hook semantics, installed as forward wrappers that always come off."""

import pytest
import torch
from torch import nn

from hguard.hooks import HookSpec, hook_count, hooked


def test_hooks_rewrite_inputs_and_outputs_nest_and_come_off():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    plain = layer(x)
    seen = []
    double_and_record = HookSpec(layer, pre=lambda m, args: (args[0] * 2,),
                                 post=lambda m, args, out: seen.append((args[0], out)))
    negate = HookSpec(layer, post=lambda m, args, out: -out)
    with hooked([double_and_record]):
        assert hook_count(layer) == 1
        with hooked([negate]):  # a second spec wraps the first: it sees the first's output
            assert hook_count(layer) == 2
            assert torch.allclose(layer(x), -layer.__class__.forward(layer, 2 * x))
        assert torch.allclose(layer(x), layer.__class__.forward(layer, 2 * x))
    assert torch.equal(seen[0][0], 2 * x)  # the post-hook saw the pre-hook's rewritten input
    assert hook_count(layer) == 0 and "forward" not in layer.__dict__
    assert torch.equal(layer(x), plain)


def test_an_existing_instance_forward_is_kept_and_restored():
    layer = nn.Linear(4, 3)
    calls = []
    original = layer.forward

    def device_hook(*args, **kwargs):  # what accelerate's add_hook_to_module installs
        calls.append("device")
        return original(*args, **kwargs)

    layer.forward = device_hook
    with pytest.raises(RuntimeError, match="boom"):
        with hooked([HookSpec(layer, post=lambda m, a, o: calls.append("post"))]):
            layer(torch.randn(1, 4))
            raise RuntimeError("boom")
    assert calls == ["device", "post"]
    assert layer.__dict__["forward"] is device_hook and hook_count(layer) == 0


def test_blocks_on_one_module_may_end_in_any_order():
    layer = nn.Linear(4, 3)
    calls = []
    first = hooked([HookSpec(layer, post=lambda m, a, o: calls.append("first"))])
    second = hooked([HookSpec(layer, post=lambda m, a, o: calls.append("second"))])
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the inner wrapper leaves first; the outer one keeps working
    layer(torch.randn(1, 4))
    assert calls == ["second"] and hook_count(layer) == 1
    second.__exit__(None, None, None)
    layer(torch.randn(1, 4))
    assert calls == ["second"] and hook_count(layer) == 0 and "forward" not in layer.__dict__


def test_guard_under_accelerate_device_hooks(make_guard):
    """accelerate's hooks (what device_map installs) stay in place under the guard's and after it, and
    the scores are those of the same model without them."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    guard = make_guard("llama")
    prompt = "Where was Ada Lovelace born?"
    expected = guard.generate([prompt], max_new_tokens=6, do_sample=False)[0]
    downs = [guard.bound.sites.down(term.layer) for term in guard.bound.terms]
    for down in downs:
        add_hook_to_module(down, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    installed = [down.forward for down in downs]
    result = guard.generate([prompt], max_new_tokens=6, do_sample=False)[0]
    assert result.token_ids == expected.token_ids
    assert result.token_probs == pytest.approx(expected.token_probs, abs=1e-6)
    assert [down.forward for down in downs] == installed and hook_count(guard.model) == 0
    for down in downs:
        remove_hook_from_module(down)  # accelerate's own removal still finds what it installed
        assert not hasattr(down, "_hf_hook") and not hasattr(down.forward, "hguard_inner")
    assert guard.generate([prompt], max_new_tokens=6, do_sample=False)[0].token_probs == \
        pytest.approx(expected.token_probs, abs=1e-6)


def test_decoding_hooks_hold_no_prompt_activations(make_guard):
    """The prefill's z and h (the whole prompt, every hooked layer) are never kept for the step's
    combine: only decoding steps, one position each, are."""
    from hguard.monitor import Monitor
    from hguard.policy import Policy

    guard = make_guard("llama")
    monitor = Monitor(guard.bound, Policy("flag"))
    last = guard.bound.sites.down(guard.bound.terms[-1].layer)
    held = []  # at the last hooked layer of each forward: what the earlier layers' hooks kept
    handle = last.register_forward_pre_hook(lambda m, args: held.append([tuple(z.shape) for z in monitor._z]))
    ids, mask = guard._batch([guard.encode(p) for p in ("Who wrote it?", "Where was Ada Lovelace born?")])
    try:
        with monitor.attached(), torch.no_grad():
            guard.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 pad_token_id=guard._pad_id())
    finally:
        handle.remove()
    earlier = len(guard.bound.terms) - 1
    assert held[0] == [] and len(held) == 3
    assert all(len(step) == earlier and all(shape[:2] == (2, 1) for shape in step) for step in held[1:])


def test_a_wrapped_forward_keeps_its_signature():
    """transformers reads a model's forward signature (position_ids, logits_to_keep, ...) to decide what
    to pass it; a hooked model must show the same (otherwise generation left-pads without position ids)."""
    import inspect

    layer = nn.Linear(4, 3)
    before = inspect.signature(layer.forward)
    with hooked([HookSpec(layer, post=lambda m, args, out: None)]), hooked([HookSpec(layer, pre=lambda m, a: None)]):
        assert inspect.signature(layer.forward) == before
