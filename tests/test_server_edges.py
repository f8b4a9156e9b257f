"""Server behaviour an OpenAI or vLLM client relies on at the edges: null fields, seeds, a client that
leaves a non-streaming request, per-choice token latency, and proxy mode's forwarding, upstream
errors, stream bound, usage after an abstention and metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hguard import Guard, Probe
from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults

from conftest import load
from test_server import KEY, MESSAGES, LiveServer, guard, live  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {KEY}"}


def _metric(url: str, prefix: str) -> list[str]:
    return [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(prefix)]


def _value(url: str, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metric(url, series))


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
                                   "logprobs", "max_tokens", "stop", "seed", "stream_options"])
def test_a_null_field_is_a_field_not_sent(live, field):  # noqa: F811
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, field: None}
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_seed_outside_64_bits_is_a_400(live):  # noqa: F811
    for stream in (False, True):
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "seed": 2**64, "stream": stream}
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed"


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation(tiny_dirs):
    model, tokenizer = load(tiny_dirs("llama"))
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))  # 480 steps: over 2 s
    slow = Guard(model, tokenizer, Probe.random(model, 12, seed=1))
    with LiveServer(build_app(ServerSettings(served_model_name="tiny"), guard=slow)) as server:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 480, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.3)
        deadline = time.time() + 1.5  # well before the generation would have ended
        while not _metric(server.url, 'hguard_requests_total{action="flag",endpoint="chat",model_name="tiny",'
                                      'status="499"') and time.time() < deadline:
            time.sleep(0.05)
        assert _metric(server.url, 'hguard_requests_total{action="flag",endpoint="chat",model_name="tiny",status="499"')
        quick = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
        assert quick.status_code == 200
        assert _value(server.url, "hguard_generation_tokens_total") <= 2  # the abandoned rows were not finished


def test_token_latency_is_per_choice(live):  # noqa: F811
    itl = "hguard_inter_token_latency_seconds_count"
    ttft = "hguard_time_to_first_token_seconds_count"
    before_itl, before_ttft = _value(live.url, itl), _value(live.url, ttft)
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "n": 4, "temperature": 1.0, "seed": 3}
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    choices = [c for c in response["choices"] if c["message"]["content"] or c["finish_reason"] == "length"]
    completion = response["usage"]["completion_tokens"]
    # each choice's first token starts its gaps; the request's first token is its time to first token
    assert _value(live.url, itl) - before_itl == completion - len(choices)
    assert _value(live.url, ttft) - before_ttft == 1


# ---- proxy mode against a scripted upstream -------------------------------------------------------
def _upstream(script: dict) -> FastAPI:
    app = FastAPI()
    app.state.seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.seen.append(body)
        mode = script["mode"]
        if mode == "tgi":
            return JSONResponse({"error": "Input validation error: too long", "error_type": "validation"}, 422)
        if mode == "unauthorized":
            return JSONResponse({"error": {"message": "Incorrect API key provided: sk-live-1234", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, 401)
        if mode == "ratelimit":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit", "param": None,
                                           "code": None}}, 429, headers={"Retry-After": "7"})
        if mode == "badparam":
            return JSONResponse({"error": {"message": "bad n", "type": "BadRequestError", "param": "n",
                                           "code": 400}}, 400)
        base = {"id": "up", "object": "chat.completion.chunk", "created": 0, "model": "up"}
        await asyncio.sleep(script.get("pause", 0.0))  # before the headers: requests wait on the upstream together
        if body.get("stream"):
            prefix = "data:" if mode == "nospace" else "data: "  # SSE allows both

            async def events():
                for piece in ["Hel", "lo", " world"]:
                    choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    yield f"{prefix}{json.dumps({**base, 'choices': [choice]})}\n\n"
                choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
                yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "up", "object": "chat.completion", "created": 0, "model": "up",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}

    return app


@pytest.fixture(scope="module")
def upstream():
    script = {"mode": "ok"}
    app = _upstream(script)
    with LiveServer(app, record=False) as server:  # a stand-in, not hguard: its replies are not checked
        yield server, script, app.state.seen


def _proxy_app(guard, upstream_url: str, **settings):  # noqa: F811
    defaults = GuardDefaults(max_tokens=16, abstain_message="Not sure.")
    return build_app(ServerSettings(served_model_name="tiny", upstream=upstream_url, defaults=defaults, **settings),
                     guard=guard)


def _proxy(guard, upstream_url: str, **settings) -> LiveServer:  # noqa: F811
    return LiveServer(_proxy_app(guard, upstream_url, **settings))


def test_proxy_forwards_what_the_client_sent_and_maps_upstream_errors(guard, upstream):  # noqa: F811
    server, script, seen = upstream
    with _proxy(guard, server.url) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        script["mode"] = "ok"
        assert httpx.post(url, json={"model": "tiny", "messages": MESSAGES, "temperature": None}).status_code == 200
        assert seen[-1] == {"model": "tiny", "messages": MESSAGES}  # the upstream's defaults apply
        expected = {  # mode -> (status, retry-after, message, param)
            "tgi": (422, None, "upstream: Input validation error: too long", None),
            # this server's key, not the client's: a 502 that says so, without the upstream's message (a key in it)
            "unauthorized": (502, None, "the upstream refused this server's credentials (--upstream-api-key)", None),
            "ratelimit": (429, "7", "upstream: slow down", None),
            "badparam": (400, None, "upstream: bad n", "n"),
        }
        for mode, (status, retry, message, param) in expected.items():
            script["mode"] = mode
            response = httpx.post(url, json={"model": "tiny", "messages": MESSAGES})
            error = response.json()["error"]
            assert (response.status_code, response.headers.get("retry-after"), error["message"], error["param"]) == \
                (status, retry, message, param), mode
            assert "sk-live" not in response.text and server.url not in response.text
        script["mode"] = "ok"
        series = 'hguard_requests_total{action="flag",endpoint="chat",model_name="tiny",status="200"'
        before = _value(proxy.url, series)
        httpx.post(url, json={"model": "tiny", "messages": MESSAGES})
        with httpx.stream("POST", url, json={"model": "tiny", "messages": MESSAGES, "stream": True}) as response:
            assert response.read()
        assert _value(proxy.url, series) == before + 2  # proxied answers count like hosted ones


def test_proxy_counts_streams_from_admission(guard, upstream):  # noqa: F811
    server, script, _ = upstream
    script.update(mode="ok", pause=0.3)
    try:
        with _proxy(guard, server.url, max_batch_size=1, max_queue=0) as proxy:
            statuses: list[int] = []

            def one() -> None:
                body = {"model": "tiny", "messages": MESSAGES, "stream": True}
                with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
                    response.read()
                    statuses.append(response.status_code)

            threads = [threading.Thread(target=one) for _ in range(5)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert Counter(statuses) == {200: 1, 429: 4}
    finally:
        script["pause"] = 0.0


def test_proxy_abstention_still_sends_the_usage_asked_for(guard, upstream):  # noqa: F811
    server, script, _ = upstream
    script["mode"] = "ok"
    with _proxy(guard, server.url) as proxy:
        body = {"model": "tiny", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
                "guard": {"action": "abstain", "threshold": 0.0}}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "content_filter"
    sent, message = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).split("\n\n")
    assert sent and "Hello world".startswith(sent) and message == "Not sure."  # cut short: the upstream's rest never came
    usage = chunks[-1]["usage"]
    prompt = len(guard.encode(MESSAGES))
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] == prompt
    assert usage["total_tokens"] == prompt + usage["completion_tokens"] > prompt


def test_proxy_reads_sse_without_the_space_and_a_base_url_ending_in_v1(guard, upstream):  # noqa: F811
    server, script, _ = upstream
    script["mode"] = "nospace"
    try:
        with _proxy(guard, f"{server.url}/v1/") as proxy:  # what an OpenAI SDK user would paste
            body = {"model": "tiny", "messages": MESSAGES, "stream": True}
            with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
                chunks = [json.loads(line[6:]) for line in response.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
        assert response.status_code == 200
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello world"
        assert chunks[-1]["choices"][0]["hallucination"]["verdict"] in ("ok", "flagged")
    finally:
        script["mode"] = "ok"


def test_proxied_answers_fill_the_score_histograms(guard, upstream):  # noqa: F811
    server, script, _ = upstream
    script["mode"] = "ok"
    with _proxy(guard, server.url) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        httpx.post(url, json={"model": "tiny", "messages": MESSAGES})
        with httpx.stream("POST", url, json={"model": "tiny", "messages": MESSAGES, "stream": True}) as response:
            response.read()
        tokens = len(guard.tokenizer("Hello world", add_special_tokens=False)["input_ids"])
        assert _value(proxy.url, "hguard_tokens_scored_total") == 2 * tokens
        assert _value(proxy.url, "hguard_response_hallucination_probability_count") == 2


def test_a_scoring_failure_ends_a_proxied_stream_with_an_error_event(guard, upstream, monkeypatch):  # noqa: F811
    import hguard.server.scoring

    server, script, _ = upstream
    script["mode"] = "ok"

    def fail(scorers, responses):
        raise RuntimeError("out of positions")

    monkeypatch.setattr(hguard.server.scoring, "score_together", fail)
    app = _proxy_app(guard, server.url)
    with LiveServer(app) as proxy:
        body = {"model": "tiny", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert app.state.proxy.streams == 0  # its place was given back
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "scoring failed; the server's log has the cause"


def test_a_queued_request_whose_client_left_holds_no_place(guard):  # noqa: F811
    from hguard.server.engine import Engine, Job, QueueFull, Settings

    engine = Engine(guard, max_batch_size=1, max_queue=1)  # not started: jobs stay queued
    settings = Settings(temperature=0.0, top_p=1.0, stop=(), seed=None, action="flag", threshold=None, alpha=None)
    loop = asyncio.new_event_loop()
    try:
        def job() -> Job:
            return Job(rows=[[5, 6]], max_new_tokens=2, settings=settings, loop=loop)

        left = job()
        engine.submit(left)
        with pytest.raises(QueueFull):
            engine.submit(job())
        left.cancelled.set()
        engine.submit(job())  # the place of the client that left
        assert engine.queue_depth == 1
    finally:
        loop.close()


def test_an_engine_outlives_a_job_whose_event_loop_closed(guard):  # noqa: F811
    """A job's events go to its event loop; once that loop has closed (its waiter gave up and went) the
    engine's thread drops them and serves the next job, instead of dying of "Event loop is closed" (a
    vLLM engine test hung on that race, the refused job's end arriving after its caller's loop closed)."""
    from hguard.server.engine import DONE, Engine, Job, Settings

    settings = Settings(temperature=0.0, top_p=1.0, stop=(), seed=None, action="flag", threshold=None, alpha=None)
    closed = asyncio.new_event_loop()
    closed.close()
    gone = Job(rows=[[5, 6]], max_new_tokens=2, settings=settings, loop=closed)
    gone.send("anything")  # no error: nobody is there to take it
    engine = Engine(guard, max_batch_size=2, max_queue=2)
    engine.start()
    try:
        engine.submit(gone)

        async def served() -> list:
            job = Job(rows=[[5, 6]], max_new_tokens=2, settings=settings, loop=asyncio.get_running_loop())
            engine.submit(job)
            items = []
            while (item := await asyncio.wait_for(job.events.get(), 60)) is not DONE:
                items.append(item)
            return items

        assert any(getattr(item, "token_ids", None) for item in asyncio.run(served()))
    finally:
        engine.stop()
