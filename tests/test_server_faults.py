"""The fault suite (issue 22): hostile bodies on both endpoints, hosted and proxied, streamed and not;
a misbehaving upstream in each of its modes; bounded, cancellable proxy scoring; health, auth, 499s.

For every case: no 5xx of hguard's own, every stream ends with [DONE] (after an error event, if any),
no upstream internals reach the client, and a normal request sent right after answers within a few
seconds. The corpus is benchmarks/fault_corpus.py, which benchmarks/faults.py runs against a live
`hguard serve`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults

from test_server import KEY, MESSAGES, LiveServer, guard, live  # noqa: F401 - fixtures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fault_corpus import (CHAT, TEXT, UPSTREAM_MODES, MisbehavingUpstream, answered, classify,  # noqa: E402
                          events, hostile_bodies, normal_body, send)

AUTH = {"Authorization": f"Bearer {KEY}"}
QUICK_S = 10.0  # "a few seconds" on a shared, loaded 2-core machine


@pytest.fixture(scope="module")
def upstream():
    with MisbehavingUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(guard, upstream):  # noqa: F811
    settings = ServerSettings(served_model_name="tiny", upstream=upstream.url, upstream_timeout=1.0,
                              max_batch_size=8, max_queue=8, defaults=GuardDefaults(max_tokens=16))
    app = build_app(settings, guard=guard)
    with LiveServer(app) as server:
        server.app = app
        yield server


def _follow_up(client: httpx.Client, url: str, case: str) -> None:
    """A normal request right after a fault answers correctly, and soon."""
    for path in (CHAT, TEXT):
        reply = send(client, url, path, normal_body(path, "tiny"), timeout=QUICK_S)
        assert answered(reply, path) and reply.seconds < QUICK_S, (case, path, reply.status, reply.body[:300])


def _hostile(url: str, headers: dict) -> dict[str, int]:
    classes: dict[str, int] = {}
    with httpx.Client(headers=headers) as client:  # one connection: it must stay usable after each case
        for name, path, body in hostile_bodies("tiny"):
            reply = send(client, url, path, body)
            kind = classify(reply)
            classes[kind] = classes.get(kind, 0) + 1
            assert kind in ("2xx", "4xx"), (name, path, reply.status, reply.body[:300])
            if reply.status >= 400:
                error = json.loads(reply.body)["error"]
                assert set(error) == {"message", "type", "param", "code"}, name
            _follow_up(client, url, name)
    return classes


def test_hostile_bodies_hosted(live):  # noqa: F811
    classes = _hostile(live.url, AUTH)
    assert classes["4xx"] > classes.get("2xx", 0)  # the corpus is meant to be refused, mostly


def test_hostile_bodies_proxied(proxy, upstream):
    upstream.mode = "ok"
    _hostile(proxy.url, {})


# mode -> (non-streamed status, streamed outcome: an HTTP status, or "error" for an in-band error event)
EXPECTED = {
    "ok": (200, 200), "keep-alives and comments": (200, 200), "no [DONE] after the finish": (200, 200),
    "error event mid-stream": (200, "error"), "close before answering": (502, 502), "close mid-answer": (502, "error"),
    "stall before answering": (504, 504), "stall mid-answer": (504, "error"), "400 openai error": (400, 400),
    "401 with a key in it": (502, 502), "404": (404, 404), "422 tgi string": (422, 422), "429 retry-after": (429, 429),
    "500 html traceback": (502, 502), "503 text": (502, 502), "200 html": (502, 502), "200 empty": (502, 502),
    "302 redirect": (502, 502), "200 not json": (502, 502), "choices null": (502, "error"),
    "choice a string": (502, "error"), "content a number": (502, "error"), "a JSON list": (502, "error"),
    "NaN": (502, "error"), "surrogate text": (502, "error"), "more choices than asked": (502, "error"),
    "ends before finishing": (200, "error"), "1 MB answer": (200, 200), "a line over 4 MiB": (200, 502),
}


def test_the_expectations_cover_every_upstream_mode():
    assert set(EXPECTED) == set(UPSTREAM_MODES)


@pytest.mark.parametrize("mode", UPSTREAM_MODES)
def test_a_misbehaving_upstream(proxy, upstream, mode):
    plain, streamed = EXPECTED[mode]
    try:
        with httpx.Client() as client:
            for path in (CHAT, TEXT):
                for stream in (False, True):
                    upstream.mode = mode
                    reply = send(client, proxy.url, path, normal_body(path, "tiny", stream))
                    kind = classify(reply)
                    assert kind in ("2xx", "4xx", "upstream_5xx"), (path, stream, kind, reply.status, reply.body[:300])
                    expected = streamed if stream else plain
                    if expected == "error":
                        assert reply.status == 200 and "error" in json.loads(events(reply.body)[-2]), (path, reply.body[-300:])
                    else:
                        assert reply.status == expected, (path, stream, reply.status, reply.body[:300])
                    if expected == 200:
                        assert answered(reply, path), (path, stream, reply.body[-300:])
                    if mode == "429 retry-after" and not stream:
                        assert json.loads(reply.body)["error"]["message"] == "upstream: slow down"
                    upstream.mode = "ok"
                    _follow_up(client, proxy.url, mode)
    finally:
        upstream.mode = "ok"


def test_past_the_context_the_answer_is_relayed_whole_and_says_where_scoring_stopped(proxy, upstream, guard):  # noqa: F811
    upstream.mode = "1 MB answer"
    try:
        response = httpx.post(f"{proxy.url}{CHAT}", json=normal_body(CHAT, "tiny"), timeout=60)
        choice = response.json()["choices"][0]
        with httpx.stream("POST", f"{proxy.url}{CHAT}", json=normal_body(CHAT, "tiny", True), timeout=60) as streamed:
            chunks = [json.loads(d) for d in events(streamed.read())[:-1]]
    finally:
        upstream.mode = "ok"
    text = choice["message"]["content"]
    assert text == "word " * 200_000  # relayed whole
    report = choice["hallucination"]
    room = guard.model.config.max_position_embeddings - len(guard.encode(normal_body(CHAT, "tiny")["messages"]))
    assert 0 < report["scored_chars"] < 4 * room  # the window's tokens spell the start of the answer
    assert "word " * 800 * 250 == "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    scores = [s for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None
              for s in c["choices"][0].get("hallucination", {}).get("token_scores", [])]
    assert len(scores) == room  # each token of the window scored once, none past it
    assert chunks[-1]["choices"][0]["hallucination"]["scored_chars"] > 0


def test_a_prompt_past_the_context_is_refused_before_the_upstream(proxy, upstream, guard):  # noqa: F811
    context = guard.model.config.max_position_embeddings
    body = {"model": "tiny", "prompt": list(range(5, 105)) * (context // 50), "stream": True}
    start = time.perf_counter()
    response = httpx.post(f"{proxy.url}{TEXT}", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - start < QUICK_S


def test_proxy_scoring_stops_when_its_client_leaves(proxy, upstream, guard):  # noqa: F811
    """Scoring runs in bounded forwards (64 answer tokens each) and a stream whose client left scores
    no further than the forward under way; it is counted with status 499."""
    forwards = []

    def slow(module, args):
        forwards.append(time.perf_counter())
        time.sleep(0.3)

    handle = guard.model.register_forward_pre_hook(slow)
    try:
        body = {**normal_body(CHAT, "tiny", True), "metadata": {"upstream_mode": "1 MB answer"}}
        with pytest.raises(httpx.ReadTimeout):  # the first chunk needs the whole window: 8 forwards
            with httpx.stream("POST", f"{proxy.url}{CHAT}", json=body, timeout=httpx.Timeout(30, read=0.8)) as r:
                r.read()
        left = time.perf_counter()
        time.sleep(2.0)
        after = [t for t in forwards if t > left]
        assert len(forwards) < 8 and len(after) <= 1, (len(forwards), len(after))
    finally:
        handle.remove()
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'status="499"' in metrics and 'endpoint="chat"' in metrics


def test_a_short_proxied_answer_does_not_wait_for_a_long_one(proxy, upstream, guard):  # noqa: F811
    import threading

    def slow(module, args):
        time.sleep(0.2)

    handle = guard.model.register_forward_pre_hook(slow)
    try:
        long = {**normal_body(CHAT, "tiny"), "metadata": {"upstream_mode": "1 MB answer"}}
        thread = threading.Thread(target=lambda: httpx.post(f"{proxy.url}{CHAT}", json=long, timeout=120))
        thread.start()
        time.sleep(0.5)  # the long answer is being scored, 8 forwards of 0.2 s
        start = time.perf_counter()
        short = httpx.post(f"{proxy.url}{CHAT}", json=normal_body(CHAT, "tiny"), timeout=60)
        waited = time.perf_counter() - start
        thread.join()
    finally:
        handle.remove()
    assert short.status_code == 200 and waited < 1.2, waited  # its one forward took its turn between pieces


def test_health_reports_the_upstream_and_the_engine(proxy, upstream, live):  # noqa: F811
    assert httpx.get(f"{live.url}/health").json()["engine"] == "running"
    assert httpx.get(f"{proxy.url}/health").json()["upstream"] == "ok"
    upstream.mode = "down"
    try:
        time.sleep(2.1)  # past the reuse of the last answer
        response = httpx.get(f"{proxy.url}/health")
        assert response.status_code == 503 and response.json()["error"]["code"] == "upstream_unavailable"
        assert upstream.url not in response.text
    finally:
        upstream.mode = "ok"


@pytest.mark.parametrize("header, status", [(f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200), (f"Bearer {KEY}", 200),
                                            (f"Basic {KEY}", 401), (KEY, 401), ("bearer", 401)])
def test_the_auth_scheme_is_case_insensitive(live, header, status):  # noqa: F811
    response = httpx.post(f"{live.url}{CHAT}", json=normal_body(CHAT, "tiny"), headers={"Authorization": header},
                          timeout=60)
    assert response.status_code == status


def test_surrogates_are_a_400_naming_the_field_and_the_connection_stays_usable(live):  # noqa: F811
    cases = [(TEXT, {"prompt": "\ud800"}, "prompt"), (CHAT, {"messages": [{"role": "user", "content": "a\ud800"}]},
                                                      "messages.0.content"),
             (TEXT, {"prompt": "Hi", "stop": ["\ud800"]}, "stop")]
    with httpx.Client(headers=AUTH) as client:
        for path, fields, param in cases:
            body = json.dumps({"model": "tiny", **fields})  # ASCII, the surrogate as \ud800 (httpx's json= cannot)
            response = client.post(f"{live.url}{path}", content=body, timeout=60,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 400 and response.json()["error"]["param"] == param
            assert "surrogate" in response.json()["error"]["message"]
            assert client.post(f"{live.url}{path}", json=normal_body(path, "tiny"), timeout=60).status_code == 200


def test_rows_are_capped_at_the_batch_size(live):  # noqa: F811
    body = {"model": "tiny", "prompt": ["Neirga Rere was a"] * 500, "n": 16, "max_tokens": 1}
    response = httpx.post(f"{live.url}{TEXT}", json=body, headers=AUTH, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt" and error["code"] == "too_many_completions"
    assert "8000 completions" in error["message"] and "at most 8" in error["message"]
    body = {"model": "tiny", "prompt": ["Hi"] * 2, "n": 4, "max_tokens": 1}  # 8 rows: the limit itself
    assert len(httpx.post(f"{live.url}{TEXT}", json=body, headers=AUTH, timeout=60).json()["choices"]) == 8


def test_a_streamed_request_whose_client_left_is_counted(live):  # noqa: F811
    series = 'hguard_requests_total{action="flag",endpoint="completions",model_name="tiny",status="499"'

    def count() -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{live.url}/metrics").text.splitlines()
                   if line.startswith(series))

    before = count()
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}{TEXT}", json=body, headers=AUTH, timeout=60) as response:
        next(response.iter_lines())  # one line, then leave
    deadline = time.time() + QUICK_S
    while count() == before and time.time() < deadline:
        time.sleep(0.05)
    assert count() == before + 1


def test_a_long_stop_string_is_refused(live):  # noqa: F811
    """transformers' stop-string tables grow with vocabulary x stop length (a 1 MB stop string took the
    organism's server past 8 GB): stop strings are at most 256 characters."""
    body = {**normal_body(TEXT, "tiny"), "stop": ["a" * 257]}
    response = httpx.post(f"{live.url}{TEXT}", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    assert httpx.post(f"{live.url}{TEXT}", json={**body, "stop": ["a" * 256]}, headers=AUTH, timeout=60).status_code == 200
