"""The pieces of OpenAI responses that hosted and proxied answers share: choices, finishing chunks with the
guard's summary, logprobs objects, the streamed abstention's tail, and the metrics' labels."""

from __future__ import annotations


def chat_logprobs(content: list[dict] | None) -> dict:
    """A chat `logprobs` object; `refusal` is required by the OpenAI schema and always null here."""
    return {"content": content, "refusal": None}


def withheld_logprobs(chat: bool) -> dict:
    """The `logprobs` of an abstained choice: its replacement message has none (not the model's tokens)."""
    if chat:
        return chat_logprobs(None)
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


_SEVERITY = {"ok": 0, "flagged": 1, "dampened": 2, "abstained": 3}


def abstain_tail(sent: str, message: str) -> str:
    """What a streamed abstention adds after the text already sent, which a stream cannot take back:
    the abstention message as a paragraph of its own (none before it when nothing visible was sent)."""
    if not sent.strip():
        return message
    newlines = len(sent) - len(sent.rstrip("\n"))
    return "\n" * max(0, 2 - newlines) + message


def text_choice(index: int, chat: bool, text: str, scores: list[float], logprobs: dict | None = None) -> dict:
    """A stream chunk choice that adds `text`, with the scores of its tokens (none: the abstention message)."""
    choice: dict = {"index": index, "finish_reason": None, "logprobs": logprobs,
                    "hallucination": {"token_scores": scores}}
    choice["delta" if chat else "text"] = {"content": text} if chat else text
    return choice


def finishing_choice(index: int, chat: bool, summary: dict, finish: str) -> dict:
    """The stream chunk choice that ends a choice: its finish reason and the summary, and no text (an
    abstention message comes in the chunk before: litellm splits a finishing chunk with text in two
    and keeps the summary on neither part). The summary also rides in the chat delta, where
    accumulating clients keep it (the openai SDK's stream helper builds `message` from the deltas)."""
    choice: dict = {"index": index, "finish_reason": finish, "logprobs": None, "hallucination": summary}
    choice["delta" if chat else "text"] = {"hallucination": summary} if chat else ""
    return choice


def finishing_chunk(chunk: dict, choices: list[dict]) -> dict:
    """`chunk` (id, object, created, model, ...) as the chunk that ends `choices` (`finishing_choice`s).
    It lists their summaries at its top too, as `hallucinations` (each with its choice's `index`), the
    one place litellm keeps when it rebuilds a finishing chunk that has no text."""
    summaries = [{"index": choice["index"], **choice["hallucination"]} for choice in choices]
    return {**chunk, "choices": choices, "hallucinations": summaries}


def endpoint_name(chat: bool) -> str:
    """The `endpoint` label of a completion request."""
    return "chat" if chat else "completions"


def worst(verdicts) -> str:
    """The most severe of a request's verdicts (its metrics label), "" for none."""
    return max(verdicts, key=_SEVERITY.get, default="")
