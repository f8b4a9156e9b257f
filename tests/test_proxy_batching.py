"""Proxy mode scores the pieces of all open answers in shared forwards, with the scores of one at a time."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest

import torch

from hguard import Guard
from hguard import packed
from hguard.hooks import hook_count
from hguard.incremental import IncrementalScorer, score_together
from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults
from hguard.server import scoring as scoring_module
from hguard.server.scoring import Scoring
from hguard.tiny import ARCHITECTURES

from conftest import PROMPTS
from test_server import LiveServer

QUESTIONS = ["Where was Alice Brown born?", "What year was Tom Lee born? Be brief, please.", "Who?",
             "Where does Maria Gomez work?", "What did Vassor Fonis do for a living?", "Where was Kalo Venris born?"]


@pytest.fixture(scope="module")
def organism():
    return Guard.from_pretrained("organism")


def test_score_together_equals_one_at_a_time(organism):
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    answers = [r.token_ids + [11, 12, 13] for r in organism.generate(prompts, max_new_tokens=20, action="off")]
    scorers = [IncrementalScorer(organism, p) for p in prompts]
    # growing by different amounts (one token, several, none), then rewinding the last tokens
    for steps in ([1, 1, 3, 0], [2, 5, 3, 4], [9, 6, 3, 8], [30, 30, 30, 30], [2, 4, 2, 4]):
        responses = [a[:max(1, s)] for a, s in zip(answers, steps)]
        for prompt, response, got in zip(prompts, responses, score_together(scorers, responses)):
            want = organism.score(prompt, response)
            assert got.token_ids == response
            assert got.token_logits == pytest.approx(want.token_logits, abs=1e-4)
    assert sum(s.forwarded for s in scorers) < sum(len(s.prompt_ids) + 33 for s in scorers) * 2


def _packed_forwards(monkeypatch) -> list[int]:
    """Counts packed forwards: one entry, the number of pieces, per forward."""
    calls, real = [], packed.forward
    monkeypatch.setattr(packed, "forward", lambda model, caches, *a: calls.append(len(caches)) or real(model, caches, *a))
    return calls


@pytest.mark.parametrize("token_inputs", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pieces_of_every_length_run_in_one_packed_forward(make_guard, arch, token_inputs, monkeypatch):
    """Each call's pieces (a prompt with its first tokens, one token, several, none, a rewind) run end to end in
    one forward with no padding, each against its own cache, and every score equals Guard.score's; on every
    architecture (those with sliding-window layers run one by one, as their caches cannot be shared)."""
    guard = make_guard(arch, token_weight=torch.tensor([0.7, -0.4])) if token_inputs else make_guard(arch)
    calls = _packed_forwards(monkeypatch)
    prompts = PROMPTS[:3]
    answers = [r.token_ids + [5, 6, 7, 8, 9, 10, 11, 12] for r in guard.generate(prompts, max_new_tokens=8, do_sample=False)]
    scorers = [IncrementalScorer(guard, p) for p in prompts]
    plain = all(s._plain() for s in scorers)
    for steps in ([2, 1, 3], [3, 2, 9], [4, 2, 9], [5, 3, 10], [5, 4, 6], [12, 12, 12]):
        before, forwarded = len(calls), [s.forwarded for s in scorers]
        responses = [a[:s] for a, s in zip(answers, steps)]
        for prompt, response, got in zip(prompts, responses, score_together(scorers, responses)):
            want = guard.score(prompt, response)
            assert got.token_ids == response
            assert got.token_logits == pytest.approx(want.token_logits, abs=1e-4), (arch, steps)
        ran = sum(s.forwarded > f for s, f in zip(scorers, forwarded))  # pieces that ran (a rewind may run none)
        assert calls[before:] == ([ran] if plain and ran > 1 else [])
    assert plain == (arch != "gemma2")  # the tiny gemma2 has sliding-window layers
    assert packed.packable(guard.model) and hook_count(guard.model) == 0
    assert guard.model.config._attn_implementation != packed.NAME


def test_caches_grow_in_place(organism):
    """A step of one token per stream writes into each cache's spare room: no cache is copied."""
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    answers = [r.token_ids + [11, 12, 13, 14, 15, 16] for r in organism.generate(prompts, max_new_tokens=10, action="off")]
    scorers = [IncrementalScorer(organism, p) for p in prompts]
    score_together(scorers, [a[:1] for a in answers])
    rooms = [[layer._room[0].data_ptr() for layer in s._cache.layers if layer.is_initialized] for s in scorers]
    for n in range(2, 5):
        score_together(scorers, [a[:n] for a in answers])
        assert [[layer._room[0].data_ptr() for layer in s._cache.layers if layer.is_initialized] for s in scorers] == rooms


def test_a_model_whose_layers_attend_by_themselves_is_scored_one_by_one(make_guard, monkeypatch):
    """A model whose attention does not go through transformers' attention interface (here: every layer
    calls SDPA directly) cannot be packed: the first packed forward finds it out, its pieces run again one by
    one, and the model runs one by one from then on; the scores are Guard.score's throughout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    guard = make_guard("llama")
    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS",
                        SimpleNamespace(get_interface=lambda *a: sdpa_attention_forward))
    calls = _packed_forwards(monkeypatch)
    prompts = PROMPTS[:3]
    answers = [r.token_ids for r in guard.generate(prompts, max_new_tokens=6, do_sample=False)]
    scorers = [IncrementalScorer(guard, p) for p in prompts]
    for n in (2, 4, 6):
        responses = [a[:n] for a in answers]
        for prompt, response, got in zip(prompts, responses, score_together(scorers, responses)):
            assert got.token_logits == pytest.approx(guard.score(prompt, response).token_logits, abs=1e-4)
    assert calls == [3] and not packed.packable(guard.model)


def test_a_model_that_caches_latents_packs_with_whole_caches(tmp_path, monkeypatch):
    """MLA (DeepSeek V3) caches a latent that each layer expands into keys itself: the first packed forward
    finds that out, its pieces run again with every answer's whole cache handed back to the model, and the
    model packs that way from then on, one forward per call; the scores are Guard.score's."""
    from transformers import AutoModelForCausalLM

    from hguard import Probe, conformance
    from hguard.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conformance.tiny_config("deepseek_v3", len(tokenizer))).eval()
    guard = Guard(model, tokenizer, Probe.random(model, 12, seed=1, token_weight=torch.tensor([0.7, -0.4])))
    calls = _packed_forwards(monkeypatch)
    prompts = PROMPTS[:3]
    answers = [r.token_ids + [5, 6, 7, 8, 9] for r in guard.generate(prompts, max_new_tokens=4, do_sample=False)]
    scorers = [IncrementalScorer(guard, p) for p in prompts]
    for n in (1, 2, 5, 9):
        responses = [a[:n + row] for row, a in enumerate(answers)]
        for prompt, response, got in zip(prompts, responses, score_together(scorers, responses)):
            assert got.token_logits == pytest.approx(guard.score(prompt, response).token_logits, abs=1e-4)
    assert calls == [3, 3, 3, 3, 3] and packed._modes[guard.model] == packed.WHOLE  # the first, found out, ran again


@pytest.mark.parametrize("kwargs", [{"sliding_window": 8}, {"softcap": 30.0}, {"s_aux": 1}])
def test_attention_the_packed_forward_does_not_reproduce_is_refused(kwargs):
    now = packed._Pieces([], [], packed.DIRECT, torch.ones(1, 1, 1, 1, dtype=torch.bool))
    packed._now.forward = now
    try:
        with pytest.raises(packed.Unpackable):
            packed._attention(SimpleNamespace(layer_idx=0, is_causal=True), *[torch.zeros(1, 2, 1, 4)] * 3, now.mask, **kwargs)
    finally:
        packed._now.forward = None


def test_answers_just_scored_join_the_next_batch(monkeypatch):
    """The answers of one batch ask again a few event-loop turns after their scores come back; the next batch
    waits for them, so that streams that started apart do not split into cohorts taking turns (each piece
    would wait two forwards, each forward holding half the streams)."""
    def fake(scorers, pieces):
        time.sleep(0.02)  # a forward
        return [None] * len(scorers)

    monkeypatch.setattr(scoring_module, "score_together", fake)

    async def streams(count: int, asks: int) -> list[int]:
        scoring = Scoring(SimpleNamespace(tokenizer=None), 1 << 20)
        sizes = []
        original = scoring_module.score_together

        def recording(scorers, pieces):
            sizes.append(len(scorers))
            return original(scorers, pieces)

        monkeypatch.setattr(scoring_module, "score_together", recording)

        async def stream(index: int) -> None:
            await asyncio.sleep(0.005 * index)  # streams open apart, as requests do
            for k in range(asks):
                await scoring.run(object(), [k])
                for _ in range(2):  # the relay sends the chunk and reads the next event
                    await asyncio.sleep(0)

        await asyncio.gather(*(stream(i) for i in range(count)))
        monkeypatch.setattr(scoring_module, "score_together", original)
        return sizes

    monkeypatch.setattr(Scoring, "__init__", _bare_scoring_init)
    joined = asyncio.run(streams(8, 10))
    assert joined.count(8) >= len(joined) - 4, joined  # all but the first and the last few hold every stream
    monkeypatch.setattr(scoring_module, "GATHER_TURNS", 0)  # without waiting: two cohorts take turns
    apart = asyncio.run(streams(8, 10))
    assert apart.count(8) < len(apart) // 2, apart


def _bare_scoring_init(self, guard, context, piece=scoring_module.PIECE, rows=scoring_module.ROWS):
    self.guard, self.context, self.piece, self.rows = guard, context, piece, rows
    self._waiting, self._draining, self.batches, self.batched_rows = [], None, 0, 0


@contextmanager
def _proxy_before_hosted(organism, max_tokens: int):
    """A proxy (the guard on) in front of hguard's own server hosting the organism with the guard off; the
    proxy's app is `server.app`."""
    upstream = ServerSettings(served_model_name="organism", defaults=GuardDefaults(action="off", max_tokens=max_tokens))
    proxy = ServerSettings(served_model_name="organism", upstream=None, defaults=GuardDefaults(max_tokens=max_tokens))
    with LiveServer(build_app(upstream, guard=organism), record=False) as up:
        proxy.upstream = up.url
        app = build_app(proxy, guard=organism)
        with LiveServer(app) as server:
            server.app = app
            yield server


def test_score_together_refuses_a_scorer_twice(organism):
    scorer = IncrementalScorer(organism, "Hello")
    with pytest.raises(ValueError, match="once"):
        score_together([scorer, scorer], [[5], [5, 6]])


def test_open_streams_are_scored_together_and_exactly(organism):
    with _proxy_before_hosted(organism, 24) as server:
        streams = asyncio.run(_stream_all(server.url, QUESTIONS * 2))
        scoring = server.app.state.proxy.scoring
        assert scoring.batched_rows > scoring.batches  # some forwards held several answers
    for question, (text, scores) in zip(QUESTIONS * 2, streams):
        ids = organism.tokenizer(text, add_special_tokens=False)["input_ids"]
        want = organism.score([{"role": "user", "content": question}], ids)
        assert scores == pytest.approx(want.token_probs, abs=1e-4)


def test_re_tokenisation_settles_tokens_and_equals_a_whole_tokenisation(organism):
    """A growing text is tokenised from its settled tokens on, not from its start, with the tokens of a
    whole tokenisation at every length: prose, and soup of spaces, newlines, contractions, digits,
    emoji and the tokenizer's special tokens' texts, which no settled boundary may cut."""
    tokenizer, rng = copy.deepcopy(organism.tokenizer), random.Random(0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>"]})  # five pre-tokens
    scoring = Scoring(SimpleNamespace(tokenizer=tokenizer, encode=organism.encode, model=organism.model), 1 << 20)
    assert scoring.pre_tokens is not None  # byte-level BPE: settles
    prose = " ".join(QUESTIONS * 8)
    soup = ["a", "b", " ", "  ", "\n", "\n\n", "'s", "'", "é", "日本", "12", "345", ".", "!?", "\t", "😀", "<", "|",
            "'ve", tokenizer.eos_token, tokenizer.decode([5]), "<|start_header_id|>"]
    texts = [prose] + ["".join(rng.choice(soup) for _ in range(150)) for _ in range(6)]
    for text in texts:
        window, end = scoring.window([1]), 0
        while end < len(text):
            end = min(len(text), end + rng.randint(1, 9))
            assert window._tokens(text[:end]) == tokenizer(text[:end], add_special_tokens=False)["input_ids"]
    window = scoring.window([1])
    for end in range(1, len(prose) + 1, 5):
        window._tokens(prose[:end])
    assert len(window._settled) > 0.9 * len(tokenizer(prose, add_special_tokens=False)["input_ids"])


async def _stream_all(url: str, questions: list[str]) -> list[tuple[str, list[float]]]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(_stream(client, url, q) for q in questions))


async def _stream(client: httpx.AsyncClient, url: str, question: str) -> tuple[str, list[float]]:
    body = {"model": "organism", "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": 0, "guard": {"token_scores": True}}
    text, scores = "", []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
                if not choice.get("finish_reason"):
                    scores += (choice.get("hallucination") or {}).get("token_scores", [])
    return text, scores


def test_upstream_requests_take_the_http_clients_in_turn():
    """httpx's pool scans all of its connections at every request and response end (httpcore 1.0), so the
    upstream's streams are spread over several clients, each request to the next."""
    from hguard.server import upstream as upstream_module
    from hguard.server.errors import APIError

    upstream = upstream_module.Upstream("http://127.0.0.1:9", timeout=1.0)
    sent = {id(c): 0 for c in upstream.clients}

    def counting(client):
        async def send(request, **kwargs):
            sent[id(client)] += 1
            raise httpx.ConnectError("refused", request=request)
        return send

    for client in upstream.clients:
        client.send = counting(client)

    async def posts():
        for _ in range(2 * upstream_module.POOLS):
            with pytest.raises(APIError):
                await upstream.post("/v1/completions", {})
        await upstream.close()

    asyncio.run(posts())
    assert len(upstream.clients) == upstream_module.POOLS > 1
    assert sorted(sent.values()) == [2] * upstream_module.POOLS


def test_the_choices_of_a_whole_answer_are_scored_in_one_forward(organism, monkeypatch):
    """A non-streamed answer's choices are scored together (one batch for n = 3), each with Guard.score's
    scores."""
    calls = []
    original = scoring_module.score_together
    monkeypatch.setattr(scoring_module, "score_together", lambda s, p: calls.append(len(s)) or original(s, p))
    body = {"model": "organism", "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 1.0,
            "n": 3, "guard": {"token_scores": True}}
    with _proxy_before_hosted(organism, 12) as server:
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert calls == [3]
    for choice in reply["choices"]:
        ids = organism.tokenizer(choice["message"]["content"], add_special_tokens=False)["input_ids"]
        want = organism.score([{"role": "user", "content": QUESTIONS[0]}], ids)
        assert choice["hallucination"]["token_scores"] == pytest.approx(want.token_probs, abs=1e-4)


def test_events_that_arrive_during_a_forward_are_scored_together(organism, monkeypatch):
    """Where scoring lags the upstream, the events that arrived meanwhile are scored in one forward, not one
    forward each: the upstream's events are read ahead while a forward runs (a reader that read only
    when asked saw one HTTP chunk at a time, scored every token alone and doubled the proxy's CPU)."""
    forwards = []
    original = scoring_module.score_together

    def slow(scorers, pieces):
        forwards.append(len(scorers))
        time.sleep(0.05)  # a forward slower than the upstream's tokens
        return original(scorers, pieces)

    monkeypatch.setattr(scoring_module, "score_together", slow)
    body = {"model": "organism", "prompt": "From the archive: Alice Brown", "max_tokens": 32, "temperature": 0,
            "stream": True, "guard": {"token_scores": True}}
    scores = []
    with _proxy_before_hosted(organism, 32) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        if not choice.get("finish_reason"):
                            scores += choice["hallucination"]["token_scores"]
    assert len(scores) >= 24
    assert len(forwards) <= len(scores) // 3, (len(forwards), len(scores))
