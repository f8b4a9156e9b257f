"""From a validated OpenAI request to what the engine or the upstream needs: the model check, the chat
or prompts as token rows, the per-request row limit, and the guard's server-wide defaults."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..guard import Guard
from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest, ContentPartError


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{served}`.",
                       param="model", code="model_not_found")


def messages_of(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The chat as the tokenizer's template wants it (text only; 'developer' is a system message). A
    content part that is not text is a 400 naming it, as the OpenAI API names a bad part."""
    chat = []
    for i, message in enumerate(request.messages):
        try:
            chat.append({"role": "system" if message.role == "developer" else message.role, "content": message.text()})
        except ContentPartError as error:
            param = f"messages.{i}.content.{error.part}"
            raise APIError(400, f"{param}: {error}", param=param, code="unsupported_content_part") from error
    return chat


def prompts_of(request: CompletionRequest) -> list:
    """The prompts of a text completion request (one string or token list each)."""
    try:
        return request.prompts()
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error


def check_rows(prompts: int, n: int, limit: int) -> None:
    """A request's rows (prompts x n) fit in one batch of `limit` rows, or it is a 400 naming the limit:
    each request's work is bounded before it starts, and a request larger than a batch would make
    every other request wait for all of it."""
    if prompts * n > limit:
        what = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
        raise APIError(400, f"This request asks for {prompts * n} completions ({what}); this server generates at "
                       f"most {limit} per request (--max-batch-size). Send the prompts in smaller requests.",
                       param="prompt" if prompts > 1 else "n", code="too_many_completions")


def encode_prompt(guard: Guard, prompt, context: int | None = None, param: str = "prompt") -> list[int]:
    """The prompt's token ids. With `context`, a prompt with more characters than that many tokens can
    spell is refused before it is tokenized (a 1 MB text took 1.2 s and 240 MB to tokenize, only to be
    refused for its length): no prompt that would fit is ever refused here."""
    if context is not None:
        chars = _chars(prompt)
        if chars > context * token_chars(guard.tokenizer):
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt's {chars} "
                           "characters cannot fit in it.", param=param, code="context_length_exceeded")
    try:
        return guard.encode(prompt)
    except ValueError as error:
        raise APIError(400, str(error), param="prompt") from error


def _chars(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return sum(len(str(m.get("content") or "")) for m in prompt)
    return 0  # token ids: their count is checked after


@functools.cache
def token_chars(tokenizer) -> int:
    """More characters than any one token spells (the longest vocabulary entry, plus one)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=16) + 1


@dataclass
class GuardDefaults:
    action: str = "flag"  # policy.ACTIONS
    threshold: float | None = None
    alpha: float | None = None
    abstain_message: str = "I'm not confident enough to answer that."
    max_tokens: int = 256
