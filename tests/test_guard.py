"""Guard.generate / stream / score on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria

from hguard import TokenEvent, hook_count
from hguard.tiny import ARCHITECTURES

from conftest import PROMPTS
from guard_checks import (TOL, abstain_extremes, alpha_one_is_plain_generate, alpha_zero_is_zeroed_columns, collect,
                          dampen_acts_from_the_step_after_the_flag, scores_under_intervention_are_unintervened,
                          streamed_equals_teacher_forced)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("batch", [1, 4])
def test_streamed_scores_equal_teacher_forced(make_guard, arch, batch):
    streamed_equals_teacher_forced(make_guard(arch), PROMPTS[:batch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_alpha_one_is_plain_generate(make_guard, arch):
    alpha_one_is_plain_generate(make_guard(arch, count=40), PROMPTS)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_alpha_zero_is_zeroed_columns(make_guard, arch):
    alpha_zero_is_zeroed_columns(make_guard(arch, count=60), PROMPTS)


class _Probe(StoppingCriteria):
    """Records the model's hook count during generation; optionally raises at step `fail_at`."""

    def __init__(self, model, fail_at: int | None = None):
        self.model, self.fail_at, self.counts = model, fail_at, []

    def __call__(self, input_ids, scores, **kwargs):
        self.counts.append(hook_count(self.model))
        if self.fail_at is not None and len(self.counts) >= self.fail_at:
            raise RuntimeError("boom")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_guard_off_installs_no_hook(make_guard):
    guard = make_guard("llama")
    baseline = hook_count(guard.model)
    watcher = _Probe(guard.model)
    results = guard.generate(PROMPTS, action=None, max_new_tokens=5, do_sample=False, stopping_criteria=[watcher])
    assert watcher.counts and set(watcher.counts) == {baseline}
    assert all(r.token_probs == [] and r.probability is None for r in results)
    watcher = _Probe(guard.model)
    guard.generate(PROMPTS, action="flag", max_new_tokens=5, do_sample=False, stopping_criteria=[watcher])
    assert min(watcher.counts) > baseline  # guarded: hooks present during generation ...
    assert hook_count(guard.model) == baseline  # ... and gone afterwards


@pytest.mark.parametrize("action", ["flag", "abstain", "dampen", "scale"])
def test_exception_in_generation_leaves_no_hook(make_guard, action):
    guard = make_guard("llama")
    baseline = hook_count(guard.model)
    kw = dict(action=action, alpha=0.5, threshold=1.0 if action == "abstain" else 0.0, max_new_tokens=8)
    with pytest.raises(RuntimeError, match="boom"):
        guard.generate(PROMPTS, stopping_criteria=[_Probe(guard.model, 3)], **kw)
    assert hook_count(guard.model) == baseline
    with pytest.raises(RuntimeError, match="boom"):
        list(guard.stream(PROMPTS, stopping_criteria=[_Probe(guard.model, 3)], **kw))
    assert hook_count(guard.model) == baseline


def test_closing_a_stream_stops_generation_and_cleans_up(make_guard):
    guard = make_guard("llama")
    baseline = hook_count(guard.model)
    stream = guard.stream(PROMPTS[:1], max_new_tokens=200, do_sample=False, min_new_tokens=200)
    first = next(stream)
    assert isinstance(first, TokenEvent)
    stream.close()
    assert hook_count(guard.model) == baseline
    assert guard._lock.acquire(timeout=5)  # the generation thread has finished
    guard._lock.release()


def test_abstain_stops_at_the_triggering_token(make_guard):
    guard = make_guard("llama")
    abstain_extremes(guard, PROMPTS)
    # a threshold inside the observed range stops a sequence at the first token whose running mean reaches it
    flagged = guard.generate(PROMPTS, action="flag", max_new_tokens=8, do_sample=False)
    row = flagged[0]
    running = [guard.probe.calibration.prob(float(torch.tensor([*map(_logit, row.token_probs[: i + 1])]).mean()))
               for i in range(len(row.token_probs))]
    threshold = sorted(running)[len(running) // 2]
    first = next(i for i, p in enumerate(running) if p >= threshold)
    [cut] = guard.generate(PROMPTS[:1], action="abstain", threshold=threshold, max_new_tokens=8, do_sample=False)
    assert cut.token_ids == row.token_ids[: first + 1]


def test_default_abstain_watches_the_running_mean_with_the_probes_watch_threshold(make_guard):
    from hguard.policy import running_peak

    guard = make_guard("llama", threshold=0.0, watch_threshold=1.0)
    kw = dict(max_new_tokens=8, do_sample=False)
    unstopped = guard.generate(PROMPTS, action="abstain", **kw)  # flags everything, never abstains
    assert all(r.finish_reason != "abstain" and r.verdict == "flagged" for r in unstopped)
    # an explicit threshold is the request's choice for both statistics
    assert all(r.finish_reason == "abstain" for r in guard.generate(PROMPTS, action="abstain", threshold=0.0, **kw))
    # a row abstains exactly when the peak of its running mean reaches the watch threshold (the final
    # token of a row that ran to max_new_tokens is scored after generation, too late to stop it)
    calibration = guard.probe.calibration
    logits = [guard.score(p, r.token_ids).token_logits for p, r in zip(PROMPTS, unstopped)]
    before_last = [running_peak(l[:-1], calibration) for l in logits]
    peaks = sorted(set(before_last))
    assert len(peaks) >= 2
    guard.watch_threshold = watch = (peaks[len(peaks) // 2 - 1] + peaks[len(peaks) // 2]) / 2
    for result, early, scores in zip(guard.generate(PROMPTS, action="abstain", **kw), before_last, logits):
        if early >= watch:
            assert result.finish_reason == "abstain"
        elif running_peak(scores, calibration) < watch:
            assert result.finish_reason != "abstain"


def _logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


def test_dampen_acts_from_the_step_after_the_flag(make_guard):
    dampen_acts_from_the_step_after_the_flag(make_guard("llama", count=60), PROMPTS)


def test_stop_strings_cut_text_and_stream_agree(make_guard):
    guard = make_guard("llama")
    [full] = guard.generate(PROMPTS[:1], max_new_tokens=16, do_sample=False)
    assert len(full.text) > 6
    stop = full.text[3:6]
    [cut] = guard.generate(PROMPTS[:1], stop=[stop], max_new_tokens=16, do_sample=False)
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    tokens, [streamed] = collect(guard.stream(PROMPTS[:1], stop=[stop], max_new_tokens=16, do_sample=False))
    assert "".join(e.text for e in tokens[0]) == streamed.text == cut.text


def test_sampling_with_several_choices_scores_each(make_guard):
    guard = make_guard("qwen2")
    torch.manual_seed(0)
    results = guard.generate(PROMPTS[:2], max_new_tokens=6, do_sample=True, num_return_sequences=3)
    assert len(results) == 6
    for i, result in enumerate(results):
        reference = guard.score(PROMPTS[i // 3], result.token_ids)
        assert result.token_probs == pytest.approx(reference.token_probs, abs=TOL)
        assert result.prompt_tokens == len(guard.encode(PROMPTS[i // 3]))


def test_flagged_spans_cover_tokens_above_threshold(make_guard):
    guard = make_guard("llama")
    [result] = guard.generate(PROMPTS[:1], max_new_tokens=12, do_sample=False)
    threshold = sorted(result.token_probs)[len(result.token_probs) // 2]
    [result] = guard.generate(PROMPTS[:1], threshold=threshold, max_new_tokens=12, do_sample=False)
    covered = {i for s in result.flagged_spans for i in range(s.first_token, s.end_token)}
    assert covered == {i for i, p in enumerate(result.token_probs) if p >= threshold}
    for span in result.flagged_spans:
        assert 0 <= span.start <= span.end <= len(result.text)
        assert span.probability == max(result.token_probs[span.first_token: span.end_token])
    assert result.verdict == ("flagged" if result.probability >= threshold else "ok")


def test_chat_messages_use_the_chat_template(make_guard):
    guard = make_guard("llama")
    messages = [{"role": "user", "content": "Where was Ada born?"}]
    ids = guard.encode(messages)
    text = guard.tokenizer.decode(ids)
    assert text.startswith("<|user|>Where was Ada born?<|end|>") and text.endswith("<|assistant|>")
    [result] = guard.generate([messages], max_new_tokens=4, do_sample=False)
    assert result.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"action": "block"}, "action"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_beams": 2}, "num_beams"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make_guard, kwargs, name):
    guard = make_guard("llama")
    with pytest.raises(ValueError, match=name):
        guard.generate(PROMPTS, max_new_tokens=2, **kwargs)


def test_token_id_prompts_match_text_prompts(make_guard):
    guard = make_guard("llama")
    ids = guard.encode(PROMPTS[0])
    [a] = guard.generate([ids], max_new_tokens=5, do_sample=False)
    [b] = guard.generate(PROMPTS[:1], max_new_tokens=5, do_sample=False)
    assert a.token_ids == b.token_ids and a.token_probs == b.token_probs


@pytest.mark.parametrize("prompts", [[], "", [""], [[-1]], [[10**9]], [3.5]])
def test_bad_prompts_raise_value_error(make_guard, prompts):
    guard = make_guard("llama")
    with pytest.raises(ValueError, match="prompt"):
        guard.generate(prompts, max_new_tokens=2)


def test_from_pretrained_passes_dtype_and_finds_registered_probe(tiny_dirs, tmp_path):
    from hguard import Guard, Probe, ProbeNotFoundError, register_probe
    from hguard import registry

    from conftest import load

    directory = tiny_dirs("llama")
    model, tokenizer = load(directory)
    with pytest.raises(ProbeNotFoundError, match="hguard identify"):
        Guard(model, tokenizer)
    path = Probe.random(model, 8, seed=3).save(tmp_path / "probe.safetensors")
    register_probe(path)
    try:
        assert Guard(model, tokenizer).probe.count == 8
        guard = Guard.from_pretrained(directory, dtype=torch.bfloat16)
        assert guard.model.dtype == torch.bfloat16
        [result] = guard.generate(PROMPTS[:1], max_new_tokens=4, do_sample=False)
        assert len(result.token_probs) == len(result.token_ids) > 0
    finally:
        registry._registered.remove(path)


def test_per_row_length_limits_and_cancelled_rows(make_guard):
    guard = make_guard("llama")
    full = guard.generate(PROMPTS, max_new_tokens=9, do_sample=False, action="flag")
    limits = [3, 9, 1, 5]
    limited = guard.generate(PROMPTS, max_new_tokens=limits, do_sample=False)
    for a, b, n in zip(full, limited, limits):
        assert b.token_ids == a.token_ids[:n] and b.token_probs == pytest.approx(a.token_probs[:n], abs=1e-6)
        assert b.finish_reason == ("length" if len(b.token_ids) == n else "stop")
    tokens, results = collect(guard.stream(PROMPTS, max_new_tokens=limits, do_sample=False))
    for row, n in enumerate(limits):
        assert len([e for e in tokens[row] if e.token_id >= 0]) == len(results[row].token_ids) <= n
    with pytest.raises(ValueError, match="max_new_tokens"):
        guard.generate(PROMPTS, max_new_tokens=[3, 4])
    # a row cancelled from the start stops after its first token; the others are untouched
    tokens, results = collect(guard.stream(PROMPTS[:2], max_new_tokens=8, do_sample=False, cancelled_rows=lambda: {0}))
    assert results[1].token_ids == full[1].token_ids[:8]
    assert len(results[0].token_ids) <= 1


def test_empty_stop_strings_are_ignored(make_guard):
    guard = make_guard("llama")
    plain = guard.generate(PROMPTS[:2], max_new_tokens=6, do_sample=False)
    empty = guard.generate(PROMPTS[:2], max_new_tokens=6, do_sample=False, stop=[""])
    assert [r.token_ids for r in empty] == [r.token_ids for r in plain]


@pytest.mark.parametrize("action", ["flag", None])
def test_logprobs_are_the_models_and_streamed_alike(make_guard, action):
    """Each token's log-probability and top alternatives equal a teacher-forced pass's log-softmax, in
    generate and in stream (where every token's event carries its entry), guard on or off."""
    guard = make_guard("llama")
    prompts = PROMPTS[:3]  # different lengths: left padding must not shift anything
    results = guard.generate(prompts, action=action, max_new_tokens=8, do_sample=False, logprobs=3)
    tokens, streamed = collect(guard.stream(prompts, action=action, max_new_tokens=8, do_sample=False, logprobs=3))
    for row, (prompt, result) in enumerate(zip(prompts, results)):
        assert len(result.logprobs) == len(result.token_ids) > 0
        events = [e for e in tokens[row] if e.token_id >= 0]
        assert [e.logprob[0] for e in events] == pytest.approx([lp for lp, _ in result.logprobs], abs=1e-5)
        assert [[i for i, _ in e.logprob[1]] for e in events] == [[i for i, _ in top] for _, top in result.logprobs]
        assert [v for e in events for _, v in e.logprob[1]] == pytest.approx(
            [v for _, top in result.logprobs for _, v in top], abs=1e-5)
        assert streamed[row].logprobs == result.logprobs
        ids = torch.tensor([guard.encode(prompt) + result.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(guard.model(input_ids=ids).logits[0].float(), -1)
        start = ids.shape[1] - len(result.token_ids)
        for t, (chosen, top) in enumerate(result.logprobs):
            step = logp[start - 1 + t]
            assert chosen == pytest.approx(float(step[result.token_ids[t]]), abs=1e-4)
            values, ids_ = step.topk(3)
            assert [i for i, _ in top] == ids_.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert hook_count(guard.model) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_incremental_scores_equal_teacher_forced(make_guard, arch):
    """Scoring a response piece by piece runs each token once and gives Guard.score's numbers; a change
    to an earlier token (re-tokenisation) starts again and is still right."""
    from hguard.incremental import IncrementalScorer

    guard = make_guard(arch)
    prompt = PROMPTS[1]
    [result] = guard.generate([prompt], max_new_tokens=12, do_sample=False)
    ids = result.token_ids
    scorer = IncrementalScorer(guard, prompt)
    for end in (3, 4, 9, len(ids)):
        scores = scorer.score_ids(ids[:end])
        expected = guard.score(prompt, ids[:end])
        assert scores.token_probs == pytest.approx(expected.token_probs, abs=TOL)
        assert scores.probability == pytest.approx(expected.probability, abs=TOL)
    assert scorer.forwarded == len(guard.encode(prompt)) + len(ids)  # each position ran once
    before = scorer.forwarded
    changed = [*ids[:2], (ids[2] + 1) % guard.model.config.vocab_size, *ids[3:]]
    scores = scorer.score_ids(changed)
    assert scores.token_probs == pytest.approx(guard.score(prompt, changed).token_probs, abs=TOL)
    assert scorer.forwarded == before + len(changed) - 2  # cropped back to the two tokens that stand
    assert hook_count(guard.model) == 0


def test_logprobs_of_sampled_choices_and_without_alternatives(make_guard):
    from hguard.logprobs import LogprobRecorder

    guard = make_guard("llama")
    prompt = PROMPTS[0]
    torch.manual_seed(0)
    results = guard.generate([prompt], max_new_tokens=6, do_sample=True, num_return_sequences=3, logprobs=0)
    for result in results:  # each choice's entries describe its own tokens
        ids = torch.tensor([guard.encode(prompt) + result.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(guard.model(input_ids=ids).logits[0].float(), -1)
        start = ids.shape[1] - len(result.token_ids)
        assert [lp for lp, _ in result.logprobs] == pytest.approx(
            [float(logp[start - 1 + t, token]) for t, token in enumerate(result.token_ids)], abs=1e-4)
        assert all(top == [] for _, top in result.logprobs)
    # without alternatives, nothing of a step's [batch, vocab] distribution is kept
    recorder = LogprobRecorder(guard.model, 0)
    ids, mask = guard._batch([guard.encode(prompt)])
    with torch.no_grad(), recorder.attached():
        guard.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             stopping_criteria=[recorder], pad_token_id=guard._pad_id())
    assert recorder.steps == 5
    assert all(v.untyped_storage().nbytes() == 0 for v, _ in recorder._alternatives)


def test_assisted_decoding_is_refused_with_the_guard(make_guard):
    guard = make_guard("llama")
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        guard.generate(PROMPTS[:1], max_new_tokens=4, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        guard.generate(PROMPTS[:1], action=None, logprobs=1, max_new_tokens=4, prompt_lookup_num_tokens=3)
    assert guard.generate(PROMPTS[:1], action=None, max_new_tokens=4, prompt_lookup_num_tokens=3)[0].token_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("action", ["dampen", "scale"])
def test_scores_under_intervention_are_what_the_probe_read_before_acting(make_guard, arch, action):
    scores_under_intervention_are_unintervened(make_guard(arch), action, PROMPTS)


def test_one_action_vocabulary(make_guard):
    from hguard import ACTIONS

    guard = make_guard()
    assert ACTIONS == ("off", "flag", "abstain", "dampen", "scale")
    off = guard.generate(PROMPTS[:2], action="off", max_new_tokens=4, do_sample=False)
    none = guard.generate(PROMPTS[:2], action=None, max_new_tokens=4, do_sample=False)
    assert [r.token_ids for r in off] == [r.token_ids for r in none]
    assert all(r.action == "off" and r.probability is None and r.token_probs == [] for r in off)
    with pytest.raises(ValueError, match="action must be one of off, flag, abstain, dampen, scale"):
        guard.generate(PROMPTS[:1], action="block", max_new_tokens=2)
