"""The pieces of OpenAI responses that hosted and proxied answers share, whichever the endpoint: finishing
chunks with the guard's summary, the chat logprobs object, the streamed abstention's tail, and the
verdict label of the metrics (what differs by endpoint is in endpoint.py)."""

from __future__ import annotations


def chat_logprobs(content: list[dict] | None) -> dict:
    """A chat `logprobs` object; `refusal` is required by the OpenAI schema and always null here."""
    return {"content": content, "refusal": None}


_SEVERITY = {"ok": 0, "flagged": 1, "dampened": 2, "abstained": 3}


def abstain_tail(sent: str, message: str) -> str:
    """What a streamed abstention adds after the text already sent, which a stream cannot take back:
    the abstention message as a paragraph of its own (none before it when nothing visible was sent)."""
    if not sent.strip():
        return message
    newlines = len(sent) - len(sent.rstrip("\n"))
    return "\n" * max(0, 2 - newlines) + message


def finishing_chunk(chunk: dict, choices: list[dict]) -> dict:
    """`chunk` (id, object, created, model, ...) as the chunk that ends `choices` (`finishing_choice`s).
    It lists their summaries at its top too, as `hallucinations` (each with its choice's `index`), the
    one place litellm keeps when it rebuilds a finishing chunk that has no text."""
    summaries = [{"index": choice["index"], **choice["hallucination"]} for choice in choices]
    return {**chunk, "choices": choices, "hallucinations": summaries}


def worst(verdicts) -> str:
    """The most severe of a request's verdicts (its metrics label), "" for none."""
    return max(verdicts, key=_SEVERITY.get, default="")
