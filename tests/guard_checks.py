"""What a guarded architecture must satisfy, as functions of a Guard: shared by test_guard.py (the seven
hand-picked architectures) and test_conformance_matrix.py (every causal-LM type transformers has)."""

from __future__ import annotations

import copy

import pytest
import torch

from hguard import Guard, GuardResult, Probe, TokenEvent, resolve

TOL = 1e-4


def collect(events) -> tuple[dict[int, list[TokenEvent]], list[GuardResult]]:
    tokens: dict[int, list[TokenEvent]] = {}
    results: list[GuardResult] = []
    for event in events:
        if isinstance(event, GuardResult):
            results.append(event)
        else:
            tokens.setdefault(event.row, []).append(event)
    return tokens, results


def streamed_equals_teacher_forced(guard: Guard, prompts: list, max_new_tokens: int = 10) -> None:
    """Flag: every streamed token's score equals a teacher-forced `guard.score` of the same tokens, and
    `generate` gives the stream's tokens and scores."""
    tokens, results = collect(guard.stream(prompts, max_new_tokens=max_new_tokens, do_sample=False))
    assert len(results) == len(prompts)
    assert any(result.token_ids for result in results)  # something was scored
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        streamed = [e for e in tokens.get(row, []) if e.token_id >= 0]
        assert [e.token_id for e in streamed] == result.token_ids
        assert "".join(e.text for e in tokens.get(row, [])) == result.text
        if not result.token_ids:  # a random model may end a row at once: an empty answer, nothing to score
            assert result.probability is None and result.text == ""
            continue
        reference = guard.score(prompt, result.token_ids)
        assert len(reference.token_probs) == len(result.token_probs)
        for event, expected in zip(streamed, reference.token_probs):
            assert event.probability == pytest.approx(expected, abs=TOL)
        assert result.probability == pytest.approx(reference.probability, abs=TOL)
    again = guard.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False)
    for a, b in zip(again, results):
        assert a.token_ids == b.token_ids
        assert a.token_probs == pytest.approx(b.token_probs, abs=1e-6)


def proxy_scores_equal_teacher_forced(guard: Guard, prompts: list, max_new_tokens: int = 10) -> None:
    """Proxy mode's scorer: the growing answers of several prompts, scored together piece by piece (one
    packed forward where the model allows it, else one by one), give `guard.score`'s numbers."""
    from hguard.incremental import IncrementalScorer, score_together

    filler = guard.encode(prompts[0])  # ids the model knows, so that no answer is empty
    answers = [r.token_ids + filler for r in guard.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False)]
    scorers = [IncrementalScorer(guard, p) for p in prompts]
    for end in (1, 2, 5, max_new_tokens):  # pieces of different lengths in each call: row r is r tokens ahead
        responses = [a[: end + row] for row, a in enumerate(answers)]
        for prompt, response, got in zip(prompts, responses, score_together(scorers, responses)):
            assert got.token_logits == pytest.approx(guard.score(prompt, response).token_logits, abs=TOL)


def _plain(guard: Guard, model, prompts: list, max_new_tokens: int) -> torch.Tensor:
    """The generated tokens of `model`'s own `generate` (no guard), [batch, new]."""
    ids, mask = guard._batch([guard.encode(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=guard._pad_id())
    return out[:, ids.shape[1]:]


def alpha_one_is_plain_generate(guard: Guard, prompts: list, max_new_tokens: int = 12) -> None:
    """Scale with alpha 1 changes nothing: the model's own greedy tokens."""
    plain = _plain(guard, guard.model, prompts, max_new_tokens)
    scaled = guard.generate(prompts, action="scale", alpha=1.0, max_new_tokens=max_new_tokens, do_sample=False)
    for row, result in enumerate(scaled):
        assert result.token_ids == plain[row].tolist()[: len(result.token_ids)]


def alpha_zero_is_zeroed_columns(guard: Guard, prompts: list, max_new_tokens: int = 12) -> None:
    """Scale with alpha 0 generates what the model with the probe's H-Neuron columns of W_down zeroed does."""
    probe = guard.probe
    zeroed = copy.deepcopy(guard.model)
    zsites = resolve(zeroed)
    with torch.no_grad():
        for layer, neuron in zip(probe.layer[probe.h_neurons].tolist(), probe.neuron[probe.h_neurons].tolist()):
            _zero_column(zsites, layer, neuron)
    expected = _plain(guard, zeroed, prompts, max_new_tokens)
    plain = _plain(guard, guard.model, prompts, max_new_tokens)
    assert not torch.equal(expected, plain), "zeroing the probe's columns should change some tokens"
    results = guard.generate(prompts, action="scale", alpha=0.0, max_new_tokens=max_new_tokens, do_sample=False)
    for row, result in enumerate(results):
        assert result.token_ids == expected[row].tolist()[: len(result.token_ids)]
        assert result.verdict == "dampened"


def _zero_column(sites, layer: int, neuron: int) -> None:
    """Zero neuron `neuron`'s column of layer `layer`'s down projection (an expert's, for experts)."""
    if not sites.experts:
        sites.down_weight(layer)[:, neuron] = 0.0
        return
    view = sites.down(layer)
    expert, index = divmod(neuron, view.width)
    if view.transposed:
        view.experts.down_proj[expert, index, :] = 0.0
    else:
        view.experts.down_proj[expert, :, index] = 0.0


def abstain_extremes(guard: Guard, prompts: list, max_new_tokens: int = 8) -> list[GuardResult]:
    """Abstain with threshold 0 stops every row at its first token (a row the model ends at once on EOS
    has no token to score); with threshold 1 it never acts. Returns the unguarded results."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    plain = guard.generate(prompts, action=None, **kw)
    for result, unguarded in zip(guard.generate(prompts, action="abstain", threshold=0.0, **kw), plain):
        if not unguarded.token_ids:
            assert result.token_ids == [] and result.finish_reason == "stop"
            continue
        assert result.finish_reason == "abstain" and result.verdict == "abstained"
        assert len(result.token_ids) == 1
    never = guard.generate(prompts, action="abstain", threshold=1.0, **kw)
    assert [r.token_ids for r in never] == [r.token_ids for r in plain]
    assert all(r.finish_reason != "abstain" for r in never)
    return plain


def dampen_acts_from_the_step_after_the_flag(guard: Guard, prompts: list, max_new_tokens: int = 10) -> None:
    """Dampen (alpha 0) at threshold 0 changes the model from the forward that samples token 2 on (token 0's
    score exists when it is fed back), so some answer changes but never its first two tokens; at threshold
    1 it never acts."""
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    plain = guard.generate(prompts, action=None, **kw)
    damped = guard.generate(prompts, action="dampen", threshold=0.0, alpha=0.0, **kw)
    for a, b in zip(plain, damped):
        assert b.token_ids[:2] == a.token_ids[:2]
        assert b.verdict == ("dampened" if a.token_ids else "ok")  # (an answer ended at once: nothing scored)
    assert any(a.token_ids != b.token_ids for a, b in zip(plain, damped))
    never = guard.generate(prompts, action="dampen", threshold=1.0, alpha=0.0, **kw)
    assert [r.token_ids for r in never] == [r.token_ids for r in plain]
    assert all(r.verdict in ("ok", "flagged") for r in never)


def scores_under_intervention_are_unintervened(guard: Guard, action: str, prompts: list, max_new_tokens: int = 10,
                                               count: int = 16) -> None:
    """With every probe neuron in one layer below the last, scaling them changes nothing that layer reads
    later (only the layers above, and so the tokens sampled); so the scores dampen and scale report equal an
    unintervened teacher-forced pass on the same tokens, and the verdict still says the guard acted."""
    model = guard.model
    generator = torch.Generator().manual_seed(3)
    neuron = torch.randperm(guard.sites.intermediate_size, generator=generator)[:count]
    weight = torch.randn(count, generator=generator).abs() + 0.1
    layer = torch.full((count,), max(guard.sites.num_layers - 2, 0))  # (a mixed MoE's one expert layer: 0)
    guard = Guard(model, guard.tokenizer, Probe.from_weights(model, layer, neuron, weight, 0.0))
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, action=action, threshold=0.0, alpha=0.0)
    plain = guard.generate(prompts, action="off", max_new_tokens=max_new_tokens, do_sample=False)
    acted = guard.generate(prompts, **kw)
    assert any(a.token_ids != b.token_ids for a, b in zip(plain, acted)), "alpha 0 should change some answers"
    tokens, streamed = collect(guard.stream(prompts, **kw))
    for prompt, result, again in zip(prompts, acted, streamed):
        assert again.token_probs == pytest.approx(result.token_probs, abs=TOL)
        if not result.token_ids:  # a random model may end an answer at once: nothing to score
            continue
        assert result.verdict == "dampened" and result.action == action
        reference = guard.score(prompt, result.token_ids)
        assert result.token_probs == pytest.approx(reference.token_probs, abs=TOL)
        assert result.probability == pytest.approx(reference.probability, abs=TOL)
