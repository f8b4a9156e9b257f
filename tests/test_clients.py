"""The verdict through the clients people use, as README's recipes read it: the openai SDK (plain,
streamed, and its stream helper), LangChain's ChatOpenAI and litellm, each against a live server.
Nothing here may leave the machine: connections to anything but loopback fail the test."""

from __future__ import annotations

import os
import socket

import openai
import pytest

from test_server import KEY, MESSAGES, client, guard, live  # noqa: F401 - fixtures

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches a price list at import
ABSTAIN = {"guard": {"action": "abstain", "threshold": 0.0}}  # abstains at the first token


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    connect = socket.socket.connect

    def local(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"a client tried to reach {address} (tests run offline)")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local)


@pytest.fixture
def stop(client):  # noqa: F811
    """A stop string that ends the greedy answer early, so that it finishes with `stop`."""
    text = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    return text.choices[0].message.content[3:5]


def test_openai_plain_reads_the_body_and_the_headers(client):  # noqa: F811
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=6)
    completion = raw.parse()
    report = completion.choices[0].model_extra["hallucination"]
    assert raw.headers["x-hguard-verdict"] == report["verdict"]
    assert float(raw.headers["x-hguard-probability"]) == report["probability"]
    several = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=6, n=2,
                                                               extra_body=ABSTAIN)
    assert several.headers["x-hguard-verdict"] == "abstained, abstained"  # one per choice, in order
    probabilities = [c.model_extra["hallucination"]["probability"] for c in several.parse().choices]
    assert [float(p) for p in several.headers["x-hguard-probability"].split(", ")] == probabilities


def test_openai_stream_reads_the_finishing_chunk(client):  # noqa: F811
    text, verdicts = "", []
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, stream=True,
                                                extra_body=ABSTAIN):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                verdicts.append(choice.model_extra["hallucination"]["verdict"])
                assert chunk.model_extra["hallucinations"] == [{"index": 0, **choice.model_extra["hallucination"]}]
    assert verdicts == ["abstained"] and text.endswith("\n\nNot sure.")


def test_openai_stream_helper_keeps_the_verdict(client, stop):  # noqa: F811
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                        stop=[stop]) as stream:
        text = "".join(event.delta for event in stream if event.type == "content.delta")
    completion = stream.get_final_completion()
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.content == text
    assert completion.choices[0].message.model_extra["hallucination"]["verdict"] in ("ok", "flagged")
    # an abstention is OpenAI's content filter: the helper raises (as at max_tokens), the stream's
    # snapshot holds the completion
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, max_tokens=8, extra_body=ABSTAIN) as stream:
        for _ in stream:
            pass
    with pytest.raises(openai.ContentFilterFinishReasonError):
        stream.get_final_completion()
    message = stream.current_completion_snapshot.choices[0].message
    assert message.content.endswith("\n\nNot sure.") and message.model_extra["hallucination"]["verdict"] == "abstained"


def test_langchain_reads_the_headers(live):  # noqa: F811
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=f"{live.url}/v1", api_key=KEY, include_response_headers=True,
                     max_tokens=6, max_retries=0, extra_body=ABSTAIN)
    message = llm.invoke("Where was Ada born?")
    headers = message.response_metadata["headers"]
    assert (headers["x-hguard-verdict"], message.content) == ("abstained", "Not sure.")
    assert 0.0 <= float(headers["x-hguard-probability"]) <= 1.0


def test_litellm_reads_the_choice_and_the_finishing_chunk(live):  # noqa: F811
    import litellm

    kwargs = dict(model="openai/tiny", api_base=f"{live.url}/v1", api_key=KEY, messages=MESSAGES, max_tokens=6)
    response = litellm.completion(**kwargs)
    report = response.choices[0].provider_specific_fields["hallucination"]
    headers = response._hidden_params["additional_headers"]
    assert headers["llm_provider-x-hguard-verdict"] == report["verdict"]
    for extra_body in ({}, ABSTAIN):
        chunks = list(litellm.completion(**kwargs, stream=True, extra_body=extra_body))
        [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        [summary] = last.hallucinations
        assert last.choices[0].finish_reason == ("content_filter" if extra_body else "length")
        assert summary["verdict"] == ("abstained" if extra_body else report["verdict"])
