"""Proxy mode scores a vLLM upstream's own token ids (`return_token_ids`), not its text re-tokenised.

The upstream here is a stand-in for vLLM's OpenAI server (0.32): `GET /v1/models` says
`owned_by: "vllm"`, and where a request asks for `return_token_ids` its answer carries the prompt's ids
(a chat's at the top of the body or first chunk, a text choice's on the choice) and each choice's
`token_ids` (in a stream, each chunk's new ones; the end-of-sequence token that ended the answer last,
with no text), as vLLM places them. Its answer is a fixed list of ids that is *not* the tokenizer's own
split of their text, so re-tokenising the text gives other tokens: only scores of the upstream's ids
pass.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from hguard.results import decode
from hguard.server.app import ServerSettings, build_app
from hguard.server.requests import GuardDefaults

from test_server import LiveServer, guard  # noqa: F401 - fixtures

TEXT = "Ada Lovelace was born in London and worked on the analytical engine."
QUESTION = [{"role": "user", "content": "Where was Ada born?"}]
PROMPT = "Where was Ada"
ID_FIELDS = ("prompt_token_ids", "token_ids")


def non_canonical(tokenizer, text: str) -> list[int]:
    """Ids that decode to `text` but are not the tokenizer's split of it: a token of its split cut in
    two tokens of the vocabulary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    vocab = tokenizer.get_vocab()
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                return ids[:i] + [vocab[piece[:k]], vocab[piece[k:]]] + ids[i + 1:]
    raise AssertionError("no token of the text splits in two")


class VllmStandIn:
    """vLLM's OpenAI server, as far as proxy mode reads it. `owner`: what `GET /v1/models` says it is;
    `ids`: "vllm" (token ids where asked), "none" (an older vLLM, which ignores the field) or "other
    prompt" (prompt ids other than the proxy's: another chat template); `lag`: a stream's text comes a
    chunk after its ids (as vLLM holds back a partial character or a possible stop string). Every
    request body is kept."""

    def __init__(self, guard, answer: list[int]) -> None:  # noqa: F811
        self.guard, self.answer = guard, answer
        self.eos = guard.tokenizer.eos_token_id
        self.owner, self.ids, self.lag = "vllm", "vllm", False
        self.bodies: list[dict] = []
        self.app = FastAPI()
        self.app.get("/v1/models")(self._models)
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/v1/completions")(self._text)

    async def _models(self) -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": self.owner}]}

    async def _chat(self, request: Request):
        return await self._answer(request, True)

    async def _text(self, request: Request):
        return await self._answer(request, False)

    async def _answer(self, request: Request, chat: bool):
        body = await request.json()
        self.bodies.append(body)
        prompt = self.guard.encode(body["messages"] if chat else body["prompt"])
        if self.ids == "other prompt":
            prompt = prompt[1:]
        asked = body.get("return_token_ids") is True and self.ids != "none"
        answer = self.answer + [self.eos]  # vLLM lists the EOS that ended the answer (its text has none)
        if body.get("stream"):
            return StreamingResponse(self._events(chat, prompt, answer, asked), media_type="text/event-stream")
        choice = {"index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
        choice.update({"message": {"role": "assistant", "content": decode(self.guard.tokenizer, answer)}} if chat
                      else {"text": decode(self.guard.tokenizer, answer)})
        reply = {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
                 "model": "tiny", "choices": [choice],
                 "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(answer),
                           "total_tokens": len(prompt) + len(answer)}}
        if asked:
            choice["token_ids"] = answer
            (reply if chat else choice)["prompt_token_ids"] = prompt
        return reply

    def _events(self, chat: bool, prompt: list[int], answer: list[int], asked: bool):
        """vLLM's chunks: a chat's first has the role (and the prompt ids) only; then two tokens a chunk,
        the last with the finish reason and the EOS."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": "cmpl-1", "object": kind, "created": 1, "model": "tiny"}
        if chat:
            first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            yield f"data: {json.dumps({**first, 'prompt_token_ids': prompt} if asked else first)}\n\n"
        for start in range(0, len(answer), 2):
            ids, last = answer[start: start + 2], start + 2 >= len(answer)
            before, upto = (max(0, start - 2), start + 2 if last else start) if self.lag else (start, start + 2)
            text = decode(self.guard.tokenizer, answer[:upto])[len(decode(self.guard.tokenizer, answer[:before])):]
            choice = {"index": 0, "logprobs": None, "finish_reason": "stop" if last else None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            if asked:
                choice["token_ids"] = ids
                if not chat and start == 0:
                    choice["prompt_token_ids"] = prompt
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def answer(guard):  # noqa: F811
    ids = non_canonical(guard.tokenizer, TEXT)
    assert decode(guard.tokenizer, ids) == TEXT
    assert guard.tokenizer(TEXT, add_special_tokens=False)["input_ids"] != ids
    return ids


@pytest.fixture(scope="module")
def upstream(guard, answer):  # noqa: F811
    standin = VllmStandIn(guard, answer)
    with LiveServer(standin.app, record=False) as server:
        standin.url = server.url
        yield standin


def _proxy(guard, upstream):  # noqa: F811
    settings = ServerSettings(served_model_name="tiny", upstream=upstream.url, defaults=GuardDefaults(max_tokens=16))
    return LiveServer(build_app(settings, guard=guard))


@pytest.fixture(scope="module")
def proxy(guard, upstream):  # noqa: F811
    with _proxy(guard, upstream) as server:
        yield server


def ask(url: str, chat: bool, stream: bool, **fields) -> dict:
    """The proxy's reply, a stream's chunks gathered: text, the streamed token scores, the summary's,
    the chunks' token ids and prompt ids, and the chunks themselves."""
    body = {"model": "tiny", "stream": stream, "guard": {"token_scores": True}, **fields}
    body.update({"messages": QUESTION} if chat else {"prompt": PROMPT})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        reply = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        [choice] = data["choices"]
        return {"text": choice["message"]["content"] if chat else choice["text"],
                "scores": choice["hallucination"]["token_scores"], "final": choice["hallucination"],
                "ids": choice.get("token_ids"), "prompt": (data if chat else choice).get("prompt_token_ids"),
                "chunks": [data]}
    out = {"text": "", "scores": [], "final": None, "ids": None, "prompt": None, "chunks": []}
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            out["chunks"].append(chunk)
            for choice in chunk.get("choices", []):
                out["text"] += (choice.get("delta", {}).get("content") if chat else choice.get("text")) or ""
                if choice.get("finish_reason"):
                    out["final"] = choice["hallucination"]
                else:
                    out["scores"] += choice["hallucination"]["token_scores"]
                if "token_ids" in choice:
                    out["ids"] = (out["ids"] or []) + choice["token_ids"]
            for holder in [chunk, *chunk.get("choices", [])]:
                if "prompt_token_ids" in holder:
                    assert out["prompt"] is None, "the prompt's ids come once"
                    out["prompt"] = holder["prompt_token_ids"]
    return out


def _fields(chunks: list[dict]) -> set[str]:
    return {name for chunk in chunks for holder in [chunk, *chunk.get("choices", [])] for name in ID_FIELDS
            if name in holder}


MODES = [(chat, stream) for chat in (True, False) for stream in (False, True)]


@pytest.mark.parametrize("chat,stream", MODES)
def test_the_upstreams_token_ids_are_scored_and_not_shown(guard, upstream, proxy, answer, chat, stream):  # noqa: F811
    reply = ask(proxy.url, chat, stream)
    assert upstream.bodies[-1]["return_token_ids"] is True
    want = guard.score(QUESTION if chat else PROMPT, answer)
    assert reply["text"] == TEXT
    assert len(reply["scores"]) == len(answer)  # the upstream's tokens (re-tokenised text: one fewer)
    assert reply["scores"] == pytest.approx(want.token_probs, abs=1e-4)
    assert reply["final"]["token_scores"] == pytest.approx(want.token_probs, abs=1e-4)
    assert reply["final"]["probability"] == pytest.approx(want.probability, abs=1e-4)
    assert _fields(reply["chunks"]) == set()  # the client did not ask for them


@pytest.mark.parametrize("chat,stream", MODES)
def test_the_client_that_asks_gets_the_ids(guard, upstream, proxy, answer, chat, stream):  # noqa: F811
    reply = ask(proxy.url, chat, stream, return_token_ids=True)
    assert reply["ids"] == answer + [guard.tokenizer.eos_token_id]  # as the upstream sent them
    assert reply["prompt"] == guard.encode(QUESTION if chat else PROMPT)
    assert reply["scores"] == pytest.approx(guard.score(QUESTION if chat else PROMPT, answer).token_probs, abs=1e-4)
    for chunk in reply["chunks"] if stream else []:  # each chunk's ids are those of its text and scores
        for choice in chunk["choices"]:
            if "token_ids" in choice:
                text = choice["delta"].get("content", "") if chat else choice["text"]
                assert decode(guard.tokenizer, choice["token_ids"]) == text
                assert len(choice["hallucination"].get("token_scores", [])) == len(
                    [i for i in choice["token_ids"] if i != guard.tokenizer.eos_token_id])


@pytest.mark.parametrize("chat", [True, False])
def test_ids_whose_text_lags_go_out_with_their_text(guard, upstream, proxy, answer, chat):  # noqa: F811
    upstream.lag = True
    try:
        test_the_client_that_asks_gets_the_ids(guard, upstream, proxy, answer, chat, True)
    finally:
        upstream.lag = False


def test_an_abstained_answer_shows_none_of_its_ids(guard, upstream, proxy):  # noqa: F811
    data = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": QUESTION, "return_token_ids": True,
        "guard": {"action": "abstain", "threshold": 0.0}}).json()
    [choice] = data["choices"]
    assert choice["finish_reason"] == "content_filter" and choice["token_ids"] == []
    assert data["prompt_token_ids"] == guard.encode(QUESTION)


@pytest.mark.parametrize("chat,stream", MODES)
@pytest.mark.parametrize("mode", ["none", "other prompt"])
def test_without_the_prompts_ids_the_text_is_re_tokenised(guard, upstream, proxy, mode, chat, stream):  # noqa: F811
    upstream.ids = mode
    try:
        reply = ask(proxy.url, chat, stream)
    finally:
        upstream.ids = "vllm"
    assert upstream.bodies[-1]["return_token_ids"] is True
    want = guard.score(QUESTION if chat else PROMPT, guard.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert reply["text"] == TEXT
    assert reply["scores"] == pytest.approx(want.token_probs, abs=1e-4)
    assert _fields(reply["chunks"]) == set()


def test_an_upstream_that_is_not_vllm_is_not_asked_for_ids(guard, upstream):  # noqa: F811
    upstream.owner = "someone"
    try:
        with _proxy(guard, upstream) as proxy:
            reply = ask(proxy.url, True, False)
            assert "return_token_ids" not in upstream.bodies[-1]
            reply = ask(proxy.url, True, False, return_token_ids=True)  # the client's own: forwarded
            assert upstream.bodies[-1]["return_token_ids"] is True and reply["ids"] is not None
    finally:
        upstream.owner = "vllm"


def test_vllms_nulls_where_openai_has_none_are_left_out():
    """vLLM 0.32 sends null for fields OpenAI's schemas type as objects, arrays or strings (a real answer
    and chunk of its, as the proxy received them); what the proxy relays validates against OpenAI's."""
    from openai_schema import problems

    from hguard.server.upstream_schema import chat_answer, chat_chunk, text_answer

    answer = {"id": "chatcmpl-a", "object": "chat.completion", "created": 1796106958, "model": "organism",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Born in Brog.", "refusal": None,
                                                   "annotations": None, "audio": None, "function_call": None,
                                                   "tool_calls": [], "reasoning": None},
                           "logprobs": None, "finish_reason": "stop", "stop_reason": 5, "token_ids": [46, 5],
                           "routed_experts": None}],
              "service_tier": None, "system_fingerprint": "vllm-0.32.0", "prompt_logprobs": None,
              "prompt_token_ids": [2, 3], "kv_transfer_params": None,
              "usage": {"prompt_tokens": 13, "completion_tokens": 2, "total_tokens": 15,
                        "prompt_tokens_details": None, "completion_tokens_details": None}}
    body = chat_answer(answer, "chat.completion", 1)
    assert problems("CreateChatCompletionResponse", body) == []
    assert "annotations" not in body["choices"][0]["message"] and body["choices"][0]["token_ids"] == [46, 5]
    chunk = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1, "model": "organism",
             "choices": [{"index": 0, "delta": {"role": None, "content": " Brog", "function_call": None,
                                                "tool_calls": None, "reasoning": None},
                          "logprobs": None, "finish_reason": None, "token_ids": [46]}],
             "service_tier": None, "system_fingerprint": None, "usage": None}
    assert problems("CreateChatCompletionStreamResponse", chat_chunk(chunk, "chat.completion.chunk", 1)) == []
    text = {"id": "cmpl-a", "object": "text_completion", "created": 1, "model": "organism",
            "choices": [{"index": 0, "text": " Brog", "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "token_ids": [46], "prompt_logprobs": None, "prompt_token_ids": [2]}],
            "service_tier": None, "system_fingerprint": None, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                        "total_tokens": 2, "prompt_tokens_details": None}}
    assert problems("CreateCompletionResponse", text_answer(text, "text_completion", 1)) == []
