"""Precision and placement: bf16 generation against teacher forcing, the multi-device scoring path
(forced on the CPU), and layers a device_map offloads to disk (refused by name)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hguard import Guard, Probe

from conftest import PROMPTS
from guard_checks import streamed_equals_teacher_forced

# bf16 keeps 8 bits of mantissa: generation and teacher forcing run the same layers in other orders and
# shapes (one position against the whole sequence), so a probability moves by bf16's rounding of the
# logit (up to 5e-4 here); 5e-3 holds that with room, while a wrong position or layer is far off
BF16_TOL = 5e-3


def test_bf16_streamed_scores_match_teacher_forcing_within_its_rounding(tiny_dirs):
    directory = tiny_dirs("llama")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    guard = Guard(model, tokenizer, Probe.random(model, 12, seed=1))
    results = guard.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    gaps = []
    for prompt, result in zip(PROMPTS, results):
        if result.token_ids:
            reference = guard.score(prompt, result.token_ids)
            gaps += [abs(a - b) for a, b in zip(result.token_probs, reference.token_probs)]
    assert gaps and max(gaps) <= BF16_TOL
    fp32 = Guard(model.float(), tokenizer, Probe.random(model, 12, seed=1))
    exact = fp32.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert max(abs(a - b) for r, e in zip(results, exact) for a, b in zip(r.token_probs, e.token_probs)) > 0


def test_the_multi_device_scoring_path_equals_teacher_forcing(make_guard):
    """With hooked layers on several devices the monitor sums each layer's share where it is computed
    (no fused gather); on one CPU that path is forced by telling the binding its layers are apart."""
    guard = make_guard()
    guard.bound.single_device = False
    guard.bound.layer_weight = None
    streamed_equals_teacher_forced(guard, PROMPTS, max_new_tokens=8)
    for action, extra in (("abstain", {"threshold": 0.0}), ("dampen", {"threshold": 0.0, "alpha": 0.3})):
        apart = guard.generate(PROMPTS, max_new_tokens=6, do_sample=False, action=action, **extra)
        together = make_guard().generate(PROMPTS, max_new_tokens=6, do_sample=False, action=action, **extra)
        assert [r.token_ids for r in apart] == [r.token_ids for r in together]
        assert [r.token_probs for r in apart] == [pytest.approx(r.token_probs, abs=1e-5) for r in together]


def test_layers_offloaded_to_disk_are_refused_by_name(tiny_dirs, tmp_path):
    directory = tiny_dirs("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=str(tmp_path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"layers \[1\] are offloaded to disk"):
        Guard(model, tokenizer, Probe.random(AutoModelForCausalLM.from_pretrained(directory), 12, seed=1))
