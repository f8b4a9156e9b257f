"""Generation options that end rows, or feed tokens, in ways the guard has to follow: the caller's own
stopping criteria and EOS, caches that cannot grow, chunked prefill, several guards on one model, a
stop string given as a plain string, rows that end while the batch goes on, and empty answers."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from hguard import Guard, Probe, TokenEvent
from hguard.policy import running_peak

from conftest import PROMPTS, load
from test_guard import TOL, collect


class _StopRowAfter(StoppingCriteria):
    """The caller's criterion: ends `row` once it has `count` generated tokens."""

    def __init__(self, row: int, count: int, prompt_width: int) -> None:
        self.row, self.count, self.prompt_width = row, count, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.row] = input_ids.shape[1] - self.prompt_width >= self.count
        return done


class _ForceFirst(LogitsProcessor):
    """Makes `row`'s first generated token `token`."""

    def __init__(self, row: int, token: int, prompt_width: int) -> None:
        self.row, self.token, self.prompt_width = row, token, prompt_width

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_width:
            scores[self.row] = -math.inf
            scores[self.row, self.token] = 0.0
        return scores


def _width(guard: Guard, prompts: list[str]) -> int:
    return max(len(guard.encode(p)) for p in prompts)


def test_rows_ended_by_the_callers_criteria_keep_only_their_tokens(make_guard):
    guard = make_guard()
    prompts = PROMPTS[:2]
    stop_row_1 = [_StopRowAfter(1, 2, _width(guard, prompts))]
    short = guard.generate(prompts, max_new_tokens=2, do_sample=False)
    full = guard.generate(prompts, max_new_tokens=6, do_sample=False)
    results = guard.generate(prompts, max_new_tokens=6, do_sample=False, stopping_criteria=stop_row_1)
    assert len(short[1].token_ids) == 2
    assert results[1].token_ids == short[1].token_ids  # not followed by padding
    assert results[1].token_probs == pytest.approx(short[1].token_probs, abs=1e-6)
    assert results[1].probability == pytest.approx(short[1].probability, abs=1e-6)
    assert results[0].token_ids == full[0].token_ids
    tokens, streamed = collect(guard.stream(prompts, max_new_tokens=6, do_sample=False, stopping_criteria=stop_row_1))
    assert [e.token_id for e in tokens[1] if e.token_id >= 0] == short[1].token_ids
    assert streamed[1].token_ids == short[1].token_ids


def test_an_eos_given_to_the_call_ends_the_answer(make_guard):
    guard = make_guard()
    prompts = PROMPTS[:2]
    plain = guard.generate(prompts, max_new_tokens=6, do_sample=False)
    eos = plain[1].token_ids[2]
    assert eos not in guard._eos_ids()
    for options in ({"eos_token_id": eos}, {"generation_config": GenerationConfig(eos_token_id=eos)}):
        results = guard.generate(prompts, max_new_tokens=6, do_sample=False, **options)
        for before, after in zip(plain, results):
            ends = before.token_ids.index(eos) if eos in before.token_ids else len(before.token_ids)
            assert after.token_ids == before.token_ids[:ends]
            assert after.finish_reason == ("stop" if ends < len(before.token_ids) else "length")
        _, streamed = collect(guard.stream(prompts, max_new_tokens=6, do_sample=False, **options))
        assert [r.token_ids for r in streamed] == [r.token_ids for r in results]


@pytest.mark.parametrize("options", [{"use_cache": False}, {"cache_implementation": "static"}])
def test_the_final_token_is_scored_in_context_without_a_growing_cache(make_guard, options):
    guard = make_guard()
    prompts = PROMPTS[:2]
    results = guard.generate(prompts, max_new_tokens=5, do_sample=False, **options)
    for prompt, result in zip(prompts, results):
        reference = guard.score(prompt, result.token_ids)
        assert result.token_probs == pytest.approx(reference.token_probs, abs=TOL)
    if "cache_implementation" in options:  # dampen from token 1 on: the rerun applies alpha where generation did
        kw = dict(max_new_tokens=5, do_sample=False, action="dampen", threshold=0.0, alpha=0.3)
        dynamic = guard.generate(prompts, **kw)
        static = guard.generate(prompts, **kw, **options)
        for a, b in zip(dynamic, static):
            assert a.verdict == b.verdict == "dampened"
            assert b.token_ids == a.token_ids
            assert b.token_probs == pytest.approx(a.token_probs, abs=1e-5)


def test_compiled_decoding_keeps_the_guard(make_guard):
    """A static cache on a GPU makes transformers compile the decoding step (forced on the CPU here, as a
    GPU does by itself). The guard's hooks there are tensor-only (graph.py) and the graph traced through
    them is reused by every later generation of that batch size; its scores equal teacher forcing and
    its actions equal the uncompiled guard's. Where the hooks need Python per step (logprobs), the
    guard turns compilation off instead."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    guard = make_guard()
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    static = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", compile_config=config)
    eager = dict(max_new_tokens=5, do_sample=False)
    prompts = PROMPTS[:2]
    torch._dynamo.reset()
    counters.clear()

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    ids, mask = guard._batch([guard.encode(p) for p in prompts])
    plain = guard.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=guard._pad_id(), **static)
    assert graphs() == 1  # the plain generation compiled its decoding step
    flagged = guard.generate(prompts, **static)
    assert graphs() == 2  # traced once through the guard's hooks ...
    assert [r.token_ids for r in flagged] == [row[ids.shape[1]:].tolist() for row in plain]
    for prompt, result in zip(prompts, flagged):
        assert result.token_probs == pytest.approx(guard.score(prompt, result.token_ids).token_probs, abs=TOL)
    again = guard.generate(prompts, **static)
    _, streamed = collect(guard.stream(prompts, **static))
    assert graphs() == 2  # ... and reused, streamed too
    assert [r.token_probs for r in again] == [r.token_probs for r in streamed] == [r.token_probs for r in flagged]
    for action, extra in (("dampen", {"threshold": 0.0, "alpha": 0.3}), ("scale", {"alpha": 0.5}),
                          ("abstain", {"threshold": 0.0})):
        compiled = guard.generate(prompts, action=action, **static, **extra)
        reference = guard.generate(prompts, action=action, **eager, **extra)
        assert [r.token_ids for r in compiled] == [r.token_ids for r in reference]
        assert [r.verdict for r in compiled] == [r.verdict for r in reference]
        assert [r.token_probs for r in compiled] == [pytest.approx(r.token_probs, abs=1e-5) for r in reference]
    scaled = graphs()
    guard.generate(prompts, action="dampen", threshold=0.0, alpha=0.3, **static)
    assert graphs() == scaled  # the scaling graph is reused too
    logprobs = guard.generate(prompts, logprobs=2, **static)  # the recorder's hooks are Python: not compiled
    assert graphs() == scaled and [r.token_ids for r in logprobs] == [r.token_ids for r in flagged]
    with pytest.raises(ValueError, match="disable_compile"):
        guard.generate(prompts, max_new_tokens=2, disable_compile=False)
    torch._dynamo.reset()


def test_chunked_prefill_is_refused_with_the_guard(make_guard):
    guard = make_guard()
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        guard.generate(PROMPTS[:2], max_new_tokens=3, prefill_chunk_size=2)
    assert guard.generate(PROMPTS[:2], max_new_tokens=3, action=None, prefill_chunk_size=2)  # guard off: allowed


def test_guards_on_one_model_take_turns(tiny_dirs):
    model, tokenizer = load(tiny_dirs("llama"))
    guards = {seed: Guard(model, tokenizer, Probe.random(model, 12, seed=seed)) for seed in (1, 2)}
    assert guards[1]._lock is guards[2]._lock
    kw = dict(max_new_tokens=30, do_sample=False)
    expected = {seed: guard.generate(PROMPTS[:2], **kw) for seed, guard in guards.items()}
    got: dict[int, object] = {}

    def run(seed: int) -> None:
        try:
            got[seed] = guards[seed].generate(PROMPTS[:2], **kw)
        except Exception as error:  # noqa: BLE001 - reported below
            got[seed] = error

    threads = [threading.Thread(target=run, args=(seed,)) for seed in guards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed, results in got.items():
        assert not isinstance(results, Exception), results
        assert [r.token_probs for r in results] == [r.token_probs for r in expected[seed]]


def test_a_single_stop_string_is_one_string(make_guard):
    guard = make_guard()
    plain = guard.generate(PROMPTS[:1], max_new_tokens=10, do_sample=False)[0]
    stop = plain.text[3:6]
    assert len(stop) == 3 and len(set(stop)) > 1
    [one] = guard.generate(PROMPTS[:1], max_new_tokens=10, do_sample=False, stop=stop)
    [listed] = guard.generate(PROMPTS[:1], max_new_tokens=10, do_sample=False, stop=[stop])
    assert one.text == listed.text == plain.text[: plain.text.find(stop)]
    with pytest.raises(ValueError, match="stop"):
        guard.generate(PROMPTS[:1], max_new_tokens=3, stop=[1])


def test_a_rows_verdict_does_not_depend_on_the_rest_of_the_batch(make_guard):
    """A trigger on a row's last token counts only where that token was fed back while the row was
    generating: alone at its length limit it never is, so in a batch that goes on it must not count."""
    guard = make_guard()
    prompts = PROMPTS[:2]
    [alone] = guard.generate(prompts[:1], max_new_tokens=8, do_sample=False)
    logits = [math.log(p / (1 - p)) for p in alone.token_probs]
    calibration = guard.probe.calibration
    rises = [n for n in range(2, len(logits) + 1)
             if running_peak(logits[:n], calibration) > running_peak(logits[: n - 1], calibration)]
    assert rises, "the running mean should reach a new peak at some token"
    n = rises[0]
    threshold = (running_peak(logits[: n - 1], calibration) + running_peak(logits[:n], calibration)) / 2
    kw = dict(do_sample=False, action="abstain", threshold=threshold)
    [single] = guard.generate(prompts[:1], max_new_tokens=n, **kw)
    batched = guard.generate(prompts, max_new_tokens=[n, n + 3], **kw)[0]
    assert (single.token_ids, single.finish_reason, single.verdict) == (alone.token_ids[:n], "length", "flagged")
    assert (batched.token_ids, batched.finish_reason, batched.verdict) == (single.token_ids, "length", "flagged")


@pytest.mark.parametrize("action", ["flag", "abstain"])
def test_an_empty_answer_keeps_the_guards_fields(make_guard, action):
    guard = make_guard()
    eos = min(guard._eos_ids())
    for prompts in (PROMPTS[:1], PROMPTS[:2]):
        first_eos = LogitsProcessorList([_ForceFirst(0, eos, _width(guard, prompts))])
        result = guard.generate(prompts, max_new_tokens=3, do_sample=False, logits_processor=first_eos,
                                action=action, threshold=0.0)[0]
        assert (result.token_ids, result.probability, result.finish_reason) == ([], None, "stop")
        assert (result.action, result.verdict) == (action, "ok")  # nothing to flag in an empty answer


def test_a_cancelled_row_streams_no_padding(make_guard):
    guard = make_guard()
    cancelled: set[int] = set()
    events = []
    for event in guard.stream(PROMPTS[:2], max_new_tokens=8, do_sample=False, cancelled_rows=lambda: cancelled):
        events.append(event)
        if getattr(event, "row", None) == 1 and getattr(event, "index", None) == 1:
            cancelled.add(1)
    tokens, results = collect(events)
    assert [e.token_id for e in tokens[1] if e.token_id >= 0] == results[1].token_ids
    assert len(results[1].token_ids) < 8


@pytest.mark.parametrize("action", ["flag", "abstain"])
def test_an_answer_that_ends_inside_a_character_keeps_it_streamed_and_not(make_guard, action):
    """A row that ends (here: at its one-token limit, or abstaining at once) on a byte that starts a
    character returns the whole decode, replacement character included, and the stream sends the same."""
    guard = make_guard()
    partial = next(i for i in range(len(guard.tokenizer)) if guard.tokenizer.decode([i]) == "\ufffd")
    prompts = PROMPTS[:2]
    kw = dict(max_new_tokens=1 if action == "flag" else 4, do_sample=False, action=action, threshold=0.0,
              logits_processor=LogitsProcessorList([_ForceFirst(0, partial, _width(guard, prompts))]))
    [result, _] = guard.generate(prompts, **kw)
    assert result.token_ids[0] == partial and result.text == guard.tokenizer.decode(result.token_ids)
    streamed = [e for e in guard.stream(prompts, **kw) if isinstance(e, TokenEvent) and e.row == 0]
    assert "".join(e.text for e in streamed) == result.text
