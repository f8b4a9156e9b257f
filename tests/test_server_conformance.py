"""The server against the official OpenAI API: its schemas (vendored in tests/openai_spec/), its routes
and statuses, and a streamed abstention that looks the same whether hguard hosts the model or proxies
an upstream that does."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import openai_schema
from hguard.server.chunks import abstain_tail
from test_server import KEY, MESSAGES, client, guard, live, proxied  # noqa: F401 - fixtures

AUTH = {"Authorization": f"Bearer {KEY}"}
CLEAN = [{"role": "user", "content": "Numbers like 1024"}]  # its greedy answer re-tokenises to the same tokens


def _abstaining_threshold(guard, messages, max_tokens: int) -> tuple[float, int]:  # noqa: F811
    """A threshold at which abstain stops the greedy answer mid-way, and the token it stops at: the
    running probability's first new maximum after the first token, at least two tokens before the end;
    the threshold lies halfway between it and the maximum before it, so rounding cannot move the stop."""
    [answer] = guard.generate([messages], max_new_tokens=max_tokens, do_sample=False)
    assert guard.tokenizer(answer.text, add_special_tokens=False)["input_ids"] == answer.token_ids
    logits = torch.tensor(guard.score(messages, answer.token_ids).token_logits, dtype=torch.float64)
    running = guard.probe.calibration(logits.cumsum(0) / torch.arange(1, len(logits) + 1)).tolist()
    for k in range(1, len(running) - 2):
        if running[k] > max(running[:k]):
            return (running[k] + max(running[:k])) / 2, k
    raise AssertionError(f"no new maximum of the running probability mid-answer: {running}")


def _seen(chunks) -> dict:
    """What a client of a chat stream sees: the text, the last finish reason, each token's score and
    the summary; and for each chunk before the finishing one, its text and the scores sent so far."""
    text, scores, pieces, finish, summary = "", [], [], None, None
    for chunk in chunks:
        for choice in chunk.choices:
            report = choice.model_extra.get("hallucination") or {}
            text += choice.delta.content or ""
            if choice.finish_reason:
                finish, summary = choice.finish_reason, report
                continue
            scores += report.get("token_scores", [])
            pieces.append((choice.delta.content or "", len(scores)))
    return {"text": text, "finish": finish, "scores": scores, "summary": summary, "pieces": pieces}


def test_streamed_abstention_is_the_same_hosted_and_proxied(client, proxied, guard):  # noqa: F811
    threshold, stop = _abstaining_threshold(guard, CLEAN, 8)
    kwargs = dict(model="tiny", messages=CLEAN, max_tokens=8, temperature=0,
                  extra_body={"guard": {"action": "abstain", "threshold": threshold}})
    hosted = _seen(client.chat.completions.create(stream=True, **kwargs))
    forwarded = _seen(proxied.chat.completions.create(stream=True, **kwargs))
    [library] = guard.generate([CLEAN], max_new_tokens=8, do_sample=False)
    kept = guard.tokenizer.decode(library.token_ids[: stop + 1])
    for seen in (hosted, forwarded):
        assert seen["text"] == kept + "\n\nNot sure."  # the tokens up to the one that tripped, then the message
        assert seen["finish"] == "content_filter" and seen["summary"]["verdict"] == "abstained"
        assert len(seen["scores"]) == stop + 1
    assert forwarded["text"] == hosted["text"]
    assert forwarded["scores"] == pytest.approx(hosted["scores"], abs=1e-4)
    assert forwarded["summary"]["probability"] == pytest.approx(hosted["summary"]["probability"], abs=1e-4)
    spans = [[(span["start"], span["end"], pytest.approx(span["probability"], abs=1e-4))
              for span in seen["summary"]["flagged_spans"]] for seen in (hosted, forwarded)]
    assert spans[1] == spans[0]
    whole = [server.chat.completions.create(**kwargs).choices[0] for server in (client, proxied)]
    assert [c.message.content for c in whole] == ["Not sure.", "Not sure."]
    reports = [c.model_extra["hallucination"] for c in whole]
    assert reports[1]["probability"] == pytest.approx(reports[0]["probability"], abs=1e-4)
    assert reports[0]["probability"] == pytest.approx(hosted["summary"]["probability"], abs=1e-6)


def test_each_chunk_carries_the_scores_of_its_own_text(client, proxied, guard):  # noqa: F811
    """No chunk runs ahead of or behind its scores: at every chunk, the text sent so far is as many
    tokens as the scores sent so far (proxied: the unsettled last token's text waits for the next)."""
    kwargs = dict(model="tiny", messages=CLEAN, max_tokens=8, temperature=0)
    hosted = _seen(client.chat.completions.create(stream=True, **kwargs))
    forwarded = _seen(proxied.chat.completions.create(stream=True, **kwargs))
    assert forwarded["text"] == hosted["text"] and forwarded["finish"] == hosted["finish"] == "length"
    assert forwarded["scores"] == pytest.approx(hosted["scores"], abs=1e-4)
    for seen in (hosted, forwarded):
        text = ""
        for piece, scored in seen["pieces"]:
            text += piece
            assert len(guard.tokenizer(text, add_special_tokens=False)["input_ids"]) == scored


@pytest.mark.parametrize("sent, seen", [("", "M."), ("  ", "  M."), ("Paris", "Paris\n\nM."),
                                        ("Paris\n", "Paris\n\nM."), ("Paris\n\n", "Paris\n\nM.")])
def test_the_abstention_message_is_a_paragraph_of_its_own(sent, seen):
    assert sent + abstain_tail(sent, "M.") == seen


def test_models_retrieve_and_an_unknown_model_is_404(client):  # noqa: F811
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "hguard")
    for name in ("other", "org/other-7b"):  # hub ids hold a slash
        with pytest.raises(openai.NotFoundError) as error:
            client.models.retrieve(name)
        assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"


def test_a_wrong_method_is_405_with_allow(live):  # noqa: F811
    response = httpx.get(f"{live.url}/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{live.url}/v1/models", headers=AUTH).headers["allow"] == "GET"


def test_refusal_is_present_and_null(live):  # noqa: F811
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 1}
    choice = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=AUTH).json()["choices"][0]
    assert choice["message"]["refusal"] is None and choice["logprobs"]["refusal"] is None
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json={**body, "stream": True}, headers=AUTH) as reply:
        chunks = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    with_logprobs = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert with_logprobs and all(lp["refusal"] is None for lp in with_logprobs)


def test_the_openapi_document_lists_the_statuses_the_server_sends(live):  # noqa: F811
    document = httpx.get(f"{live.url}/openapi.json").json()
    declared = {(path, method.upper()): set(operation["responses"])
                for path, operations in document["paths"].items() for method, operation in operations.items()}
    assert declared[("/v1/chat/completions", "POST")] == \
        {"200", "400", "401", "404", "413", "429", "500", "502", "503", "504", "4XX"}  # 4XX: an upstream's
    assert declared[("/v1/models/{model}", "GET")] == {"200", "401", "404", "503"}
    assert all("422" not in statuses for statuses in declared.values())
    assert "HTTPValidationError" not in json.dumps(document)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert document["paths"]["/v1/completions"]["post"]["responses"]["429"]["content"]["application/json"]["schema"] \
        == error
    # every status the suite's servers answered so far is declared on its route (405: a method that has
    # no route; 499: nginx's "client closed", which no client receives)
    routes = {"/v1/chat/completions": "/v1/chat/completions", "/v1/completions": "/v1/completions",
              "/v1/models": "/v1/models"}
    for reply in openai_schema.RECORDED:
        route = routes.get(reply.path, "/v1/models/{model}" if reply.path.startswith("/v1/models/") else None)
        if route is not None and reply.status not in (405, 499):
            statuses = declared[(route, reply.method)]
            assert str(reply.status) in statuses or f"{reply.status // 100}XX" in statuses, (reply.path, reply.status)


def test_the_official_schema_catches_what_the_server_used_to_send():
    """The check can fail: OpenAI's schema refuses a message without `refusal`, a stream chunk without
    `finish_reason`, and a finish reason OpenAI does not have."""
    message = {"role": "assistant", "content": "Paris"}
    response = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": message}]}
    assert openai_schema.problems("CreateChatCompletionResponse", response) == \
        ["choices/0/message: 'refusal' is a required property"]
    message["refusal"] = None
    assert openai_schema.problems("CreateChatCompletionResponse", response) == []
    response["choices"][0]["finish_reason"] = "abstain"
    assert openai_schema.problems("CreateChatCompletionResponse", response)
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Paris"}}]}
    assert openai_schema.problems("CreateChatCompletionStreamResponse", chunk)
    chunk["choices"][0]["finish_reason"] = None
    assert openai_schema.problems("CreateChatCompletionStreamResponse", chunk) == []


def _objects_received(response: httpx.Response) -> int:
    """OpenAI objects in a reply as the client received it: one body, or one per stream event."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return sum(1 for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]")
    return 1


def test_every_reply_validates_against_the_official_schemas(live, proxied):  # noqa: F811
    """Each kind of reply the server sends, hosted and proxied, validated object by object against the
    official schemas, and counted: exactly the objects the client received (conftest.py checks every
    other test's replies the same way)."""
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    requests = [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, **stream, "n": 2, "logprobs": True, "top_logprobs": 2}),
        ("/v1/chat/completions", {**chat, "guard": {"action": "abstain", "threshold": 0.0, "token_scores": True}}),
        ("/v1/chat/completions", {**chat, **stream, "guard": {"action": "abstain", "threshold": 0.0}}),
        ("/v1/chat/completions", {**chat, "guard": {"action": "dampen", "threshold": 0.0}}),  # proxied: 400
        ("/v1/chat/completions", {**chat, "guard": {"action": "off"}}),
        ("/v1/completions", {"model": "tiny", "prompt": ["Hi", "The quick"], "max_tokens": 3, "logprobs": 2}),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "logprobs": 1, **stream}),
        ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True,
                             "guard": {"action": "abstain", "threshold": 0.0}}),
        ("/v1/chat/completions", {**chat, "temperature": 5}),  # 400
        ("/v1/chat/completions", {**chat, "model": "other"}),  # 404
    ]
    proxy = str(proxied.base_url).removesuffix("/v1/")

    def run(base: str) -> tuple[int, list[int]]:
        """The requests sent to `base`; the objects received, and the statuses."""
        replies = []
        with httpx.Client(headers=AUTH, timeout=60) as http:
            replies += [http.post(f"{base}{path}", json=body) for path, body in requests]
            replies += [http.get(f"{base}{path}") for path in ("/v1/models", "/v1/models/tiny", "/v1/models/other")]
        replies.append(httpx.get(f"{base}/v1/models"))  # no key: 401 (the proxy has none: 200)
        return sum(_objects_received(r) for r in replies), [r.status_code for r in replies]

    start = len(openai_schema.RECORDED)
    received, statuses = run(live.url)
    assert statuses == [200] * 9 + [400, 404, 200, 200, 404, 401]
    assert openai_schema.check(openai_schema.RECORDED[start:]) == received
    start = len(openai_schema.RECORDED)
    received_proxied, statuses = run(proxy)
    assert statuses == [200] * 4 + [400, 200, 400, 200, 200, 400, 404, 200, 200, 404, 200]  # no dampen, one prompt
    replies = openai_schema.RECORDED[start:]
    port = int(proxy.rsplit(":", 1)[1])
    assert openai_schema.check([r for r in replies if r.port == port]) == received_proxied
    upstream = openai_schema.check([r for r in replies if r.port != port])  # the proxy's own calls to `live`
    assert upstream > 0 and min(received, received_proxied) > len(requests) + 4  # streams: one object per event
