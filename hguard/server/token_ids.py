"""The upstream's own token ids in proxy mode: vLLM returns them when asked (`return_token_ids`).

A vLLM upstream (one whose `GET /v1/models` says `owned_by: "vllm"`) is asked for them whatever the
client sent; its answer then carries `prompt_token_ids` (a chat answer's at its top, a text choice's
on the choice; in a stream, on the first chunk) and each choice's `token_ids` (in a stream, each
chunk's new ones). Where the upstream's prompt ids are the very ids the local tokenizer and chat
template give, the answer's ids are scored as they are: the scores describe exactly the tokens the
upstream sampled, however its text would re-tokenise. Otherwise (ids absent, another prompt) the text
is re-tokenised, as for any upstream. The client sees the ids only where it asked for them.
"""

from __future__ import annotations

from collections.abc import Container

from .upstream import broken

PROMPT_IDS, ANSWER_IDS = "prompt_token_ids", "token_ids"


def scorable(ids: list[int], vocab: int) -> list[int]:
    """`ids` (an upstream's answer ids whose prompt ids matched the local ones), or a 502 if some id is
    past the local vocabulary."""
    if any(i >= vocab for i in ids):
        raise broken("the upstream's token ids are not this model's vocabulary", max(ids))
    return ids


def answer_ids(ids: list[int], choice: dict, eos: Container[int]) -> list[int]:
    """The ids an answer's scores describe: the upstream's, less the stop token that vLLM lists after an
    answer it ended (an end-of-sequence token, or a `stop_token_ids` one, named by `stop_reason`), whose
    text the answer leaves out, as hosted generation leaves it out."""
    if ids and choice.get("finish_reason") == "stop":
        reason = choice.get("stop_reason")
        if ids[-1] in eos or (type(reason) is int and reason == ids[-1]):
            return ids[:-1]
    return ids


def strip(body: dict) -> None:
    """Remove the token-id fields from a body or chunk and its choices (the client did not ask)."""
    body.pop(PROMPT_IDS, None)
    for choice in body.get("choices") or []:
        choice.pop(PROMPT_IDS, None)
        choice.pop(ANSWER_IDS, None)
