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

from hguard import Guard
from hguard import incremental
from hguard.incremental import IncrementalScorer, score_together
from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults
from hguard.server import scoring as scoring_module
from hguard.server.scoring import Scoring

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


def test_the_last_batch_is_reused_and_scores_stay_exact(organism, monkeypatch):
    """Token by token, the same streams (in any order, or some of them) run on the last batch's cache instead
    of a copy of each stream's; a step with unequal pieces, a rewind or a stream from elsewhere copies again.
    Every score equals Guard.score's."""
    import hguard.incremental as incremental

    copies = []
    padded = incremental._padded
    monkeypatch.setattr(incremental, "_padded", lambda *a: copies.append(1) or padded(*a))
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = [r.token_ids + [11, 12, 13, 14, 15, 16, 17, 18] for r in
               organism.generate(prompts, max_new_tokens=12, action="off")]
    scorers = [IncrementalScorer(organism, p) for p in prompts]
    lengths = [1] * len(scorers)
    # (rows, tokens added to each, copies expected): the prompts (of several lengths: several batches, None:
    # any number of copies), then one token each: one batch, copied; same rows, reversed, a subset reuse it;
    # unequal pieces reuse it too, but leave right padding in theirs, so the next step copies; a rewind runs
    # nothing, and the step after it copies
    plan = [([0, 1, 2, 3, 4, 5], 0, None), ([0, 1, 2, 3, 4, 5], 1, 1), ([0, 1, 2, 3, 4, 5], 1, 0), ([5, 4, 3, 2, 1, 0], 1, 0),
            ([1, 3, 5], 1, 0), ([1, 3, 5], 1, 0), ([0, 1, 2, 3, 4, 5], 1, 1), ([0, 1, 2, 3, 4, 5], 1, 0),
            ([0, 2], None, 0), ([0, 2], 1, 1), ([0, 2], 1, 0), ([0, 2], -2, 0), ([0, 2], 1, 1)]
    for rows, grow, expected in plan:
        before = len(copies)
        for k, row in enumerate(rows):
            lengths[row] += grow if grow is not None else 3 + k  # None: 3 and 4 tokens (one batch)
        responses = [answers[row][: lengths[row]] for row in rows]
        got = score_together([scorers[row] for row in rows], responses)
        assert expected is None or len(copies) - before == expected, (rows, grow)
        for row, response, scores in zip(rows, responses, got):
            want = organism.score(prompts[row], response)
            assert scores.token_logits == pytest.approx(want.token_logits, abs=1e-4)


def test_rows_are_cut_into_forwards_at_least_cost():
    """Rows of like length share a forward; the cut is the cheapest of all cuts (FORWARD_COST a forward
    plus the padded positions), checked against every cut of small random sets."""
    rng = random.Random(0)
    cost = lambda runs: sum(incremental.FORWARD_COST + len(r) * max(r) for r in runs)
    for _ in range(200):
        lengths = sorted(rng.choice([1, 2, 3, 7, 8, 9, 40, 64, 200]) for _ in range(rng.randint(1, 7)))
        runs = incremental._groups(lengths, lengths)
        assert [x for r in runs for x in r] == lengths
        every = []
        for mask in range(1 << (len(lengths) - 1)):  # a cut after row i where bit i is set
            cut, start = [], 0
            for i in range(1, len(lengths)):
                if mask >> (i - 1) & 1:
                    cut.append(lengths[start:i])
                    start = i
            every.append(cut + [lengths[start:]])
        assert cost(runs) == min(map(cost, every))
    assert incremental._groups([1] * 30 + [64], [1] * 30 + [64]) == [[1] * 30, [64]]  # a long piece runs alone
    assert len(incremental._groups([7] * 20 + [9] * 10, [7] * 20 + [9] * 10)) == 1  # near lengths pad together


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
