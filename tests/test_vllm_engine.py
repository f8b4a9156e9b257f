"""The vLLM engine (hguard/vllm/): the probe computed inside vLLM's forward equals the HF guard's.

Runs where vLLM is installed (CI: a separate venv with vllm-cpu, `HGUARD_REQUIRE_VLLM=1`, where a missing
vLLM fails instead of skipping). Engines run eagerly on the organism: fp32 for the equalities (1e-4 on
probabilities), bf16 for the stated tolerance.
"""

from __future__ import annotations

import asyncio
import os

import pytest

if os.environ.get("HGUARD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU default takes most of the machine's memory

from hguard import Guard, Probe  # noqa: E402
from hguard.organism import path  # noqa: E402
from hguard.registry import SHIPPED  # noqa: E402
from hguard.results import GuardResult  # noqa: E402
from hguard.server.engine import DONE, Job, Settings  # noqa: E402
from hguard.vllm.engine import VllmEngine, front  # noqa: E402
from hguard.vllm.tap import UnsupportedEngineModel  # noqa: E402

QUESTIONS = [
    "Where was Alice Brown born?",
    "What year was Tom Lee born? Please answer with the year only, and be brief about it, thank you so much.",
    "Where does Maria Gomez work?",
    "Who is Bob?",
]
TOL = 1e-4  # fp32: vLLM's kernels and transformers' differ in summation order only


@pytest.fixture(scope="module")
def hf():
    return Guard.from_pretrained("organism")


@pytest.fixture(scope="module")
def rows(hf):
    return [hf.encode([{"role": "user", "content": q}]) for q in QUESTIONS]


def start(dtype: str = "float32", eager: bool = True, **engine_args) -> VllmEngine:
    engine = VllmEngine(front(path("instruct")), path("instruct"), dtype=dtype, enforce_eager=eager,
                        max_batch_size=8, engine_args={"max_model_len": 256, **engine_args})
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine():
    engine = start()
    yield engine
    engine.stop()


def settings(action="flag", stop=(), logprobs=None, threshold=None, alpha=None, temperature=0.0, seed=None):
    return Settings(temperature=temperature, top_p=1.0, stop=tuple(stop), seed=seed, action=action,
                    threshold=threshold, alpha=alpha, logprobs=logprobs)


def run(engine, rows, setting, max_new=24, cancel_after: int | None = None):
    """(events, results) of one job, in the order the engine sent them."""

    async def go():
        job = Job(rows=rows, max_new_tokens=max_new, settings=setting, loop=asyncio.get_running_loop())
        engine.submit(job)
        events, results = [], []
        while (item := await job.events.get()) is not DONE:
            if isinstance(item, BaseException):
                raise item
            (results if isinstance(item, GuardResult) else events).append(item)
            if cancel_after is not None and len(events) >= cancel_after:
                job.cancelled.set()
        return events, results

    return asyncio.run(go())


def close(ours: GuardResult, theirs: GuardResult, tol: float = TOL) -> None:
    assert ours.token_ids == theirs.token_ids
    assert ours.text == theirs.text
    assert ours.finish_reason == theirs.finish_reason
    assert ours.verdict == theirs.verdict
    assert len(ours.token_probs) == len(theirs.token_probs)
    assert max((abs(a - b) for a, b in zip(ours.token_probs, theirs.token_probs)), default=0.0) < tol


def test_scores_equal_teacher_forced_scores(engine, hf, rows):
    _, results = run(engine, rows, settings())
    assert len(results) == len(rows)
    for prompt, result in zip(rows, results):
        forced = hf.score(prompt, result.token_ids)
        assert max(abs(a - b) for a, b in zip(result.token_probs, forced.token_probs)) < TOL
        assert abs(result.probability - forced.probability) < TOL


@pytest.mark.parametrize("action,threshold,alpha", [
    ("flag", None, None), ("abstain", 0.9, None), ("dampen", 0.9, 0.2), ("scale", None, 0.3)])
def test_actions_match_the_hf_guard(engine, hf, rows, action, threshold, alpha):
    _, results = run(engine, rows, settings(action, threshold=threshold, alpha=alpha))
    reference = hf.generate(rows, action=action, threshold=threshold, alpha=alpha, max_new_tokens=24)
    for ours, theirs in zip(results, reference):
        close(ours, theirs)
    if action != "flag":  # the action did act somewhere, and not everywhere the same way as flag would
        assert any(r.verdict in ("abstained", "dampened") for r in results)


def test_stream_folds_to_the_results(engine, rows):
    events, results = run(engine, rows, settings(stop=["\n"]))
    for i, result in enumerate(results):
        mine = [e for e in events if e.row == i]
        assert "".join(e.text for e in mine) == result.text
        assert [e.probability for e in mine if e.token_id >= 0] == result.token_probs


def test_stop_strings_and_logprobs_match(engine, hf, rows):
    plain = hf.generate(rows, max_new_tokens=24)
    stop = next(r.text.split()[1] for r in plain if len(r.text.split()) > 2)  # a word some answer contains
    _, results = run(engine, rows, settings(stop=[stop], logprobs=2))
    reference = hf.generate(rows, stop=stop, logprobs=2, max_new_tokens=24)
    assert any(r.finish_reason == "stop" and stop not in r.text and r.text for r in results)
    for ours, theirs in zip(results, reference):
        close(ours, theirs)
        for (lp, top), (lp2, top2) in zip(ours.logprobs, theirs.logprobs):
            assert abs(lp - lp2) < 1e-3
            assert [t for t, _ in top] == [t for t, _ in top2]


def test_cancelled_job_frees_its_requests(engine, rows):
    events, results = run(engine, rows[:2], settings(temperature=1.0, seed=3), max_new=200, cancel_after=2)
    assert results == [] and len(events) >= 2
    assert not engine.llm.has_unfinished_requests()
    assert engine.scores.logits == {} and engine.scores.scaling == {}
    assert engine.running == 0


def test_an_answer_up_to_the_context_is_scored_to_its_last_token(engine, hf, rows):
    # the server fills at most engine.max_model_len (vLLM's less the one position the last token's
    # scoring forward takes): every kept token of an answer that reaches it still has its score
    prompt = (rows[1] * 20)[: engine.max_model_len - 8]
    _, [result] = run(engine, [prompt], settings(temperature=1.0, seed=0), max_new=8)
    assert result.finish_reason == "length" and len(result.token_ids) == 8 == len(result.token_probs)
    forced = hf.score(prompt, result.token_ids)
    assert result.token_probs == pytest.approx(forced.token_probs, abs=TOL)


def test_a_request_vllm_refuses_fails_its_job_only(engine, rows):
    with pytest.raises(Exception, match="(?i)length|long|context"):
        run(engine, [rows[0] * 40], settings())  # far past vLLM's context
    _, results = run(engine, rows[:1], settings())  # the engine serves the next job
    assert results and results[0].token_ids


def test_chunked_prefill_prefix_cache_and_preemption_keep_scores(hf, rows):
    # a 32-token budget per step splits the long prompts' prefill; four 32-token KV blocks cannot hold
    # every request at once, so vLLM preempts and recomputes; repeated prompts hit the prefix cache
    engine = start(max_model_len=96, max_num_batched_tokens=32, enable_prefix_caching=True,
                   num_gpu_blocks_override=4, block_size=32)
    try:
        batch = rows + rows[:2]
        _, results = run(engine, batch, settings(), max_new=40)
        assert engine.scores.rescored > 0  # positions computed twice were kept once
        # the shipped probe reads token inputs: a token fed first inside a recomputation finds its term too
        assert hf.probe.token_weight is not None and engine.scores.untermed == 0
    finally:
        engine.stop()
    for ours, theirs in zip(results, hf.generate(batch, max_new_tokens=40)):
        close(ours, theirs)


def test_compiled_engine_keeps_the_probe(hf, rows):
    # torch.compile traces TappedDown into vLLM's graph: the buffer writes and the factors must survive it
    engine = start(eager=False)
    try:
        for action, threshold, alpha in (("flag", None, None), ("dampen", 0.9, 0.2)):
            _, results = run(engine, rows, settings(action, threshold=threshold, alpha=alpha))
            reference = hf.generate(rows, action=action, threshold=threshold, alpha=alpha, max_new_tokens=24)
            for ours, theirs in zip(results, reference):
                close(ours, theirs)
    finally:
        engine.stop()


def test_bf16_engine_within_stated_tolerance(hf, rows):
    # bf16 weights and activations against the fp32 guard on the same token ids: each token's probability
    # within 0.1, the response probability within 0.05, the verdicts equal
    engine = start(dtype="bfloat16")
    try:
        _, results = run(engine, rows, settings(), max_new=24)
    finally:
        engine.stop()
    for prompt, result in zip(rows, results):
        forced = hf.score(prompt, result.token_ids)
        assert max(abs(a - b) for a, b in zip(result.token_probs, forced.token_probs)) < 0.1
        assert abs(result.probability - forced.probability) < 0.05
        assert (result.probability >= hf.threshold) == (forced.probability >= hf.threshold)


def test_a_probe_with_token_inputs_scores_as_the_hf_guard(hf, rows, tmp_path):
    """Token inputs (the token's log-probability and entropy, from vLLM's own logits of the step before)
    give the HF guard's teacher-forced scores, and they move the scores well beyond the tolerance."""
    import dataclasses

    import torch

    probe = dataclasses.replace(hf.probe, token_weight=torch.tensor([-0.4, 0.6]), source=None)
    path_ = probe.save(tmp_path / "tokens.safetensors")
    reference = Guard(hf.model, hf.tokenizer, probe)
    engine = VllmEngine(front(path("instruct"), str(path_)), path("instruct"), dtype="float32", enforce_eager=True,
                        max_batch_size=8, engine_args={"max_model_len": 256})
    engine.start()
    try:
        for setting in (settings(), settings("abstain", threshold=0.9)):
            _, results = run(engine, rows, setting)
            moved = 0.0
            for prompt, result in zip(rows, results):
                forced = reference.score(prompt, result.token_ids)
                assert max(abs(a - b) for a, b in zip(result.token_probs, forced.token_probs)) < TOL
                plain = hf.score(prompt, result.token_ids)
                moved = max(moved, *(abs(a - b) for a, b in zip(forced.token_probs, plain.token_probs)))
            assert moved > 100 * TOL
        assert engine.scores.untermed == 0
    finally:
        engine.stop()


def test_refuses_a_probe_for_other_weights(tmp_path):
    probe = Probe.load(SHIPPED / "organism.safetensors")
    probe.column_norm = probe.column_norm * 2
    probe.source = None
    engine = VllmEngine(front(path("instruct"), probe), path("instruct"), dtype="float32", enforce_eager=True,
                        engine_args={"max_model_len": 256})
    with pytest.raises(UnsupportedEngineModel, match="column_norm"):
        engine.start()


def test_refuses_an_unsupported_architecture(tmp_path):
    from hguard.tiny import save_tiny

    directory = str(save_tiny(tmp_path / "gpt2", "gpt2"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    probe = Probe.random(model, 8, seed=0)
    engine = VllmEngine(front(directory, probe), directory, dtype="float32", enforce_eager=True)
    with pytest.raises(UnsupportedEngineModel, match="GPT2LMHeadModel"):
        engine.start()


def test_openai_sdk_drives_the_vllm_server():
    import openai

    from hguard.server.app import ServerSettings, build_app
    from hguard.server.requests import GuardDefaults
    from test_server import LiveServer

    settings = ServerSettings(engine="vllm", enforce_eager=True, max_model_len=256,
                              defaults=GuardDefaults(max_tokens=24))
    with LiveServer(build_app(settings), start_timeout=300) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        raw = client.chat.completions.with_raw_response.create(model="hguard-organism", messages=messages,
                                                               temperature=0)
        reply = raw.parse()
        assert reply.choices[0].message.content
        assert raw.headers["x-hguard-verdict"] == reply.choices[0].model_extra["hallucination"]["verdict"]
        chunks = list(client.chat.completions.create(model="hguard-organism", messages=messages, temperature=0,
                                                      stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content
        scores = [s for c in chunks if c.choices for s in (c.choices[0].model_extra.get("hallucination") or {})
                  .get("token_scores", [])]
        assert len(scores) == reply.usage.completion_tokens
