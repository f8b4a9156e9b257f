"""The OpenAI-compatible server, driven by the official `openai` SDK over loopback."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from hguard import Guard, Probe
from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults

from conftest import load
from openai_schema import Recorder

KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "Where was Ada born?"}]


class LiveServer:
    """`app` served on a free loopback port; an hguard app's replies are recorded, and checked against
    the official OpenAI schemas when each test ends (conftest.py); `record=False` for stand-in upstreams."""

    def __init__(self, app, record: bool = True, start_timeout: float = 30):
        self.start_timeout = start_timeout
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = Recorder(app) if record else app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def guard(tiny_dirs):
    model, tokenizer = load(tiny_dirs("llama"))
    return Guard(model, tokenizer, Probe.random(model, 12, seed=1))


@pytest.fixture(scope="module")
def live(guard):
    settings = ServerSettings(served_model_name="tiny", api_key=KEY, max_batch_size=8, max_queue=16,
                              defaults=GuardDefaults(max_tokens=16, abstain_message="Not sure."))
    with LiveServer(build_app(settings, guard=guard)) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_non_stream_matches_the_library(client, guard):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                              extra_body={"guard": {"token_scores": True}})
    choice = response.choices[0]
    [expected] = guard.generate([MESSAGES], max_new_tokens=6, do_sample=False)
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    report = choice.model_extra["hallucination"]
    assert report["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert report["token_scores"] == pytest.approx(expected.token_probs, abs=1e-6)
    assert report["verdict"] == expected.verdict and report["action"] == "flag"
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == expected.prompt_tokens


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    summary = finals[0].choices[0].model_extra["hallucination"]
    assert summary["probability"] == pytest.approx(whole.choices[0].model_extra["hallucination"]["probability"])
    scores = [s for c in chunks if c.choices for s in c.choices[0].model_extra.get("hallucination", {}).get(
        "token_scores", [])]
    assert len(scores) == whole.usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_text_completions_stream_and_not(client):
    whole = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, temperature=0)
    streamed = list(client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.object == "text_completion"


def test_guard_actions_through_extra_body(client):
    abstained = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                               extra_body={"guard": {"action": "abstain", "threshold": 0.0}})
    assert abstained.choices[0].finish_reason == "content_filter"
    assert abstained.choices[0].message.content == "Not sure."
    assert abstained.choices[0].model_extra["hallucination"]["verdict"] == "abstained"
    dampened = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                              extra_body={"guard": {"action": "dampen", "threshold": 0.0,
                                                                    "alpha": 0.0}})
    assert dampened.choices[0].model_extra["hallucination"]["verdict"] == "dampened"
    flagged = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                             extra_body={"guard": {"action": "flag", "threshold": 0.0}})
    report = flagged.choices[0].model_extra["hallucination"]
    assert report["verdict"] == "flagged" and report["flagged_spans"]
    span = report["flagged_spans"][0]
    assert 0 <= span["start"] <= span["end"] <= len(flagged.choices[0].message.content)


def test_n_stop_and_seed(client):
    several = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, n=3,
                                             seed=7)
    assert [c.index for c in several.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, n=3,
                                           seed=7)
    assert [c.message.content for c in several.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[2:4]
    cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_errors_have_the_right_sdk_class(client, live):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="guard.threshold"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"guard": {"threshold": 2}})
    with pytest.raises(openai.BadRequestError, match="guard.action"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"guard": {"action": "block"}})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}])
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature="hot")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx.post(f"{live.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    big = httpx.post(f"{live.url}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), headers=headers)
    assert big.status_code == 413 and "error" in big.json()

    def chunks():  # no Content-Length: the body is counted as it streams in
        for _ in range(80):
            yield b"x" * 65536

    chunked = httpx.post(f"{live.url}/v1/chat/completions", content=chunks(), headers=headers)
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]["message"]
    assert httpx.get(f"{live.url}/v1/nothing", headers=headers).status_code == 404


def test_full_queue_answers_429_with_retry_after(guard):
    settings = ServerSettings(served_model_name="tiny", max_queue=0)
    with LiveServer(build_app(settings, guard=guard)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert error.value.response.headers["retry-after"] == "1"


def test_a_client_that_leaves_frees_its_slot(client, live):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=400)
    start = time.perf_counter()
    client.chat.completions.create(**kwargs, extra_body={"guard": {"action": "flag"}})
    full = time.perf_counter() - start
    stream = client.chat.completions.create(stream=True, **kwargs)
    next(iter(stream))
    stream.close()  # the client disconnects after the first chunk
    start = time.perf_counter()
    quick = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=2)
    waited = time.perf_counter() - start
    assert quick.choices[0].message.content is not None
    # had the abandoned generation kept its slot, the short request would wait for all of it (about
    # `full`); the margin is wide because this machine is shared and noisy
    assert waited < 0.8 * full, (waited, full)


@pytest.fixture(scope="module")
def proxied(live, guard):
    settings = ServerSettings(served_model_name="tiny", upstream=live.url, upstream_api_key=KEY,
                              defaults=GuardDefaults(max_tokens=16, abstain_message="Not sure."))
    with LiveServer(build_app(settings, guard=guard)) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def test_proxy_scores_equal_hosting_mode(client, proxied, guard):
    # proxy mode re-tokenises the upstream's text; pick a prompt whose answer re-tokenises to the very
    # tokens that were generated (the random model also emits byte soup that does not)
    messages = [{"role": "user", "content": "Numbers like 1024"}]
    [library] = guard.generate([messages], max_new_tokens=8, do_sample=False)
    assert guard.tokenizer(library.text, add_special_tokens=False)["input_ids"] == library.token_ids
    kwargs = dict(model="tiny", messages=messages, max_tokens=8, temperature=0,
                  extra_body={"guard": {"token_scores": True}})
    hosted = client.chat.completions.create(**kwargs).choices[0]
    forwarded = proxied.chat.completions.create(**kwargs).choices[0]
    assert forwarded.message.content == hosted.message.content
    a, b = hosted.model_extra["hallucination"], forwarded.model_extra["hallucination"]
    assert b["probability"] == pytest.approx(a["probability"], abs=1e-4)
    assert b["token_scores"] == pytest.approx(a["token_scores"], abs=1e-4)
    chunks = list(proxied.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == hosted.message.content
    streamed = [s for c in chunks if c.choices and not c.choices[0].finish_reason
                for s in c.choices[0].model_extra.get("hallucination", {}).get("token_scores", [])]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].model_extra["hallucination"]["probability"] == pytest.approx(a["probability"], abs=1e-4)
    assert streamed == pytest.approx(a["token_scores"], abs=1e-4)  # each token's score, once


def test_proxy_refuses_dampen_and_abstains(proxied):
    with pytest.raises(openai.BadRequestError, match="dampen"):
        proxied.chat.completions.create(model="tiny", messages=MESSAGES,
                                        extra_body={"guard": {"action": "dampen"}})
    cut = proxied.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                          extra_body={"guard": {"action": "abstain", "threshold": 0.0}})
    assert cut.choices[0].finish_reason == "content_filter" and cut.choices[0].message.content == "Not sure."


def test_proxy_abstains_on_the_running_mean_at_the_watch_threshold(proxied, guard):
    saved = guard.threshold, guard.watch_threshold
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"guard": {"action": "abstain"}})
    try:
        guard.threshold, guard.watch_threshold = 0.0, 1.0  # flag everything, abstain on nothing
        [choice] = proxied.chat.completions.create(**kwargs).choices
        assert choice.finish_reason != "content_filter" and choice.model_extra["hallucination"]["verdict"] == "flagged"
        chunks = list(proxied.chat.completions.create(stream=True, **kwargs))
        assert all(c.choices[0].finish_reason != "content_filter" for c in chunks if c.choices)
        guard.watch_threshold = 0.0
        [choice] = proxied.chat.completions.create(**kwargs).choices
        assert choice.finish_reason == "content_filter" and choice.model_extra["hallucination"]["verdict"] == "abstained"
    finally:
        guard.threshold, guard.watch_threshold = saved


def test_proxy_bounds_open_streams_with_429(live, guard):
    """Each proxied stream keeps a KV cache for its scores: past the bound (max_batch_size + max_queue)
    a new stream is refused with 429, and a closed one frees its place."""
    settings = ServerSettings(served_model_name="tiny", upstream=live.url, upstream_api_key=KEY, max_batch_size=1,
                              max_queue=0, defaults=GuardDefaults(max_tokens=300))
    app = build_app(settings, guard=guard)
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        # long enough to be open still when the next request comes (the tiny model's own answer ends at once)
        first = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, temperature=0,
                                               max_tokens=300, extra_body={"min_tokens": 300})
        next(iter(first))
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)
        assert error.value.response.headers["retry-after"] == "1"
        first.close()
        deadline = time.time() + 30
        while app.state.proxy.streams and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.proxy.streams == 0
        again = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, max_tokens=3)
        assert [c for c in again if c.choices and c.choices[0].finish_reason]


def test_proxy_upstream_down_is_502_and_slow_is_504(guard):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    settings = ServerSettings(served_model_name="tiny", upstream=f"http://127.0.0.1:{port}")
    with LiveServer(build_app(settings, guard=guard)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert error.value.status_code == 502
    slow = socket.socket()  # accepts connections, never answers
    slow.bind(("127.0.0.1", 0))
    slow.listen()
    settings = ServerSettings(served_model_name="tiny", upstream=f"http://127.0.0.1:{slow.getsockname()[1]}",
                              upstream_timeout=0.5)
    with LiveServer(build_app(settings, guard=guard)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="tiny", messages=MESSAGES)
        assert error.value.status_code == 504
        with pytest.raises(openai.InternalServerError) as error:
            list(client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        assert error.value.status_code == 504
    slow.close()


def _bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                     "content": st.one_of(st.text(max_size=30), values)})
    fields = {
        "model": st.one_of(st.just("tiny"), values),
        "messages": st.one_of(st.lists(message, max_size=3), values),
        "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-3, 500), max_size=5), values),
        "max_tokens": st.one_of(st.integers(-2, 8), values),
        "temperature": st.one_of(st.floats(-1, 3), values),
        "top_p": st.one_of(st.floats(-1, 2), values),
        "n": st.one_of(st.integers(-1, 3), values),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5), values),
        "seed": st.one_of(st.integers(), values),
        "stream": st.one_of(st.booleans(), values),
        "guard": st.one_of(st.fixed_dictionaries({}, optional={
            "action": st.sampled_from(["flag", "abstain", "dampen", "x"]), "threshold": st.floats(-1, 2),
            "alpha": st.floats(-1, 20), "token_scores": st.booleans()}), values),
        "junk": values,
    }
    return st.fixed_dictionaries({}, optional=fields)


def test_no_request_produces_a_5xx(live):
    from hypothesis import HealthCheck, given, settings

    headers = {"Authorization": f"Bearer {KEY}"}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_bodies(), path=__import__("hypothesis").strategies.sampled_from(
        ["/v1/chat/completions", "/v1/completions"]))
    def check(body, path):
        try:
            response = httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=60)
        except ValueError:  # hypothesis made something JSON cannot carry (nan is fine, this is not)
            return
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    check()


def test_metrics_parse_and_every_series_has_model_name(client, live):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                   extra_body={"guard": {"action": "abstain", "threshold": 0.0}})
    list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    text = httpx.get(f"{live.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for f in families.values() for s in f.samples]
    assert samples and all(s.labels.get("model_name") == "tiny" for s in samples)
    assert all(name.startswith("hguard_") and ":" not in name for name in families)
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert value[("hguard_abstentions_total", (("model_name", "tiny"),))] >= 1
    statuses = {s.labels["status"] for s in families["hguard_requests"].samples if s.name == "hguard_requests_total"}
    assert {"200", "404"} <= statuses
    assert value[("hguard_tokens_scored_total", (("model_name", "tiny"),))] > 0
    assert any(s.name == "hguard_probe_step_seconds_count" and s.value > 0 for s in samples)
    assert any(s.name == "hguard_time_to_first_token_seconds_count" and s.value > 0 for s in samples)


def test_default_length_fits_the_context(guard):
    settings = ServerSettings(served_model_name="tiny", defaults=GuardDefaults(max_tokens=10_000))
    with LiveServer(build_app(settings, guard=guard)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        response = client.completions.create(model="tiny", prompt="The quick brown fox")
        context = guard.model.config.max_position_embeddings
        assert 0 < response.usage.completion_tokens <= context - response.usage.prompt_tokens


def test_chat_logprobs_are_the_models(client, guard):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    [expected] = guard.generate([MESSAGES], max_new_tokens=6, do_sample=False)
    ids = torch.tensor([guard.encode(MESSAGES) + expected.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(guard.model(input_ids=ids).logits[0].float(), -1)
    start = ids.shape[1] - len(expected.token_ids)
    content = choice.logprobs.content
    assert len(content) == len(expected.token_ids) == response.usage.completion_tokens
    for t, entry in enumerate(content):
        step = logp[start - 1 + t]
        assert entry.logprob == pytest.approx(float(step[expected.token_ids[t]]), abs=1e-4)
        assert entry.token == guard.tokenizer.decode([expected.token_ids[t]])
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(step.topk(3).values.tolist(), abs=1e-4)
    assert "".join(e.token for e in content) == choice.message.content


def test_completion_logprobs(client):
    response = client.completions.create(model="tiny", prompt="Hi there", max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    plain = client.completions.create(model="tiny", prompt="Hi there", max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_non_streamed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    text = dict(model="tiny", prompt="Hi there", max_tokens=5, temperature=0, logprobs=2)
    one = client.completions.create(**text).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(stream=True, **text)
             if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == one.tokens
    assert [x for p in parts for x in p.token_logprobs] == one.token_logprobs
    assert [x for p in parts for x in p.top_logprobs] == one.top_logprobs
    assert [x for p in parts for x in p.text_offset] == one.text_offset


def test_proxy_relays_the_upstreams_logprobs(client, proxied):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    hosted = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    forwarded = proxied.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert [e.model_dump() for e in forwarded] == [e.model_dump() for e in hosted]
    chunks = list(proxied.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in hosted]
    cut = proxied.chat.completions.create(**kwargs, extra_body={"guard": {"action": "abstain", "threshold": 0.0}})
    assert cut.choices[0].message.content == "Not sure." and cut.choices[0].logprobs.content is None


@pytest.mark.parametrize("field, value", [("echo", True)])
def test_unimplemented_completion_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="tiny", prompt="Hi", **{field: value})


def test_proxy_turns_bad_client_input_into_4xx(client, proxied):
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    for server in (client, proxied):  # as the OpenAI API answers a part it cannot read: 400, the part named
        with pytest.raises(openai.BadRequestError, match="'image_url' are not supported") as error:
            server.chat.completions.create(model="tiny", messages=[MESSAGES[0], {"role": "user", "content": image}])
        assert error.value.body["param"] == "messages.1.content.1"
    with pytest.raises(openai.BadRequestError, match="token ids"):
        proxied.completions.create(model="tiny", prompt=[10**9])
    with pytest.raises(openai.NotFoundError):
        proxied.chat.completions.create(model="other", messages=MESSAGES)


def test_vllm_sampling_fields_hosted(client, guard):
    """vLLM's fields: honoured where generate can (the same text as the library with the same options),
    refused by name where it cannot."""
    messages = [{"role": "user", "content": "Numbers like 1024"}]
    kw = dict(model="tiny", messages=messages, max_tokens=8)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    top1 = client.chat.completions.create(temperature=1.5, extra_body={"top_k": 1}, **kw).choices[0].message.content
    assert top1 == greedy  # top_k=1 samples the greedy token
    penalised = client.chat.completions.create(temperature=0, extra_body={"repetition_penalty": 1.8, "min_tokens": 3},
                                               **kw).choices[0].message.content
    [library] = guard.generate([messages], max_new_tokens=8, do_sample=False, repetition_penalty=1.8, min_new_tokens=3)
    assert penalised == library.text
    for body, param in (({"ignore_eos": True}, "ignore_eos"), ({"skip_special_tokens": False}, "skip_special_tokens"),
                        ({"min_tokens": 9}, "min_tokens"), ({"top_k": -2}, "top_k"),
                        ({"return_token_ids": True}, "return_token_ids")):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(extra_body=body, **kw)
        assert param in str(error.value)


def test_vllm_sampling_fields_are_forwarded_by_the_proxy(client, proxied):
    messages = [{"role": "user", "content": "Numbers like 1024"}]
    kw = dict(model="tiny", messages=messages, max_tokens=8)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].message.content
    assert proxied.chat.completions.create(temperature=1.5, extra_body={"top_k": 1}, **kw).choices[0].message.content \
        == greedy
    # the upstream (a hosted hguard) refuses ignore_eos: its 400 coming back shows the field was forwarded
    with pytest.raises(openai.BadRequestError) as error:
        proxied.chat.completions.create(extra_body={"ignore_eos": True}, **kw)
    assert "ignore_eos" in str(error.value) and "hosted engine" in str(error.value)


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client, guard, monkeypatch):
    """More characters than the context's tokens can spell: a 400 without running the tokenizer."""
    calls = []
    encode = guard.encode
    monkeypatch.setattr(guard, "encode", lambda prompt: calls.append(prompt) or encode(prompt))
    huge = "word " * 200_000
    for kw in (dict(messages=[{"role": "user", "content": huge}]),):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny", max_tokens=4, **kw)
        assert "context length" in str(error.value) and error.value.body["code"] == "context_length_exceeded"
    assert calls == []
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0)
    assert calls and ok.choices[0].message.content is not None  # a prompt that fits is tokenized as before
